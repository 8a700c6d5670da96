"""Test setup: 8 simulated CPU devices (set before jax is imported), strict numerics, one
compilation cache for every process (kept between runs), and the trained runs that several test
files share."""

import gc
import os

import _xla

# 8 simulated devices, and XLA flags that halve each compile (tests/_xla.py says why).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_xla.xla_flags(devices=8)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same tiny programs again: every run of the loop
# jits its init and steps afresh, many tests run the same tiny experiment, and the CLI tests start
# processes that compile what an earlier command of the same test compiled. One persistent cache
# is shared by every process: the pytest-xdist workers and every subprocess they start inherit it
# through the environment (set here, before jax is imported). It lives in the checkout
# (.jax-test-cache/, ignored by git) and outlives the session, so a developer's next run of the
# suite compiles only what changed (a second run of test_multitask: 50 -> 38 CPU-s); a fresh
# clone starts empty. A hit cannot change a result: the key is the program itself with its compile
# options, devices, XLA flags and jax/XLA versions, so a hit returns what compiling would.
# LLMJAX_TESTS_JIT_CACHE=DIR puts it elsewhere.
_CACHE = os.environ.setdefault(
    "LLMJAX_TESTS_JIT_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax-test-cache"))
# Programs that compile in under a tenth of a second (single operations run eagerly, a thousand
# of them in a run of the suite) are not written: storing one costs about what compiling it does.
os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.1",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
# No size limit inside jax: with one, every write takes a lock and then lists, stats and reads
# the timestamp of every entry to decide what to evict (0.15 CPU-s per write with the 2,600
# entries one fresh run of the suite leaves; every write of the run paid for all the entries
# before it). The bound is kept here instead, once per session (below). Without jax's lock a
# reader may meet an entry another process is still writing: jax then warns, compiles, and goes
# on with the same program.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = "-1"
# Python's cycle collector ran 4,200 times over tests/test_finetune.py and test_early_stop.py and
# took 7 of their 98 CPU-seconds: tracing makes and drops many small objects, and at the default
# threshold (every 700 new objects) the collector walks jax's caches and the suite's modules again
# and again. Every 50,000, with what the imports and the collection made frozen out of its way
# (pytest_collection_finish), it takes 2; tests/test_moe.py, test_resnet.py, test_hf_bart.py and
# test_distill.py take 8-10% less CPU (two rounds, taking turns; 2026-12-07). The CLI processes
# the tests start collect alike (llmjax.cli.main.collect_less_often).
os.environ.setdefault("LLMJAX_GC_THRESHOLD", "50000")
# XLA's backend (LLVM) optimisations cost a third of each compile of these tiny programs and buy
# nothing at their size. They are off for the tests and the processes the tests start, never for
# users; tests compare results within the session, or with other libraries within a tolerance.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Every operation of a lowered program carries the Python call stack that made it (10 frames by
# default) as its location, and XLA converts and carries them through every pass: without them a
# tiny LM's init and train step compile 8% and 12% faster (medians of five compiles, three
# rounds taking turns; 2026-12-07), tests/test_moe_train.py with test_early_stop.py take 2-3%
# less CPU (two rounds, cold cache). They only feed error messages and profiles: the compilation
# cache's key strips them, and the tests' losses are bitwise the same with and without them
# (lm, seq2seq and classify runs). The tests and the processes they start keep only the name
# stack; users keep jax's default.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
_CACHE_BYTES = 2 << 30


def _bound_cache(directory: str, limit: int) -> None:
  """Delete the least recently written entries until the cache holds at most `limit` bytes."""
  entries = sorted((e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory)
                   if e.name.endswith("-cache")) if os.path.isdir(directory) else []
  total = sum(size for _, size, _ in entries)
  for _, size, path in entries:
    if total <= limit:
      break
    os.remove(path)
    total -= size


if "PYTEST_XDIST_WORKER" not in os.environ:  # once, in the process that starts the workers
  _bound_cache(_CACHE, _CACHE_BYTES)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Experiments name their task by name, and the registry fills when llmjax.tasks is imported (the
# CLI imports it); tests resolve experiments directly, so every test file, run alone or after any
# other, finds the built-in tasks registered.
import llmjax.tasks  # noqa: E402,F401
from llmjax.cli.main import collect_less_often  # noqa: E402

collect_less_often()  # this worker too (LLMJAX_GC_THRESHOLD, above)


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
  """_task_helpers.experiment("lm") trained once for the session (4 steps, a checkpoint at 4,
  samples.txt of one prompt): its workdir. Read it, never write to it: test_distill's teacher,
  and the LM run that test_finetune's and test_tasks' classifiers start from (each used to train
  this same run)."""
  import llmjax.train
  from _task_helpers import experiment
  tmp = tmp_path_factory.mktemp("lm_run")
  workdir = tmp / "run"
  llmjax.train.run(experiment("lm", tmp, train=dict(sample_prompts=1)), str(workdir))
  return workdir


# `make test` runs the suite on two pytest-xdist workers (`-n 2`). Each worker takes a whole group
# of files at a time: one file (its module fixtures are built once), or files that share
# something: the checkpoint tests share _ckpt_helpers' reference run, and the multi-process tests
# (ports, timeouts) run one at a time. Groups are handed out longest first, so that no long one
# starts last while the other worker idles (a stale order costs minutes, never a result).
_GROUPS = {"test_resume.py": "checkpoints", "test_checkpoint.py": "checkpoints",
           "test_clusters.py": "clusters", "test_launch_clusters.py": "clusters"}
_LONGEST_FIRST = ("test_config.py", "test_finetune.py", "checkpoints", "test_tasks.py",
                  "test_seq2seq.py", "clusters", "test_quant.py", "test_distill.py", "test_train.py",
                  "test_dpo.py", "test_reproducible.py", "test_image_task.py", "test_sft.py",
                  "test_benchmarks.py", "test_rnn.py", "test_moe_train.py", "test_early_stop.py",
                  "test_dpo_shared.py", "test_quant_conv.py",
                  "test_peft.py", "test_multitask.py", "test_hf_moe.py", "test_generate.py",
                  "test_gan.py", "test_weights.py", "test_hf_families.py")


def _group(nodeid: str) -> str:
  name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
  return _GROUPS.get(name, name)


def pytest_collection_finish(session):
  """What the imports and the collection made lives as long as the worker: out of the
  collector's way."""
  gc.collect()
  gc.freeze()


def pytest_collection_modifyitems(config, items):
  """The longest groups first (a stable sort: every file's tests keep their order)."""
  rank = {group: i for i, group in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Under `-n N` (xdist's `--dist load`), whole groups per worker in collection order."""
  if config.getvalue("dist") != "load":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class Groups(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _group(nodeid)

  config.option.loadscopereorder = False  # the order is pytest_collection_modifyitems'
  return Groups(config, log)
