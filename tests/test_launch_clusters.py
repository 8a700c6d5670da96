"""launch/'s cluster files: shellcheck on every script; the Kubernetes manifests' wiring and
launch/tpu/tpu.sh, each carried out by local processes that join one jax cluster.

A manifest is not applied anywhere: the test computes what Kubernetes (and the JobSet controller)
would give each pod (hostname, subdomain, labels, the completion-index annotation, the container's
environment with its $(VAR) references expanded), checks that the coordinator address names pod
0, then starts one `python -m llmjax.distributed` per pod with that environment. tpu.sh runs
against tests/fake_cluster/gcloud, which records the gcloud calls and runs `ssh --worker=all`
commands once per simulated worker here.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

import _xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
FAKE = os.path.join(ROOT, "tests", "fake_cluster")
TPU_SH = os.path.join(LAUNCH, "tpu", "tpu.sh")
TIMEOUT = 120  # per group of processes; each joins in seconds, so only a hang gets near it
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def _env(**extra) -> dict:
  """This environment, less any cluster description it may carry, plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                              "OMPI_"))}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _run_all(commands: list[tuple[list[str], dict]], cwd: str = ROOT,
             timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
  """Runs the commands at once, each in its own process group, killed whole after `timeout`."""
  procs = [subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
           for cmd, env in commands]
  deadline, done = time.monotonic() + timeout, []
  try:
    for (cmd, _), proc in zip(commands, procs):
      out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
      done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
  except subprocess.TimeoutExpired:
    pytest.fail(f"not finished after {timeout} s: {[cmd for cmd, _ in commands]}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
  return done


def _run(cmd: list[str], env: dict, cwd: str = ROOT) -> subprocess.CompletedProcess:
  return _run_all([(cmd, env)], cwd)[0]


def _port_free(port: int) -> bool:
  with socket.socket() as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- shellcheck -----------------------------------------------------------------------------

def test_shellcheck_passes_on_every_launch_script():
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "**", "*.sh"), recursive=True) +
                   glob.glob(os.path.join(LAUNCH, "**", "*.sbatch"), recursive=True))
  names = {os.path.relpath(s, ROOT) for s in scripts}
  assert {"launch/local.sh", "launch/gpu_env.sh", "launch/slurm/train.sbatch",
          "launch/tpu/tpu.sh"} <= names
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  shellcheck = shellcheck if os.path.exists(shellcheck) else shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -c constraints.txt -e '.[test]'"
  # -x follows `source` lines; their `# shellcheck source=` paths are relative to the root.
  done = _run([shellcheck, "-x", *scripts], _env())
  assert done.returncode == 0, done.stdout + done.stderr


# --- Kubernetes -----------------------------------------------------------------------------

def _load(name: str) -> list[dict]:
  with open(os.path.join(LAUNCH, "k8s", name)) as f:
    return [d for d in yaml.safe_load_all(f) if d]


def _check_job_spec(spec: dict) -> int:
  """The Job settings both manifests need; returns the pod count."""
  assert spec["completionMode"] == "Indexed"
  assert spec["backoffLimit"] == 0  # a lost process cannot be replaced alone
  assert spec["parallelism"] == spec["completions"] >= 2
  pod = spec["template"]["spec"]
  assert pod["restartPolicy"] == "Never"
  assert pod["terminationGracePeriodSeconds"] >= 120  # a step and a checkpoint after SIGTERM
  return spec["completions"]


