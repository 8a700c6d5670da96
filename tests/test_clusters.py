"""Several processes, started the way a cluster starts them, agree and stop together.

The SLURM tests go through launch/slurm/train.sbatch with the fake `sbatch` and `srun` of
tests/fake_cluster (one machine, the environment of a real job step), so jax's SLURM detection
runs and no coordinator flag is given. Each process simulates 4 CPU devices; together they are
one 8-device mesh, compared with one process of 8 devices run here in the test process.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import _xla
import _ckpt_helpers as h
import llmjax.train
from llmjax import config as config_lib
from llmjax import distributed
from llmjax.distributed import ClusterError

FAKE = os.path.join(h.REPO, "tests", "fake_cluster")
SBATCH = os.path.join(h.REPO, "launch", "slurm", "train.sbatch")
# More than the run gets to before it is preempted (it stops 2-5 steps after the signal, so
# near step 11): 30 keeps that margin twice over while the in-process reference and the resumed
# run train half the steps that 60 took.
STEPS = 30
SIGNAL_AFTER = 6  # train records logged before process 1 gets SIGTERM
FSDP8 = ("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.rules=fsdp")
RUN_ARGS = (f"--config.train.steps={STEPS}", "--config.train.log_every=1",
            "--config.train.checkpoint_every=5", "--config.train.eval_every=100000") + FSDP8


def _cluster_env(tmp, **extra) -> dict:
  """Two tasks' worth of setting: 4 CPU devices each, the fakes first on PATH."""
  wrapper = os.path.join(tmp, "llmjax")  # the CLI without torch (see _ckpt_helpers)
  with open(wrapper, "w") as f:
    f.write(f'#!/bin/sh\nexec "{sys.executable}" "{h.__file__}" "$@"\n')
  os.chmod(wrapper, 0o755)
  return h.env(XLA_FLAGS=_xla.xla_flags(devices=4), LLMJAX=wrapper,
               PATH=f"{FAKE}:{os.environ['PATH']}", **extra)


def _train_args(workdir: str, *extra: str) -> list[str]:
  return [f"--config={h.experiment_file()}:smoke", f"--workdir={workdir}", *h.TINY, *RUN_ARGS,
          *extra]


def _losses(workdir: str) -> dict[int, float]:
  return {step: r["loss"] for step, r in h.train_records(h.read_records(workdir)).items()}


