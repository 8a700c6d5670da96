"""llmjax compile --config=EXPERIMENT --topology=v5e-16|v5e:4x4 [--num_slices=N] [--output=FILE]
[--config.a.b=v]: compile the run's steps for a TPU topology on this host (no TPU needed).

The train step `llmjax train` would run (and its eval step, and `generate`'s prefill and decode
steps for a causal decoder) is compiled with libtpu's compiler from abstract state; the report
gives per-device memory against the chip's HBM, whether it fits, the compile time, the compiler's
FLOPs and bytes with the roofline bound and MFU upper bound they imply, and the collectives.
Exit code 0: every step fits; 3: one compiles but does not fit; 2: bad input. Needs the `tpu`
extra (pip install -e '.[tpu]'); writes no workdir, only --output.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:arg].",
                                          lock_config=True, flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string("topology", None,
                                "TPU slice: an accelerator type (v5e-16, v5p-8, v6e-8, v4-32) or "
                                "CHIP:AxB[xC] (v5e:4x4, v5p:2x2x1).", flag_values=FLAGS)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over the data-center network "
                                   "(config.mesh.dcn: data parallel across them).",
                                   flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", "-", "The JSON report's file; - prints it on stdout "
                              "(the table then goes to stderr).", flag_values=FLAGS)
_STEPS = flags.DEFINE_list("steps", ["train", "eval", "prefill", "decode"],
                           "Which steps to compile (prefill and decode: causal decoders only).",
                           flag_values=FLAGS)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "generate's prompt length (0: half of "
                                   "config.data.seq_len).", flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "generate's new tokens, which size the KV "
                                "cache with the prompt (0: the rest of config.data.seq_len).",
                                flag_values=FLAGS)

_STEP_NAMES = ("train", "eval", "prefill", "decode")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv if argv is None else argv
  if not common.wants_help(argv, FLAGS):
    from llmjax import tasks  # noqa: F401  (registers every task's config section)
  common.parse_flags(argv)
  if _CONFIG.value is None:
    common.fail("--config=FILE is required (e.g. --config=experiments/lm/stdlib_gpt.py)")
  if not _TOPOLOGY.value:
    common.fail("--topology is required (e.g. --topology=v5e-16 or --topology=v5e:4x4)")
  unknown = sorted(set(_STEPS.value) - set(_STEP_NAMES))
  if unknown:
    common.fail(f"--steps={','.join(_STEPS.value)}: unknown {', '.join(unknown)}; allowed: "
                f"{', '.join(_STEP_NAMES)}")
  output = _OUTPUT.value
  if output != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    common.fail(f"--output={output}: its directory does not exist")
  with common.user_errors():
    from llmjax import config as config_lib
    from llmjax.train import aot, aot_report  # heavy imports only after the flags are good
    exp = config_lib.resolve(_CONFIG.value)
    options = aot.Options(_TOPOLOGY.value, _NUM_SLICES.value, _PROMPT_LEN.value, _MAX_NEW.value,
                          tuple(_STEPS.value))
    report = aot.compile_run(exp, options)
  text = json.dumps(report, indent=2)
  if output == "-":
    print(aot_report.table(report), file=sys.stderr)
    print(text)
  else:
    with open(output + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(output + ".tmp", output)
    print(aot_report.table(report))
    print(f"wrote {output}")
  if not report["fits"]:
    refused = [name for name, step in report["steps"].items() if not step["fits"]]
    worst = report["steps"][refused[0]]["memory"]
    print(f"does not fit: {', '.join(refused)} needs {aot_report.gib(worst.get('peak'))} GiB "
          f"per device, the {report['chip']} chip has {aot_report.gib(worst['hbm'])} GiB of HBM",
          file=sys.stderr)
    sys.exit(aot.DOES_NOT_FIT)


if __name__ == "__main__":
  main()
