"""A task defined in this file, not in llmjax: registered at test time with an options section of
its own, it trains through `llmjax train` (its option overridden on the command line), evaluates
with `llmjax eval` and exports with `llmjax export`, and no file in llmjax/ knows it. docs/tasks.md
shows the same example.

Each verb runs in a process of its own (the CLI verbs' absl flags cannot all live in one), which
registers the task first: `python -c "import test_task_plugin; test_task_plugin.register(); ..."`.
"""

import dataclasses
import json
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import config as config_lib, tasks
from llmjax.config_checks import require
from llmjax.errors import ConfigError

import _cli as _cli_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DigitSumConfig(config_lib.TaskConfig):
  """config.task of `digit_sum`: its own options, validated by the task."""
  modulus: int = 5  # the label of a row: the sum of its digits modulo this
  rows: int = 256  # training rows drawn (validation: a quarter as many)

  def validate(self, exp):
    require(2 <= self.modulus <= exp.model.vocab_size,
            f"config.task.modulus must be in [2, config.model.vocab_size="
            f"{exp.model.vocab_size}], got {self.modulus}")


class DigitSum(tasks.Exportable, tasks.Task):
  """Rows of random digits; predict their sum modulo config.task.modulus at the last position.
  Declares one capability, Exportable: without CountsFlops its runs log rows/s, and no MFU."""
  name = "digit_sum"

  def data(self, workdir):
    t, d = self.exp.task, self.exp.data

    def rows(n, seed):
      digits = np.random.default_rng(seed).integers(0, 10, (n, d.seq_len), dtype=np.int32)
      return {"tokens": digits, "mask": np.ones(n, np.float32)}  # eval padding rows get 0
    return tasks.Data(train=rows(t.rows, d.seed), val=rows(t.rows // 4, d.seed + 1), test=None,
                      tokenizer=None, info={"modulus": t.modulus}, artifacts={})

  def model(self):
    from llmjax.models.transformer import Transformer
    return Transformer(self.exp.model, self.peft())

  def example_batch(self, batch_size):
    return {"tokens": jax.ShapeDtypeStruct((batch_size, self.exp.data.seq_len), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["tokens"])

  def loss(self, model, variables, batch, *, rng, train):
    modulus = self.exp.task.modulus
    logits_BLV = model.apply(variables, batch["tokens"], deterministic=not train,
                             rngs=None if rng is None else {"dropout": rng})
    logits_BC = logits_BLV[:, -1, :modulus]
    labels_B = jnp.sum(batch["tokens"], axis=1) % modulus
    mask_B = batch["mask"]
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
    correct = jnp.sum((jnp.argmax(logits_BC, -1) == labels_B) * mask_B)
    return tasks.LossTerms(jnp.sum(losses_B * mask_B), jnp.sum(mask_B), {"correct": correct}, {})

  def report(self, sums):
    n = max(float(sums["weight"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / n, "accuracy": float(sums["correct"]) / n}


def register():
  tasks.register("digit_sum", DigitSum, DigitSumConfig)


EXPERIMENT = '''
"""The digit_sum task (tests/test_task_plugin.py) on a one-block decoder."""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.task.name = "digit_sum"
  c.task.modulus = 5
  c.model = config_lib.model_section("gpt2", vocab_size=16, d_model=32, n_layers=1, n_heads=2,
                                     d_ff=64, max_len=8)
  c.data.seq_len = 8
  c.train.update(dict(steps=4, batch_size=8, log_every=2, eval_every=4, eval_batches=8,
                      checkpoint_every=4, progress=False))
  c.optim.warmup_steps = 1
  return config_lib.finalize(c, arg)
'''


@pytest.fixture
def registered():
  register()
  yield
  tasks.unregister("digit_sum")


def _cli(*args):
  """`llmjax ARGS` in this process, where the `registered` fixture entered the task (a plugin
  registers its task in the process that runs the verb; tests/_cli.py)."""
  return _cli_lib.run(*args)


def test_the_task_has_its_own_validated_config_section(registered, tmp_path):
  path = tmp_path / "digit_sum.py"
  path.write_text(textwrap.dedent(EXPERIMENT))
  c = config_lib.experiment_module(str(path), str(tmp_path)).get_config()
  exp = config_lib.resolve(c)
  assert exp.task == DigitSumConfig(name="digit_sum", modulus=5, rows=256)
  assert config_lib.from_json(exp.to_json()) == exp
  with c.unlocked():
    c.task.modulus = 1
  with pytest.raises(ConfigError, match=r"config.task.modulus must be in \[2, "):
    config_lib.resolve(c)
  with c.unlocked():
    c.task.modulus, c.task.pooling = 5, "last"  # another task's option does nothing here
  with pytest.raises(ConfigError, match="config.task.pooling='last' is an option of the classify"):
    config_lib.resolve(c)
  with c.unlocked():
    c.task.pooling = "auto"
  tasks.unregister("digit_sum")
  with pytest.raises(ConfigError, match="config.task.name='digit_sum' is not a task"):
    config_lib.resolve(c)


def test_a_task_defined_here_trains_evaluates_and_exports_through_the_cli(registered, tmp_path):
  path = tmp_path / "digit_sum.py"
  path.write_text(textwrap.dedent(EXPERIMENT))
  workdir, out = tmp_path / "run", tmp_path / "export"
  train = _cli("train", f"--config={path}", f"--workdir={workdir}", "--config.task.modulus=3")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "final validation loss" in train.stdout
  recorded = json.loads((workdir / "config.json").read_text())["task"]
  assert recorded == {"name": "digit_sum", "modulus": 3, "rows": 256}
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  trained = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in trained] == [2, 4]
  assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in trained)  # no CountsFlops
  final = [r for r in records if r["split"] == "val"][-1]
  assert final["step"] == 4 and 0.0 <= final["accuracy"] <= 1.0

  evaluated = _cli("eval", f"--workdir={workdir}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  report = json.loads((workdir / "eval" / "step_4.json").read_text())
  # The whole validation split is the 8 batches training evaluated: the same numbers.
  assert report["accuracy"] == final["accuracy"]
  np.testing.assert_allclose(report["loss"], final["loss"], rtol=1e-5)

  exported = _cli("export", f"--workdir={workdir}", f"--out={out}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  from llmjax.hf import convert
  from llmjax.train import rundir
  loaded, run = convert.load_export(str(out)), rundir.restore(str(workdir))
  assert type(loaded.model).__name__ == "Transformer"
  assert jax.tree.map(np.shape, loaded.params) == jax.tree.map(np.shape, run.params)
  for ours, theirs in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(run.params)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

  # A capability it does not declare is refused by the verb that needs it, in one line.
  translated = _cli("translate", f"--checkpoint={workdir}", "--text=123")
  assert translated.returncode == 2 and "does not translate" in translated.stderr
  assert "Traceback" not in translated.stderr
