"""llmjax train --config=experiments/lm/stdlib_gpt.py[:smoke] --workdir=DIR [--config.a.b=v]."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from llmjax import config as config_lib
from llmjax.cli import common
from llmjax.errors import TrainingError, print_error

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:arg].",
                                          lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; re-running with it resumes.",
                               flag_values=FLAGS)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0. With --num_processes and --process_id it overrides the cluster "
    "otherwise found in JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID or detected "
    "(SLURM, Open MPI, Cloud TPU, GKE).", flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run; 1 alone: one process, no detection.",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=FLAGS)
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300,
                                     "Seconds to wait for every process to join.",
                                     flag_values=FLAGS)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as dead "
    "and the others stop.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  if not common.wants_help(argv, FLAGS):
    # Registers every task's config section (config.task.KEY) before --config's experiment file
    # builds its base_config(); not for --help, which stays free of jax.
    from llmjax import tasks  # noqa: F401
  common.parse_flags(argv)
  if _CONFIG.value is None:
    common.fail("--config=FILE is required (e.g. --config=experiments/lm/stdlib_gpt.py)")
  if not _WORKDIR.value:
    common.fail("--workdir=DIR is required")
  common.check_directory_flag("workdir", _WORKDIR.value)
  with common.user_errors():
    exp = config_lib.resolve(_CONFIG.value)
    from llmjax import distributed
    cluster = distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  init_timeout=_INIT_TIMEOUT.value)
    distributed.join(cluster, initialization_timeout=_INIT_TIMEOUT.value,
                     heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    from llmjax import train  # heavy imports only after the flags are known to be good
    try:
      result = train.run(exp, _WORKDIR.value)
    except TrainingError as e:
      print_error(str(e))
      sys.exit(1)
  workdir = os.path.abspath(_WORKDIR.value)
  if result.get("preempted"):
    print(f"preempted: checkpoint saved at step {result['step']} in {workdir}/checkpoints; "
          "run the same command again to resume")
    return
  print(f"{result['headline']} at step {result['step']}")
  standard = ("metrics.jsonl", "tensorboard", "checkpoints", "plots")
  own = sorted(set(os.listdir(workdir)) - set(standard)
               - {"config.json", "task_info.json", "params.json"})
  print(f"outputs: {workdir}/ ({', '.join(standard)}; the task's own: {', '.join(own) or 'none'})")


if __name__ == "__main__":
  main()