def _wait(predicate, proc, timeout: float, what: str):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the job ended before {what}:\n" + "\n".join(h.output(proc))[-4000:])
    if time.monotonic() > deadline:
      raise AssertionError(f"no {what} after {timeout} s")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """2 tasks x 4 devices via sbatch/srun; SIGTERM to task 1 only; (rc, out, err, workdir)."""
  tmp = str(tmp_path_factory.mktemp("slurm"))
  workdir, pids = os.path.join(tmp, "run"), os.path.join(tmp, "pids")
  env = _cluster_env(tmp, FAKE_SRUN_PIDS=pids)
  proc = subprocess.Popen([os.path.join(FAKE, "sbatch"), "--ntasks-per-node=2", SBATCH,
                           *_train_args(workdir)], cwd=h.REPO, env=env,
                          stdout=open(tmp + "/job.out", "w"), stderr=open(tmp + "/job.err", "w"))
  proc.log_prefix = tmp + "/job"
  try:
    _wait(lambda: len(_losses(workdir)) >= SIGNAL_AFTER and os.path.exists(pids), proc, 240,
          f"{SIGNAL_AFTER} logged steps")
    task_pids = [int(p) for p in open(pids).read().split()]
    os.kill(task_pids[1], signal.SIGTERM)
    proc.wait(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  return (proc.returncode, *h.output(proc), workdir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run uninterrupted, on one process with 8 devices: {step: loss}."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  llmjax.train.run(_experiment(_train_args(workdir)), workdir)
  return _losses(workdir)


def _experiment(args: list[str]):
  """What `llmjax train ARGS` would run, resolved here (the smoke experiment + overrides)."""
  path = h.experiment_file()
  config = config_lib.experiment_module(os.path.basename(path), path).get_config("smoke")
  for arg in args:
    if arg.startswith("--config."):
      keys, value = arg[len("--config."):].split("=", 1)
      section, key = keys.split(".")
      old = config[section][key]
      config[section][key] = (value == "True" if isinstance(old, bool) else type(old)(value))
  return config_lib.resolve(config)


def test_slurm_job_is_detected_and_trains_like_one_process(preempted, reference):
  rc, out, err, workdir = preempted
  assert rc == 0, err[-4000:]
  assert "Submitted batch job" in out
  for i in range(2):  # found from SLURM's variables alone: no coordinator flags were given
    assert f"cluster from slurm: process {i} of 2" in err
  assert err.count("4 local / 8 global cpu devices") == 2
  losses = _losses(workdir)
  assert len(losses) >= SIGNAL_AFTER
  for step, loss in losses.items():
    np.testing.assert_allclose(loss, reference[step], rtol=1e-5, err_msg=f"step {step}")


def test_sigterm_to_one_process_stops_both_at_one_saved_step(preempted):
  rc, out, err, workdir = preempted
  assert rc == 0, err[-4000:]
  # Both processes print to the job's one output file: one's message may land between the
  # other's message and its newline, so the messages are found in the text, not line by line.
  stops = re.findall(r"preempted: checkpoint saved at step (\d+)", out)
  assert len(stops) == 2, out  # both processes, each exit 0 (the job's status is the highest)
  assert len(set(stops)) == 1, stops  # the same step
  step = int(stops[0])
  assert max(_losses(workdir)) == step  # nobody trained past it
  checkpoints = os.path.join(workdir, "checkpoints")
  assert h.committed_steps(checkpoints)[-1] == step
  assert h.leftovers(checkpoints) == []  # one directory per saved step, every one committed
  assert step < STEPS
  print(f"\nSIGTERM after step {SIGNAL_AFTER} or later; both processes stopped at step {step}")


def test_preempted_run_resumes_on_one_process_as_if_uninterrupted(preempted, reference,
                                                                  tmp_path):
  _, out, _, workdir = preempted
  stopped = max(_losses(workdir))
  resumed = str(tmp_path / "run")
  subprocess.run(["cp", "-r", workdir, resumed], check=True)
  result = llmjax.train.run(_experiment(_train_args(resumed)), resumed)  # 1 process x 8 devices
  assert result["step"] == STEPS
  losses = _losses(resumed)
  assert set(losses) == set(reference)
  for step in range(stopped + 1, STEPS + 1):
    np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5, err_msg=f"step {step}")


# ---- resolving the cluster (no processes started) ----

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[003-004]", "SLURM_NTASKS": "4",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.fixture
def clean_env(monkeypatch):
  for name in list(os.environ):
    if name.startswith(("SLURM_", "OMPI_", "JAX_")) or name == "CUDA_VISIBLE_DEVICES":
      monkeypatch.delenv(name)
  return monkeypatch


def test_flags_win_over_variables_and_detection(clean_env):
  for name, value in SLURM_STEP.items():
    clean_env.setenv(name, value)
  clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  clean_env.setenv("JAX_NUM_PROCESSES", "2")
  clean_env.setenv("JAX_PROCESS_ID", "1")
  assert distributed.resolve("h:1", 3, 2) == distributed.Cluster("flags", 3, 2, "h:1")
  assert distributed.resolve() == distributed.Cluster("environment", 2, 1, "10.0.0.1:1234")
  assert distributed.resolve(num_processes=1) == distributed.Cluster("flags")


def test_slurm_detection_and_local_devices(clean_env):
  for name, value in SLURM_STEP.items():
    clean_env.setenv(name, value)
  cluster = distributed.resolve()
  assert (cluster.source, cluster.num_processes, cluster.process_id) == ("slurm", 4, 3)
  assert cluster.coordinator_address == f"node003:{61440 + 4242 % 4096}"
  assert cluster.local_device_ids == (1,)  # 2 tasks on this node: the GPU at its local rank
  clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x4)")
  assert distributed.resolve().local_device_ids is None  # one task per node: all its GPUs
  clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "5")  # srun --gpus-per-task=1 shows each task one
  assert distributed.resolve().local_device_ids is None
  assert distributed.tasks_per_node("8(x2),4", 2) == 4
  assert distributed.tasks_per_node("8(x2),4", 3) is None


def test_single_process_when_nothing_describes_a_cluster(clean_env):
  assert distributed.resolve() == distributed.Cluster("single process")


