"""Training end to end: a tiny model memorises a batch; the smoke experiment runs through the real
CLI, writes every output and resumes; the loop runs on an 8-device FSDP mesh in-process."""

import concurrent.futures
import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
from llmjax import config as config_lib
from llmjax.models.transformer import Transformer
from llmjax.tasks.lm import LM
from llmjax.train import optim, reporting, step
from llmjax.train.state import TrainState

import _xla

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = "experiments/lm/stdlib_gpt.py"


def load_experiment(arg=None):
  """The experiment file's get_config(arg), loaded the way a user's file would be."""
  spec = importlib.util.spec_from_file_location("stdlib_gpt", ROOT / EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


class CliRuns:
  """The smoke experiment through the real CLI, then a resumed copy of it with more steps.

  They run in a background thread from the start of this module, so the in-process tests below
  overlap them (each command is mostly single-threaded compiles)."""

  def __init__(self, base: pathlib.Path):
    self.first_dir, self.resumed_dir, self.cache_dir = base / "run", base / "resumed", base / "jit"
    self._procs = []
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self.first = self._pool.submit(self._run, self.first_dir)
    self.resumed = self._pool.submit(self._resume)

  def _run(self, workdir, *flags):
    # As a user runs it: XLA's full optimisations, and a compilation cache of their own, new and
    # empty, so the first run compiles from scratch (the resumed run reads what it wrote).
    env = dict(os.environ, XLA_FLAGS=_xla.xla_flags(),
               JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0",
               JAX_COMPILATION_CACHE_DIR=str(self.cache_dir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmjax.cli.main", "train", f"--config={EXPERIMENT}:smoke",
         f"--workdir={workdir}", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self._procs.append(proc)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

  def _resume(self):
    first = self.first.result()
    if first.returncode != 0:
      return None, first
    # Snapshot what the first run left, then resume a copy (the first run's dir stays as it was).
    shutil.copytree(self.first_dir, self.resumed_dir)
    before = reporting.read_metrics(str(self.resumed_dir / "metrics.jsonl"))
    return before, self._run(self.resumed_dir, "--config.train.steps=30")

  def close(self):
    for proc in self._procs:  # only when tests were deselected or failed early
      if proc.poll() is None:
        proc.kill()
    self._pool.shutdown(wait=True)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
  runs = CliRuns(tmp_path_factory.mktemp("smoke"))
  yield runs
  runs.close()


def assert_ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n" + \
      proc.stderr[-3000:]


def checkpoint_steps(workdir) -> list[int]:
  """Committed step directories (orbax writes the metadata file last, on commit)."""
  root = pathlib.Path(workdir, "checkpoints")
  steps = []
  for d in root.iterdir():
    assert d.name.isdigit(), f"unexpected entry in checkpoints/: {d.name}"  # no tmp leftovers
    assert (d / "_CHECKPOINT_METADATA").is_file() and (d / "state").is_dir(), d
    steps.append(int(d.name))
  return sorted(steps)


# --- the step learns --------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch():
  cfg = config_lib.resolve({
      "model": config_lib.model_section("gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                        d_ff=64, max_len=16).to_dict(),
      "optim": dict(lr=1e-2, schedule="constant", warmup_steps=0),
      "data": dict(seq_len=16)})
  model = Transformer(cfg.model)
  tx = optim.make_optimizer(cfg.optim, 400)
  # Shapes from the model's abstract init, values from the host RNG (init's compile costs ~10 s).
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     jnp.zeros((1, 16), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(
          (1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
          + 0.02 * rng.standard_normal(a.shape), a.dtype), abstract)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1), model_state={})
  batch = {"tokens": jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32),
           "segment_ids": jnp.ones((4, 16), jnp.int32)}
  train = jax.jit(functools.partial(step.train_step, loss=step.bind_loss(LM(cfg), model), tx=tx,
                                    schedule=optim.learning_rate_schedule(cfg.optim, 400)))
  losses = []
  for _ in range(400):
    state, metrics = train(state, batch)
    losses.append(float(metrics["loss"]))
    if losses[-1] < 0.1:
      break
  assert losses[0] > 3.0  # ~ln(64) at init: the batch is not trivially predictable
  assert losses[-1] < 0.1, f"loss after {len(losses)} steps: {losses[-1]:.3f}"
  assert int(state.step) == len(losses)


# --- the loop on 8 devices, in-process --------------------------------------------------------


def test_smoke_run_on_eight_devices_with_fsdp(tmp_path):
  assert len(jax.devices()) == 8
  c = load_experiment("smoke")
  c.mesh.data, c.mesh.fsdp, c.mesh.rules = 1, 8, "fsdp"
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 4, 2, 4, 4
  c.train.eval_batches, c.train.sample_prompts, c.train.sample_tokens = 1, 1, 4
  c.train.progress = False
  exp = config_lib.resolve(c)
  result = llmjax.train.run(exp, str(tmp_path))
  assert result["step"] == 4 and math.isfinite(result["loss"])
  records = reporting.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["step"], r["split"]) for r in records] == [(2, "train"), (4, "train"), (4, "val")]
  assert all(math.isfinite(r["loss"]) for r in records)
  assert checkpoint_steps(tmp_path) == [4]
  assert json.loads((tmp_path / "config.json").read_text())["mesh"] == {
      "dcn": 1, "data": 1, "fsdp": 8, "tensor": 1, "expert": 1, "context": 1, "rules": "fsdp"}


# --- the smoke experiment through the CLI -----------------------------------------------------


def test_smoke_run_writes_every_output(cli_runs):
  workdir, proc = cli_runs.first_dir, cli_runs.first.result()
  assert_ok(proc)
  expected = config_lib.resolve(load_experiment("smoke"))
  assert expected.train.steps == 20
  with open(workdir / "config.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(dataclasses.asdict(expected)))  # tuples as lists
  assert config_lib.from_json(json.dumps(written)) == expected

  records = reporting.read_metrics(str(workdir / "metrics.jsonl"))
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in train] == [5, 10, 15, 20]
  assert [r["step"] for r in val] == [10, 20]
  for r in train:
    for key in ("step", "split", "loss", "lr", "tokens_per_s"):
      assert key in r, (key, r)
    assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0
  for r in val:
    assert math.isfinite(r["loss"]) and r["loss"] > 0
  assert train[-1]["loss"] < train[0]["loss"]  # it learned something in 20 steps

  events = list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  assert events and all(e.stat().st_size > 0 for e in events)
  assert checkpoint_steps(workdir)[-1] == 20
  assert (workdir / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  samples = (workdir / "samples.txt").read_text()
  assert samples.strip() and "=== continuation" in samples
  assert "at step 20" in proc.stdout


def test_rerun_with_more_steps_resumes(cli_runs):
  assert_ok(cli_runs.first.result())
  workdir = cli_runs.resumed_dir
  before, proc = cli_runs.resumed.result()
  assert_ok(proc)
  assert [r["step"] for r in before][-1] == 20
  after = reporting.read_metrics(str(workdir / "metrics.jsonl"))
  # The first 20 steps' history is kept as it was (a restart from 0 would rewrite it) ...
  assert [r for r in after if r["step"] <= 20] == before
  # ... and the new records start after step 20 and end at 30, each logged once.
  new = [(r["step"], r["split"]) for r in after if r["step"] > 20]
  assert new == [(25, "train"), (30, "train"), (30, "val")]
  assert checkpoint_steps(workdir)[-1] == 30
  assert 20 in checkpoint_steps(workdir)
  assert "at step 30" in proc.stdout


