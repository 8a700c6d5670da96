"""Which processes make up a run, and joining them with `jax.distributed` before jax starts.

The cluster is resolved in this order; the first that applies wins:
1. explicit flags: `--coordinator_address`, `--num_processes`, `--process_id`
   (`--num_processes=1` alone: one process, whatever the environment says);
2. the variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (what the Kubernetes
   manifests in launch/k8s/ set);
3. jax's own cluster detection: SLURM, Open MPI, Cloud TPU VMs, GKE TPU slices;
4. otherwise one process.
A partial environment (some of a scheduler's variables set, others missing) is an error naming
them: never a silent fall back to one process, nor a hang waiting for peers that never come.

`python -m llmjax.distributed` joins the cluster its environment describes, prints one line per
process and exits: a check of a launch script's wiring that costs seconds, not a compile.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import secrets
import sys
from collections.abc import Mapping

import jax
import numpy as np
from jax._src import cloud_tpu_init
from jax._src import clusters  # no public API exposes the detectors themselves
from jax._src import distributed as jax_distributed  # the client has no public accessor
from jax.experimental import multihost_utils

from llmjax.errors import UserError, print_error

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# What jax's detectors read, per scheduler: with only some of them set a job cannot be joined
# (jax then either falls back to one process silently or fails with a KeyError: jax #30073).
SCHEDULER_VARS = {
    "SLURM": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID"),
    "Open MPI": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK"),
}


class ClusterError(UserError):
  """A cluster that cannot be joined as described; the message names the flag or variable."""


@dataclasses.dataclass(frozen=True)
class Cluster:
  """This process's place in the run."""
  source: str  # flags | environment | slurm | ompi | gcetpu | gketpu | single process
  num_processes: int = 1
  process_id: int = 0
  coordinator_address: str | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: every local device

  def describe(self) -> str:
    where = f", coordinator {self.coordinator_address}" if self.coordinator_address else ""
    devices = ("" if self.local_device_ids is None
               else f", local device ids {','.join(map(str, self.local_device_ids))}")
    return f"cluster from {self.source}: process {self.process_id} of {self.num_processes}" \
           f"{where}{devices}"


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ClusterError(f"{name}={value!r} is not an integer") from None


def _checked(cluster: Cluster, names: tuple[str, str, str]) -> Cluster:
  if cluster.coordinator_address is not None and not re.fullmatch(
      r"(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):\d{1,5}", cluster.coordinator_address):
    raise ClusterError(f"{names[2]}={cluster.coordinator_address!r} is not HOST:PORT")
  if cluster.num_processes < 1 or not 0 <= cluster.process_id < cluster.num_processes:
    raise ClusterError(f"{names[1]}={cluster.process_id} must be in [0, {names[0]}="
                       f"{cluster.num_processes})")
  return cluster


def _from_flags(coordinator_address, num_processes, process_id) -> Cluster | None:
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if all(v is None for v in given.values()):
    return None
  if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
    return Cluster("flags")
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ClusterError(f"{', '.join(missing)} missing: --coordinator_address, --num_processes "
                       "and --process_id go together (or give none and let the cluster be "
                       "detected; --num_processes=1 alone runs one process)")
  return _checked(Cluster("flags", num_processes, process_id, coordinator_address),
                  ("--num_processes", "--process_id", "--coordinator_address"))


