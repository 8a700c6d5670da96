"""Test setup: 8 simulated CPU devices (set before jax is imported), strict numerics, one
compilation cache per session, and the trained runs that several test files share."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Most of the suite's time is XLA compiling the same tiny programs again: every run of the loop
# jits its init and steps afresh, and many tests run the same tiny experiment. A persistent
# cache, new and empty for each session, hands back the executable compiled earlier in the
# session for an identical program (the key is the program, its options and the devices). In
# this process only: subprocesses compile as a user's would.
_CACHE = tempfile.mkdtemp(prefix="llmjax-tests-jit-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def lora_lm_run(tmp_path_factory):
  """_task_helpers.lora_experiment trained once for the session: (experiment, workdir). Read
  it, never write to it: test_finetune compares a resumed run with it, test_peft exports it."""
  import llmjax.train
  from _task_helpers import lora_experiment
  tmp = tmp_path_factory.mktemp("lora_lm_run")
  exp = lora_experiment(tmp)
  llmjax.train.run(exp, str(tmp / "run"))
  return exp, tmp / "run"


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory):
  """_task_helpers.experiment("lm") trained once for the session (4 steps, a checkpoint at 4):
  its workdir. Read it, never write to it: test_distill's teacher, and the LM run that
  test_finetune's and test_tasks' classifiers start from (each used to train this same run)."""
  import llmjax.train
  from _task_helpers import experiment
  tmp = tmp_path_factory.mktemp("lm_run")
  workdir = tmp / "run"
  llmjax.train.run(experiment("lm", tmp), str(workdir))
  return workdir