@pytest.mark.parametrize("env, flags, message", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, {},
     "partial SLURM environment: SLURM_JOB_ID, SLURM_NTASKS set but SLURM_STEP_NODELIST, "
     "SLURM_PROCID, SLURM_LOCALID not"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, "partial Open MPI environment"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, {},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2}, "--process_id missing"),
    ({"JAX_COORDINATOR_ADDRESS": "pod-0.svc", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     {}, "JAX_COORDINATOR_ADDRESS='pod-0.svc' is not HOST:PORT"),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     r"--process_id=2 must be in \[0, --num_processes=2\)"),
])
def test_bad_cluster_descriptions_name_what_is_wrong(clean_env, env, flags, message):
  for name, value in env.items():
    clean_env.setenv(name, value)
  with pytest.raises(ClusterError, match=message):
    distributed.resolve(**flags)


def test_partial_slurm_environment_stops_train_before_anything_is_written(tmp_path):
  workdir = str(tmp_path / "run")
  rc, out, err = h.run(h.train_cmd(workdir), str(tmp_path / "log"), timeout=120,
                       SLURM_JOB_ID="7", SLURM_NTASKS="2")
  assert rc == 2, err[-2000:]
  assert err.strip().splitlines() == [
      "error: partial SLURM environment: SLURM_JOB_ID, SLURM_NTASKS set but "
      "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID not; start the processes with the "
      "scheduler's launcher (srun / mpirun), or pass --num_processes=1 to run one process here"]
  assert not os.path.exists(workdir)


# ---- failures across processes: one line, exit code 2 everywhere, or a quick non-zero exit ----

def _srun(tmp: str, command: list[str], name: str, **env) -> subprocess.Popen:
  """2 tasks through the fake srun (no --kill-on-bad-exit: each must end on its own)."""
  log = os.path.join(tmp, name)
  proc = subprocess.Popen([os.path.join(FAKE, "srun"), "-n", "2", *command], cwd=h.REPO,
                          env=_cluster_env(tmp, **env), stdout=open(log + ".out", "w"),
                          stderr=open(log + ".err", "w"))
  proc.log_prefix = log
  return proc


def _finished(proc, timeout: float = 180) -> tuple[int, str, str]:
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  return (proc.returncode, *h.output(proc))


def _errors(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("error:")]


def test_bad_multi_process_setups_stop_every_process_with_one_line(tmp_path):
  """Started together (they would take turns on the cores anyway); each ends by itself."""
  tmp = str(tmp_path)
  for host in ("host0", "host1"):
    os.makedirs(os.path.join(tmp, host))
  devices = _srun(tmp, ["sh", "-c", 'XLA_FLAGS=--xla_force_host_platform_device_count='
                        '$((4 - SLURM_PROCID)) exec "$0" -m llmjax.distributed', sys.executable],
                  "devices")
  mesh = _srun(tmp, ["sh", "-c", 'exec "$LLMJAX" train "$@"', "sh",
                     *_train_args(os.path.join(tmp, "mesh-run"), "--config.mesh.fsdp=6")], "mesh")
  # Each process's workdir "run" is relative to its own directory: not shared.
  unshared = _srun(tmp, ["sh", "-c", f'cd "{tmp}/host$SLURM_PROCID" && exec "$LLMJAX" train "$@"',
                         "sh", *_train_args("run")], "unshared")

  rc, _, err = _finished(devices)
  assert rc == 2 and _errors(err) == 2 * [
      "error: processes see different numbers of local devices (process 0: 4, process 1: 3); "
      "every process must drive the same number (check XLA_FLAGS, CUDA_VISIBLE_DEVICES and "
      "the launcher's GPUs per task)"], err[-3000:]

  rc, _, err = _finished(mesh)
  assert rc == 2 and _errors(err) == 2 * [
      "error: config.mesh data*fsdp*tensor = 6 ({'data': 1, 'fsdp': 6, 'tensor': 1}) but there "
      "are 8 devices; set one of them to -1 to fill"], err[-3000:]
  assert not os.path.exists(os.path.join(tmp, "mesh-run"))

  rc, _, err = _finished(unshared)
  assert rc == 2 and sorted(_errors(err)) == [  # each names the directory it was given
      f"error: --workdir={tmp}/host{i}/run is not shared between processes: process(es) 1 cannot "
      "see what process 0 wrote there; use a directory on a filesystem every host mounts at the "
      "same path" for i in range(2)], err[-3000:]
  assert os.listdir(os.path.join(tmp, "host0")) == [] == os.listdir(os.path.join(tmp, "host1"))