def _from_variables(env: Mapping[str, str]) -> Cluster | None:
  present = [v for v in ENV_VARS if env.get(v)]
  if not present:
    return None
  if len(present) < len(ENV_VARS):
    missing = [v for v in ENV_VARS if v not in present]
    raise ClusterError(f"{', '.join(present)} set but {', '.join(missing)} not: set all three "
                       "(or none, to let the cluster be detected)")
  cluster = Cluster("environment", _int(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES"),
                    _int(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID"), env["JAX_COORDINATOR_ADDRESS"])
  return _checked(cluster, ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"))


def check_scheduler_variables(env: Mapping[str, str]) -> None:
  """ClusterError when a scheduler's variables are only partly set (e.g. ssh into a job's node)."""
  for scheduler, names in SCHEDULER_VARS.items():
    present = [n for n in names if n in env]
    if present and len(present) < len(names):
      missing = [n for n in names if n not in env]
      raise ClusterError(
          f"partial {scheduler} environment: {', '.join(present)} set but {', '.join(missing)} "
          f"not; start the processes with the scheduler's launcher (srun / mpirun), or pass "
          f"--num_processes=1 to run one process here")


def tasks_per_node(spec: str, node_index: int) -> int | None:
  """SLURM's compressed count list ('2(x3),1': nodes 0-2 run 2 tasks, node 3 one) at a node."""
  counts = []
  for part in spec.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not match:
      return None
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts[node_index] if 0 <= node_index < len(counts) else None


def _tasks_on_this_node(source: str, env: Mapping[str, str]) -> int | None:
  if source == "slurm":
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    return tasks_per_node(spec, int(env.get("SLURM_NODEID", "0"))) if spec else None
  if source == "ompi" and env.get("OMPI_COMM_WORLD_LOCAL_SIZE"):
    return int(env["OMPI_COMM_WORLD_LOCAL_SIZE"])
  return None


def local_device_ids(local_rank: int | None, tasks_on_node: int | None,
                     env: Mapping[str, str]) -> tuple[int, ...] | None:
  """The local accelerators this process drives (None: all it can see).

  One process per node drives every device there: jax's SLURM / Open MPI default would give it
  only the device at its local rank (jax #16788). Several processes per node each drive the device
  at their local rank, as jax does, unless the scheduler already shows each process one device
  (`srun --gpus-per-task=1` narrows CUDA_VISIBLE_DEVICES; rank 1 would not exist: jax #23452).
  """
  if local_rank is None or tasks_on_node == 1:
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == 1:
    return None
  return (local_rank,)


def _detected(init_timeout: int, env: Mapping[str, str]) -> Cluster | None:
  """jax's detectors (they read os.environ; the metadata server on TPU VMs)."""
  found = next((c for c in clusters.ClusterEnv._cluster_types
                if not c.opt_in_only_method and c.is_env_present()), None)
  if found is None:
    return None
  address = found.get_coordinator_address(timeout_secs=init_timeout,
                                          override_coordinator_port=env.get("JAX_COORDINATOR_PORT"))
  local = None
  if not cloud_tpu_init.running_in_cloud_tpu_vm:  # TPU hosts always drive all their chips
    local = local_device_ids(found.get_local_process_id(), _tasks_on_this_node(found.name, env),
                             env)
  return _checked(Cluster(found.name, found.get_process_count(), found.get_process_id(), address,
                          local), (f"{found.name} process count", f"{found.name} process id",
                                   f"{found.name} coordinator address"))


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, env: Mapping[str, str] | None = None,
            init_timeout: int = 300) -> Cluster:
  """Flags, then JAX_* variables, then jax's detection, then one process (module docstring)."""
  env = os.environ if env is None else env
  explicit = _from_flags(coordinator_address, num_processes, process_id) or _from_variables(env)
  if explicit:
    return explicit
  check_scheduler_variables(env)
  return _detected(init_timeout, env) or Cluster("single process")


def join(cluster: Cluster, *, initialization_timeout: int = 300,
         heartbeat_timeout: int = 100) -> None:
  """jax.distributed.initialize for several processes; then every process must agree.

  Call before anything touches a jax backend. CPU processes exchange arrays over gloo.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # read by the CPU backend only
  if cluster.num_processes > 1:
    try:
      jax.distributed.initialize(
          cluster.coordinator_address, cluster.num_processes, cluster.process_id,
          local_device_ids=None if cluster.local_device_ids is None else
          list(cluster.local_device_ids),
          cluster_detection_method="deactivate",  # resolved above, local devices included
          initialization_timeout=initialization_timeout,
          heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as e:
      raise ClusterError(f"could not join the cluster ({cluster.describe()}) within "
                         f"--initialization_timeout={initialization_timeout}s: "
                         f"{_first_line(e)}") from e
  _check_device_counts()
  if cluster.source != "single process":  # a plain local run stays quiet (errors: one line)
    print(summary(cluster), file=sys.stderr, flush=True)


def summary(cluster: Cluster) -> str:
  """The cluster and the devices it gave this process (after `join`)."""
  return (f"{cluster.describe()}; {jax.local_device_count()} local / {jax.device_count()} "
          f"global {jax.devices()[0].platform} devices")


def _first_line(error: Exception) -> str:
  return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


_exchanges = itertools.count()


def all_processes(value: str, *, timeout_s: int = 300) -> list[str]:
  """Every process's `value`, in process order (the coordination service's key-value store).

  Goes through the coordinator, not the devices, so it works where a collective would not (a
  process with another device count) and fails after `timeout_s` instead of hanging.
  """
  if jax.process_count() == 1:
    return [value]
  client = jax_distributed.global_state.client
  name = f"llmjax/exchange/{next(_exchanges)}"
  client.key_value_set(f"{name}/{jax.process_index():06d}", value)
  client.wait_at_barrier(name, timeout_s * 1000)
  return [v for _, v in sorted(client.key_value_dir_get(f"{name}/"))]


def _check_device_counts() -> None:
  counts = [int(c) for c in all_processes(str(jax.local_device_count()))]
  if len(set(counts)) > 1:
    listed = ", ".join(f"process {i}: {c}" for i, c in enumerate(counts))
    raise ClusterError(f"processes see different numbers of local devices ({listed}); every "
                       "process must drive the same number (check XLA_FLAGS, CUDA_VISIBLE_DEVICES "
                       "and the launcher's GPUs per task)")


def check_shared_directory(path: str) -> None:
  """ClusterError unless every process sees the same `path` (checkpoints are written by all).

  Process 0 writes a token there and the others look for it. A directory local to each host
  would leave each one part of every checkpoint (orbax #999); this finds it before training.
  """
  if jax.process_count() == 1:
    return
  path = os.path.abspath(path)
  main = jax.process_index() == 0
  created = main and not os.path.exists(path)
  token = all_processes(secrets.token_hex(8) if main else "")[0]
  probe = os.path.join(path, f".llmjax-shared-{token}")
  written = ""
  if main:
    try:
      os.makedirs(path, exist_ok=True)
      with open(probe, "w") as f:
        f.write(token)
    except OSError as e:  # told to every process, so none waits for a probe that never comes
      written = str(e.strerror or e)
  problem = all_processes(written)[0]
  if problem:
    raise ClusterError(f"--workdir={path}: process 0 cannot write there: {problem}")
  try:
    with open(probe) as f:
      seen = f.read() == token
  except OSError:
    seen = False
  found = all_processes("1" if seen else "0")
  if main:
    os.remove(probe)
  blind = [str(i) for i, ok in enumerate(found) if ok != "1"]
  if blind:
    if created and main and not os.listdir(path):
      os.rmdir(path)  # nothing half-made
    raise ClusterError(f"--workdir={path} is not shared between processes: process(es) "
                       f"{', '.join(blind)} cannot see what process 0 wrote there; use a "
                       "directory on a filesystem every host mounts at the same path")


def to_host(tree):
  """Every array of `tree` whole, as numpy, on this process.

  With several processes an array split across them is gathered: a collective, so every process
  must call this with the same tree.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(whole, tree)


def main() -> None:
  """Join the cluster the environment describes, print this process's line, leave."""
  try:
    cluster = resolve()
    join(cluster)
    if cluster.source == "single process":
      print(summary(cluster), file=sys.stderr, flush=True)
  except ClusterError as e:
    print_error(str(e))
    sys.exit(2)


if __name__ == "__main__":
  main()