def _container(pod_spec: dict) -> dict:
  (container,) = pod_spec["containers"]
  words = " ".join(container["command"] + container["args"])
  assert "exec llmjax train" in words  # llmjax itself gets the SIGTERM
  assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
  # The workdir is on a volume every pod mounts: a PersistentVolumeClaim.
  (workdir,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--workdir=")]
  claims = {v["name"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}
  assert any(workdir.startswith(m["mountPath"] + "/") and m["name"] in claims
             for m in container["volumeMounts"]), (workdir, container["volumeMounts"])
  return container


def indexed_job_pods() -> tuple[dict, list[dict]]:
  """indexed-job.yaml: its container and what Kubernetes gives each of its pods."""
  docs = {d["kind"]: d for d in _load("indexed-job.yaml")}
  service, job = docs["Service"], docs["Job"]
  assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
  job_name = job["metadata"]["name"]
  assert service["spec"]["selector"] == {"job-name": job_name}
  n = _check_job_spec(job["spec"])
  pod_spec = job["spec"]["template"]["spec"]
  assert pod_spec["subdomain"] == service["metadata"]["name"]
  pods = [{"hostname": f"{job_name}-{i}", "subdomain": pod_spec["subdomain"],
           "labels": {"job-name": job_name, "batch.kubernetes.io/job-name": job_name,
                      COMPLETION_INDEX: str(i)},
           "annotations": {COMPLETION_INDEX: str(i)}} for i in range(n)]
  return _container(pod_spec), pods


def jobset_pods() -> tuple[dict, list[dict]]:
  """jobset.yaml: its container and what the JobSet controller gives each of its pods."""
  (jobset,) = _load("jobset.yaml")
  assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
  name, network = jobset["metadata"]["name"], jobset["spec"].get("network", {})
  assert network.get("enableDNSHostnames", True)  # the headless Service, named as below
  subdomain = network.get("subdomain", name)
  (replicated,) = jobset["spec"]["replicatedJobs"]
  assert replicated["replicas"] == 1  # one Job: completion index == process id
  n = _check_job_spec(replicated["template"]["spec"])
  pod_spec = replicated["template"]["spec"]["template"]["spec"]
  rjob = replicated["name"]
  labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob,
            "jobset.sigs.k8s.io/job-index": "0"}
  pods = [{"hostname": f"{name}-{rjob}-0-{i}", "subdomain": subdomain,
           "labels": {**labels, COMPLETION_INDEX: str(i)},
           "annotations": {**labels, COMPLETION_INDEX: str(i)}} for i in range(n)]
  return _container(pod_spec), pods


def _field(pod: dict, path: str) -> str:
  match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
  assert match, f"fieldRef {path} not simulated"
  return pod[match.group(1)][match.group(2)]


def container_env(container: dict, pod: dict) -> dict[str, str]:
  """The container's variables in `pod`, as the kubelet sets them.

  $(NAME) expands to a variable defined earlier in the list and is left as it is otherwise;
  $$ is a literal $. Values must be strings (the API refuses a YAML number).
  """
  env = {}
  for var in container["env"]:
    if "value" in var:
      assert isinstance(var["value"], str), var
      env[var["name"]] = re.sub(
          r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
          lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), var["value"])
    else:
      env[var["name"]] = _field(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
  return env


@pytest.mark.parametrize("pods_of", [indexed_job_pods, jobset_pods], ids=["indexed-job", "jobset"])
def test_kubernetes_manifest_wires_one_jax_cluster(pods_of):
  container, pods = pods_of()
  n = len(pods)
  envs = [container_env(container, pod) for pod in pods]
  for i, env in enumerate(envs):
    assert env["JAX_NUM_PROCESSES"] == str(n)
    assert env["JAX_PROCESS_ID"] == str(i)
    # From the completion-index annotation, not a value fixed in the manifest.
    (var,) = [v for v in container["env"] if v["name"] == "JAX_PROCESS_ID"]
    assert var["valueFrom"]["fieldRef"]["fieldPath"] == \
        f"metadata.annotations['{COMPLETION_INDEX}']"
  (address,) = {env["JAX_COORDINATOR_ADDRESS"] for env in envs}  # the same in every pod
  host, port = address.rsplit(":", 1)
  assert host == f"{pods[0]['hostname']}.{pods[0]['subdomain']}"  # pod 0's DNS name
  assert int(port) in {p["containerPort"] for p in container["ports"]}

  # The pod names do not resolve here: loopback instead, on the manifest's port unless
  # something on this machine already listens there.
  port = port if _port_free(int(port)) else str(_free_port())
  done = _run_all([([sys.executable, "-m", "llmjax.distributed"],
                    _env(**{**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                            "XLA_FLAGS": _xla.xla_flags(4)}))
                   for env in envs])
  for i, d in enumerate(done):
    assert d.returncode == 0, d.stderr[-3000:]
    assert f"cluster from environment: process {i} of {n}" in d.stderr
    assert f"{4 * n} global cpu devices" in d.stderr


# --- Cloud TPU ------------------------------------------------------------------------------

@pytest.fixture
def fake_gcloud(tmp_path):
  """tpu.sh's environment with the fake gcloud (and a `sudo` that only records) first on PATH;
  returns (env, calls) where calls() reads the recorded gcloud argument lists."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  sudo = bin_dir / "sudo"  # never kill anything on this machine, whatever it has in /dev
  sudo.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/sudo.log"\n')
  sudo.chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = _env(PATH=f"{FAKE}:{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
             FAKE_TPU_WORKERS="2", XLA_FLAGS=_xla.xla_flags(4))
  for name in ("TPU_NAME", "TPU_ZONE", "TPU_TYPE", "TPU_VERSION", "TPU_PROJECT", "TPU_QUEUED",
               "TPU_SPOT", "TPU_REPO_DIR"):
    env.pop(name, None)

  def calls() -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return env, calls


def _tpu(env: dict, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  done = _run([TPU_SH, *args], env, cwd)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_tpu_lifecycle_commands(fake_gcloud):
  env, calls = fake_gcloud
  where = ["--name=pod", "--zone=europe-west4-a", "--accelerator-type=v5litepod-16",
           "--version=v2-alpha-tpuv5-lite"]
  for subcommand in ("create", "status", "stop", "delete"):
    _tpu(env, *where, subcommand)
  _tpu(env, *where, "--queued", "--spot", "--project=p", "create")
  _tpu({**env, "TPU_QUEUED": "1", "TPU_PROJECT": "p"}, *where, "delete")
  vm, queued, zone = ["compute", "tpus", "tpu-vm"], ["compute", "tpus", "queued-resources"], \
      "--zone=europe-west4-a"
  assert calls() == [
      vm + ["create", "pod", zone, "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite"],
      vm + ["describe", "pod", zone],
      vm + ["stop", "pod", zone],
      vm + ["delete", "pod", zone, "--quiet"],
      queued + ["create", "pod", "--node-id=pod", zone, "--project=p",
                "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                "--spot"],
      queued + ["delete", "pod", zone, "--project=p", "--force", "--quiet"]]


def test_tpu_refuses_what_it_does_not_know(fake_gcloud):
  env, calls = fake_gcloud
  for args in (["--zones=x", "create"], ["bogus"], ["run", "--"], []):
    done = _run([TPU_SH, *args], env)
    assert done.returncode == 2 and "create" in done.stderr, (args, done.stderr)
  assert calls() == []


def _ssh_command(call: list[str]) -> str:
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "llmjax"] and "--worker=all" in call
  (command,) = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
  return command


def _in_order(text: str, *parts: str) -> None:
  where = [text.find(p) for p in parts]
  assert -1 not in where and where == sorted(where), (parts, where, text)


def _tpu_devices_here() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def test_tpu_run_starts_a_command_on_every_worker_of_the_slice(fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  done = _tpu({**env, "TPU_REPO_DIR": ROOT}, "run", "--", sys.executable, "-m",
              "llmjax.distributed", cwd=str(tmp_path))
  for i in range(2):
    assert f"cluster from environment: process {i} of 2" in done.stderr
  assert done.stderr.count("4 local / 8 global cpu devices") == 2
  (call,) = calls()
  _in_order(_ssh_command(call), "; free_tpu; ", "-m llmjax.distributed")
  # The clean-up only acts where TPU device files exist, i.e. on a TPU VM.
  assert (tmp_path / "sudo.log").exists() == _tpu_devices_here()


def test_tpu_train_clears_stale_tpu_users_then_runs_llmjax_train(fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  repo = tmp_path / "repo"  # what `sync` leaves on a worker, with an llmjax that only reports
  (repo / ".venv" / "bin").mkdir(parents=True)
  llmjax = repo / ".venv" / "bin" / "llmjax"
  # One write of one line: the two workers share a pipe, and a pipe write this small is atomic.
  llmjax.write_text(f'#!{sys.executable}\nimport json, os, sys\nos.write(1, (json.dumps('
                    '[os.environ["JAX_PROCESS_ID"], os.getcwd(), sys.argv[1:]]) + "\\n").encode())\n')
  llmjax.chmod(0o755)
  args = ["--config=experiments/lm/stdlib_gpt.py", "--workdir=/shared/runs/a b",
          "--config.train.name=$HOME's"]
  done = _tpu({**env, "TPU_REPO_DIR": str(repo)}, "train", *args)
  reports = sorted(json.loads(line) for line in done.stdout.splitlines())
  assert reports == [[str(i), str(repo), ["train", *args]] for i in range(2)]  # words intact
  (call,) = calls()
  # The function that frees the TPU is defined, called, and then llmjax starts.
  _in_order(_ssh_command(call), "sudo -n fuser -s -k", "sudo -n rm -f /tmp/libtpu_lockfile",
            "; free_tpu; ", ".venv/bin/llmjax train")
  assert (tmp_path / "sudo.log").exists() == _tpu_devices_here()
