"""llmjax convert --from=hf:PATH --to=DIR | --from=DIR --to=hf:PATH (llmjax export <-> HF)."""

from __future__ import annotations

import os
import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_FROM = flags.DEFINE_string("from", None, "hf:PATH (a HF model directory) or DIR (an export).",
                            flag_values=FLAGS)
_TO = flags.DEFINE_string("to", None, "DIR (a new llmjax export) or hf:PATH (a HF directory).",
                          flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Parameter dtype of an export written from HF.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  source, dest = _FROM.value, _TO.value
  if not source or not dest:
    common.fail("--from and --to are required: --from=hf:PATH --to=DIR or --from=DIR --to=hf:PATH")
  if source.startswith("hf:") == dest.startswith("hf:"):
    common.fail(f"exactly one of --from={source!r} and --to={dest!r} must be hf:PATH")
  with common.user_errors():
    from llmjax.hf import convert  # heavy imports only after the flags are known to be good
    if source.startswith("hf:"):
      model = convert.hf_to_export(source[3:], dest, dtype=_DTYPE.value)
    else:
      model = convert.export_to_hf(source, dest[3:])
  where = os.path.abspath(dest[3:] if dest.startswith("hf:") else dest)
  print(f"converted {type(model).__name__} ({model.cfg.n_layers} layers, d_model "
        f"{model.cfg.d_model}) to {where}")


if __name__ == "__main__":
  main()