def test_a_killed_process_ends_the_others_within_the_heartbeat_timeout(tmp_path):
  tmp, heartbeat = str(tmp_path), 5
  workdir, pids = os.path.join(tmp, "run"), os.path.join(tmp, "pids")
  proc = _srun(tmp, ["sh", "-c", 'exec "$LLMJAX" train "$@"', "sh", *_train_args(workdir),
                     f"--heartbeat_timeout={heartbeat}"], "killed", FAKE_SRUN_PIDS=pids)
  try:
    _wait(lambda: len(_losses(workdir)) >= 2 and os.path.exists(pids), proc, 180, "2 steps")
    task_pids = [int(p) for p in open(pids).read().split()]
    os.kill(task_pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait(timeout=heartbeat + 60)  # the fake srun returns when both tasks have ended
    waited = time.monotonic() - killed_at
  finally:
    if proc.poll() is None:
      proc.kill()
  _, err = h.output(proc)
  assert "srun: error: localhost: task 1: Killed" in err
  # Process 0 failed by itself (an exception, or jax aborting it when the coordination service
  # reports the peer dead): srun has a line only for a non-zero status.
  survivor = [line for line in err.splitlines() if "task 0:" in line]
  assert survivor and "Killed" not in survivor[0], err[-3000:]
  print(f"\nprocess 0 ended {waited:.1f} s after process 1 was killed (heartbeat timeout "
        f"{heartbeat} s)")


SIGINT_PROBE = """
import os, signal, sys
from llmjax import distributed
distributed.join(distributed.resolve())
import jax
from jax.experimental import multihost_utils
from llmjax.train import preemption

class Checkpointer:  # what the loop asks of orbax's manager here
  reached_preemption = staticmethod(multihost_utils.reached_preemption_sync_point)

with preemption.Listener() as listener:
  for step in range(1, 2000):
    multihost_utils.sync_global_devices(str(step))  # steps in lockstep, as training's are
    if listener.should_stop(Checkpointer, step):
      print(f"process {jax.process_index()} stops at step {step}", flush=True)
      break
    if step == 5 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in one process's terminal
"""


def test_sigint_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """jax watches SIGTERM only; the loop's listener turns SIGINT into it."""
  rc, out, err = _finished(_srun(str(tmp_path), [sys.executable, "-c", SIGINT_PROBE], "sigint"))
  assert rc == 0, err[-3000:]
  stops = dict(re.findall(r"process (\d) stops at step (\d+)", out))  # lines may interleave
  assert set(stops) == {"0", "1"} and stops["0"] == stops["1"], out


HF_SAVE_PROBE = """
import sys
from llmjax import distributed
distributed.join(distributed.resolve())
import jax
from llmjax import hf
from llmjax.config import MeshConfig
from llmjax.parallel import mesh as meshlib
mesh = meshlib.make_mesh(MeshConfig(data=1, fsdp=8))
model, params = hf.load(sys.argv[1], mesh=mesh, rules="fsdp")
split = [x for x in jax.tree.leaves(params) if not x.is_fully_addressable]
print(f"process {jax.process_index()}: {len(split)} arrays split across processes", flush=True)
hf.save(model, params, sys.argv[2])
"""


def test_hf_save_from_a_multi_process_run_writes_the_whole_model_once(tmp_path):
  import _hf_helpers
  from safetensors.numpy import load_file
  source, saved = tmp_path / "llama", tmp_path / "saved"
  _hf_helpers.make("llama_gqa_untied", source)
  rc, out, err = _finished(_srun(str(tmp_path), [sys.executable, "-c", HF_SAVE_PROBE,
                                                 str(source), str(saved)], "hf-save"))
  assert rc == 0, err[-3000:]
  split = re.findall(r"process \d: (\d+) arrays split across processes", out)
  assert len(split) == 2 and int(split[0]) > 0, out  # FSDP over both processes' devices
  want, got = load_file(source / "model.safetensors"), load_file(saved / "model.safetensors")
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
