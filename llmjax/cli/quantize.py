"""llmjax quantize --workdir=DIR|--checkpoint=DIR --bits=8|4 [--group_size=N] [--format=int|nf4]
[--asymmetric] --out=DIR [--eval_batches=N]

Writes a quantized llmjax export (docs/compression.md): the dense kernels (and an image model's
convolutions) stored as int8 (per output channel, or groups of --group_size inputs; 0: per
channel), int4 or nf4 (groups of --group_size, default 128 / 64), with quantization.json
reporting each kernel's relative error and the sizes on disk.
--workdir quantizes a run's checkpoint (its newest, or --step); with --eval_batches=N the run's
validation metric is reported before and after, on its first N batches. --checkpoint quantizes
an llmjax export (export:DIR or a bare export directory).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from absl import flags

from llmjax.cli import common
from llmjax.errors import UserError

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "With --workdir: checkpoint step (default: newest).",
                             flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An llmjax export: export:DIR or DIR.",
                                  flag_values=FLAGS)
_BITS = flags.DEFINE_integer("bits", None, "8 or 4.", flag_values=FLAGS)
_GROUP = flags.DEFINE_integer("group_size", None, "Inputs sharing one scale (default: 8 bits "
                              "per channel, int4 128, nf4 64); must divide each kernel's input; "
                              "0: one scale per output channel.", flag_values=FLAGS)
_FORMAT = flags.DEFINE_string("format", "int", "int (integers, --bits 8 or 4) or nf4 (QLoRA's "
                              "4-bit normal float).", flag_values=FLAGS)
_ASYM = flags.DEFINE_boolean("asymmetric", False, "A zero point per group (int only).",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New directory for the quantized export.",
                           flag_values=FLAGS)
_EVAL = flags.DEFINE_integer("eval_batches", 0, "With --workdir: the validation metric before "
                             "and after, on this many batches (0: not evaluated).",
                             flag_values=FLAGS)


def spec(bits, group_size, fmt: str, asymmetric: bool) -> str:
  """The config.model.quant string the flags name; UserError naming the flag otherwise."""
  if bits not in (8, 4):
    raise UserError(f"--bits={bits}: allowed 8 or 4")
  if fmt not in ("int", "nf4"):
    raise UserError(f"--format={fmt!r}: allowed int, nf4")
  if fmt == "nf4" and (bits != 4 or asymmetric):
    raise UserError(f"--format=nf4 is 4-bit and symmetric (got --bits={bits}"
                    f"{', --asymmetric' if asymmetric else ''})")
  if group_size is not None and group_size < 0:
    raise UserError(f"--group_size={group_size}: must be positive, or 0 (per output channel)")
  kind = "nf4" if fmt == "nf4" else f"int{bits}"
  return ":".join([kind] + ([f"g{group_size}"] if group_size is not None else [])
                  + (["asym"] if asymmetric else []))


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value) or not _OUT.value:
    common.fail("give --workdir=DIR (a run) or --checkpoint=DIR (an llmjax export), and --out=DIR")
  with common.user_errors():
    report = quantize(_WORKDIR.value, _CHECKPOINT.value, _OUT.value,
                      spec(_BITS.value, _GROUP.value, _FORMAT.value, _ASYM.value), _STEP.value,
                      _EVAL.value)
  sizes = report["params_bytes"]
  print(json.dumps({k: v for k, v in report.items() if k != "relative_error"}, indent=2))
  worst = max(report["relative_error"].items(), key=lambda kv: kv[1])
  print(f"wrote {os.path.abspath(_OUT.value)}: params {sizes['quantized']:,} bytes "
        f"({sizes['quantized'] / sizes['float']:.3f} of {sizes['float']:,}); largest relative "
        f"error {worst[1]:.4f} at {worst[0]}")


def quantize(workdir, checkpoint, out: str, quant: str, step=None, eval_batches: int = 0) -> dict:
  """The quantized export of a run (via a float export written aside) or of an export."""
  from llmjax.weights import quantize as quantlib  # heavy imports once the flags are good
  if os.path.exists(out):
    raise UserError(f"--out={out} already exists; choose a new directory")
  if checkpoint:
    path = checkpoint[len("export:"):] if checkpoint.startswith("export:") else checkpoint
    return quantlib.quantize_export(path, out, quant, "--checkpoint")
  from llmjax.cli import export
  from llmjax.hf import api
  from llmjax.train import rundir
  # group sizes checked on the run's model (shapes only) before any weights are read
  api.quantized_model(rundir.task(workdir, rundir.experiment(workdir)).model(), quant)
  staging = tempfile.mkdtemp(prefix="llmjax-quantize-")
  try:
    export.export(workdir, os.path.join(staging, "float"), step)
    report = quantlib.quantize_export(os.path.join(staging, "float"), out, quant, "--workdir")
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  if eval_batches:
    from llmjax.eval import evaluate
    report["eval"] = evaluate.quantized_reports(workdir, quant, step, "val", eval_batches)
    with open(os.path.join(out, quantlib.REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
  return report
