"""llmjax export --workdir=DIR [--step=N] --out=DIR: parameters only, for eval/generate/fine-tune."""

from __future__ import annotations

import dataclasses
import json
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

  from llmjax import checkpoint
  from llmjax.hf import convert
  from llmjax.train import rundir

  run = rundir.restore(workdir, step)
  # Which module wraps the config (a BERT head, its label count) and the run's vocabulary, so
  # `llmjax convert --to=hf:` and `generate` need nothing else.
  extra = {convert.MODEL_FILE: json.dumps(convert.describe(run.model), indent=2)}
  tokenizer = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(tokenizer):
    with open(tokenizer) as f:
      extra[os.path.join(convert.TOKENIZER_DIR, "tokenizer.json")] = f.read()
  checkpoint.export_params(jax.device_get(run.params), dataclasses.asdict(run.exp.model),
                           out, extra)
  return run.step
