"""`config.train.init_from`: start training from existing weights instead of random ones."""

from __future__ import annotations

import os

from llmjax import checkpoint
from llmjax.errors import UserError


def load_params(spec: str, abstract_params, shardings):
  """Params for `hf:PATH`, `export:PATH` or `workdir:PATH`, placed in `shardings`."""
  kind, _, path = spec.partition(":")
  if not path:
    raise UserError(f"config.train.init_from={spec!r} has no path after '{kind}:'")
  if kind == "hf":
    from llmjax import hf
    return hf.load_params(path, abstract_params, shardings)
  if kind == "export":
    return checkpoint.load_exported(path, abstract_params, shardings)[1]
  if kind == "workdir":
    return _from_workdir(path, abstract_params, shardings)
  raise UserError(f"config.train.init_from={spec!r}: allowed hf:PATH, export:PATH, workdir:PATH")


def _from_workdir(path: str, abstract_params, shardings):
  """The params of another run's newest verified checkpoint (its optimizer state is not used)."""
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"config.train.init_from=workdir:{path}: no checkpoints/ in that workdir")
  return checkpoint.restore_params(directory, abstract_params, shardings)
