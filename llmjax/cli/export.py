"""llmjax export --workdir=DIR [--step=N] --out=DIR: parameters only, for eval/generate/fine-tune."""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags

from llmjax.cli import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest verified).")
_OUT = flags.DEFINE_string("out", None, "New directory to write the export to.")


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _WORKDIR.value or not _OUT.value:
    common.fail("--workdir=DIR and --out=DIR are required")
  with common.user_errors():
    step = export(_WORKDIR.value, _OUT.value, _STEP.value)
  print(f"exported params of step {step} to {os.path.abspath(_OUT.value)}")


def export(workdir: str, out: str, step: int | None) -> int:
  """Restore a verified checkpoint of `workdir` on this host's devices and write its params."""
  import jax

  from llmjax import checkpoint, config as config_lib
  from llmjax.errors import UserError
  from llmjax.models.transformer import Transformer
  from llmjax.parallel import mesh as meshlib, sharding
  from llmjax.train import init, optim

  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise UserError(f"--workdir={workdir} has no config.json: not an llmjax run directory")
  with open(config_path) as f:
    exp = config_lib.from_json(f.read())
  model, tx = Transformer(exp.model), optim.make_optimizer(exp.optim, exp.train.steps)
  mesh = meshlib.make_mesh(dataclasses.replace(exp.mesh, data=-1, fsdp=1, tensor=1, rules="dp"))
  abstract, shardings = init.state_shardings(model, tx, exp.data.seq_len, mesh,
                                             sharding.rules_for("dp"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000)
  steps = ckpt.all_steps()
  if not steps or (step is not None and step not in steps):
    raise UserError(f"--step={step}: available checkpoint steps in {workdir}: {steps or 'none'}")
  chosen = steps[-1] if step is None else step
  state, _, _ = ckpt.restore(chosen, abstract, shardings)
  checkpoint.export_params(jax.device_get(state.params), dataclasses.asdict(exp.model), out)
  return chosen
