"""Shared pieces of the checkpoint and resume tests: a tiny real training command run as a
subprocess, one reference run per session, and readers for what a run leaves on disk.

Run as a script it is the `llmjax` CLI itself (`python tests/_ckpt_helpers.py train ...`), with two
test-only changes: torch is hidden from the process (tensorboardX imports torch when it can, which
costs seconds per start and changes nothing that is written), and LLMJAX_TEST_POISON_STEPS=3,4
gives the batches of those steps (1-based, counted from a fresh start) a NaN example weight.
`python tests/_ckpt_helpers.py failing-save MODE DIR` is a save into an unwritable place.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import _xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def session_dir() -> str:
  """One scratch directory per test process: the experiment file's copy and the reference run."""
  path = tempfile.mkdtemp(prefix="llmjax-ckpt-tests-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


STEPS = 40  # of the reference run and the interrupted chains
BATCH = 8
TINY = ("--config.data.max_bytes=50000", "--config.model.d_model=32", "--config.model.n_layers=1",
        "--config.model.d_ff=64", "--config.data.seq_len=32", "--config.model.max_len=32",
        f"--config.train.batch_size={BATCH}", "--config.train.eval_batches=1",
        "--config.train.sample_tokens=4", "--config.train.progress=False")
# Every step logged (so every loss can be compared) and checkpointed (so most moments of a run
# fall inside an asynchronous save); no evaluation until the end.
EVERY_STEP = (f"--config.train.steps={STEPS}", "--config.train.log_every=1",
              "--config.train.checkpoint_every=1", "--config.train.eval_every=100000")


def env(**extra) -> dict:
  """One CPU device (the 8 simulated ones are for the in-process tests); the session's jit cache
  comes with os.environ (conftest)."""
  e = dict(os.environ, XLA_FLAGS=_xla.xla_flags(), JAX_PLATFORMS="cpu")
  e.pop("LLMJAX_TEST_POISON_STEPS", None)
  e.update(extra)
  return e


def cli(verb: str, *args: str) -> list[str]:
  return [sys.executable, os.path.abspath(__file__), verb, *args]


@functools.cache
def experiment_file() -> str:
  """experiments/lm/stdlib_gpt.py as it was when the session first needed it: every run of the
  session (reference, resumed, corrupted) must be the same command even if the file is edited."""
  path = os.path.join(session_dir(), "stdlib_gpt.py")
  shutil.copyfile(os.path.join(REPO, "experiments", "lm", "stdlib_gpt.py"), path)
  return path


def train_cmd(workdir: str, *overrides: str) -> list[str]:
  return cli("train", f"--config={experiment_file()}:smoke", f"--workdir={workdir}",
             *TINY, *EVERY_STEP, *overrides)


def launch(cmd: list[str], log_prefix: str, **env_extra) -> subprocess.Popen:
  """Start `cmd` from the repo root; stdout/stderr go to LOG_PREFIX.out/.err (no pipe to fill)."""
  out, err = open(log_prefix + ".out", "w"), open(log_prefix + ".err", "w")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=out, stderr=err)
  out.close()
  err.close()
  proc.log_prefix = log_prefix
  return proc


def output(proc) -> tuple[str, str]:
  with open(proc.log_prefix + ".out") as f, open(proc.log_prefix + ".err") as g:
    return f.read(), g.read()


def run(cmd: list[str], log_prefix: str, timeout: float = 300, **env_extra):
  """(returncode, stdout, stderr) of a finished command."""
  proc = launch(cmd, log_prefix, **env_extra)
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return (proc.returncode, *output(proc))


@functools.cache
def reference_run() -> str:
  """The uninterrupted run every resumed run is compared with (run once per session)."""
  workdir = os.path.join(session_dir(), "reference")
  rc, out, err = run(train_cmd(workdir), workdir + "-log")
  assert rc == 0, f"reference run failed ({rc}):\n{out}\n{err[-3000:]}"
  return workdir


# ---- what a run leaves on disk ----

def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl records; a line being written right now (no newline yet) is left out."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def train_records(records: list[dict]) -> dict[int, dict]:
  """{step: train record}; a step logged twice in one history is an error."""
  train = [r for r in records if r["split"] == "train"]
  steps = [r["step"] for r in train]
  assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
  return {r["step"]: r for r in train}


DETERMINISTIC = ("loss", "grad_norm", "lr", "nonfinite_steps")


def deterministic(record: dict) -> dict:
  """The fields of a train record that do not depend on timing."""
  return {k: record[k] for k in DETERMINISTIC}


def committed_steps(checkpoint_dir: str) -> list[int]:
  """Step directories orbax has committed (an unfinished save is a '<step>.orbax-...-tmp' dir)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit())


def leftovers(checkpoint_dir: str) -> list[str]:
  """Entries of a checkpoint directory that are not committed steps (partial saves)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(n for n in os.listdir(checkpoint_dir) if not n.isdigit())


def model_setup(workdir: str):
  """(abstract state, shardings) of the run in `workdir`, on one device."""
  import jax

  from llmjax import config as config_lib
  from llmjax.parallel import mesh as meshlib, sharding
  from llmjax.tasks.lm import LM
  from llmjax.train import init, optim

  with open(os.path.join(workdir, "config.json")) as f:
    exp = config_lib.from_json(f.read())
  mesh = meshlib.make_mesh(config_lib.MeshConfig(data=1), devices=jax.devices()[:1])
  tx = optim.make_optimizer(exp.optim, exp.train.steps)
  task = LM(exp)
  init_variables = init.variables_init(task, task.model(), task.example_batch(1))
  return init.state_shardings(init_variables, tx, mesh, sharding.rules_for("dp"))


def flat(tree) -> dict:
  """{path: numpy array} of a pytree."""
  import jax
  import numpy as np

  from llmjax.treepaths import path_str
  return {path_str(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b, what: str = "") -> None:
  """Bitwise equality of two pytrees (same paths, dtypes, shapes and bytes)."""
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), f"{what}: different paths {sorted(set(fa) ^ set(fb))[:5]}"
  for path in fa:
    x, y = fa[path], fb[path]
    assert x.dtype == y.dtype and x.shape == y.shape, \
        f"{what}: {path} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
    assert x.tobytes() == y.tobytes(), f"{what}: {path} differs"


def restore(checkpoint_dir: str, step: int, setup):
  """(state, data_state, config) of `step`, verified by the library's Checkpointer."""
  from llmjax import checkpoint

  ckpt = checkpoint.Checkpointer(checkpoint_dir, keep=1_000_000)
  try:
    return ckpt.restore(step, *setup)
  finally:
    ckpt.close()


def batches_consumed(data_state: dict) -> int:
  """How many global batches the saved grain iterator has handed out (the same on every process)."""
  return int(json.loads(data_state["grain"])["next_index"])


def wait_for_file_records(workdir: str, n: int, proc, after_step: int, old_inode,
                          timeout: float = 240.0, poll: float = 0.005):
  """Wait until this launch has logged `n` train records past `after_step`.

  A resumed run rewrites metrics.jsonl (new inode) truncated to its restored step, so records
  past `after_step` in a file with a new inode are this launch's. Returns the times at which the
  first and the n-th record were seen, or None if the process ended first.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout
  first = None
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return None
    try:
      inode = os.stat(path).st_ino
    except FileNotFoundError:
      inode = None
    if inode is not None and inode != old_inode:
      count = sum(1 for r in read_records(workdir)
                  if r["split"] == "train" and r["step"] > after_step)
      if count and first is None:
        first = time.monotonic()
      if count >= n:
        return first, time.monotonic()
    time.sleep(poll)
  raise AssertionError(f"no training progress in {workdir} after {timeout}s")


# ---- the CLI, as a script ----

class _Poisoned:
  """A training iterator whose batches carry per-example weights, NaN on chosen steps."""

  def __init__(self, inner, steps: set[int]):
    self.inner, self.steps, self.count = inner, steps, 0

  def __iter__(self):
    return self

  def __next__(self):
    import numpy as np

    batch = dict(next(self.inner))
    self.count += 1
    weights = np.ones(len(batch["tokens"]), np.float32)
    if self.count in self.steps:
      weights[0] = np.nan
    batch["weights"] = weights
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    return self.inner.set_state(state)


def _install_poison(spec: str) -> None:
  from llmjax.train import loop

  steps = {int(s) for s in spec.split(",") if s}
  original = loop._data_iterator
  loop._data_iterator = lambda s, data_state: _Poisoned(original(s, data_state), steps)


def failing_save(mode: str, base: str) -> None:
  """Make a Checkpointer under `base`, make its directory unwritable, save twice, report.

  We run as root, so permission bits would not stop a write. What does:
    file:      the checkpoint directory is replaced by a regular file (ENOTDIR, for root too);
    immutable: `chattr +i` on the directory (EPERM for root too; the test removes the flag);
    full:      `base` is a tiny tmpfs the test mounted, and the state does not fit (ENOSPC).
  """
  import jax
  import numpy as np

  from llmjax.checkpoint import Checkpointer, CheckpointError

  directory = os.path.join(base, "checkpoints")
  ckpt = Checkpointer(directory, keep=2)
  ckpt.wait()
  if mode == "file":
    shutil.rmtree(directory)
    with open(directory, "w"):
      pass
  elif mode == "immutable":
    subprocess.run(["chattr", "+i", directory], check=True)
  size = 1 << 18 if mode == "full" else 16  # 1 MiB of incompressible floats for a 256 KiB disk
  state = {"w": jax.numpy.asarray(np.random.default_rng(0).standard_normal(size, np.float32))}
  raised = "nothing"
  try:
    for call in ("save(1)", "save(2)", "close()"):
      raised = call
      if call == "close()":
        ckpt.close()
      else:
        ckpt.save(int(call[5]), state, {}, {})
    print("no error", flush=True)
  except CheckpointError as e:
    print(f"CheckpointError from {raised}: {e}", flush=True)
  print("done", flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "failing-save":
    failing_save(sys.argv[2], sys.argv[3])
    sys.exit(0)
  sys.modules["torch"] = None  # see the module docstring
  if os.environ.get("LLMJAX_TEST_POISON_STEPS"):
    _install_poison(os.environ["LLMJAX_TEST_POISON_STEPS"])
  from llmjax.cli.main import main
  main()
