"""`llmjax VERB [flags]`: dispatch to llmjax.cli.VERB (each verb defines only its own flags).

`llmjax`, `llmjax --help` or `llmjax help` list the verbs; `llmjax VERB --help` (or `llmjax help
VERB`) shows that verb's usage and flags. Only the named verb's module is imported.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

from llmjax.cli import common
from llmjax.errors import print_error

# The one list of verbs: name -> one line for `llmjax --help`; each is the module llmjax.cli.NAME.
VERBS = {
    "train": "train a model from an experiment file; rerunning with the same --workdir resumes",
    "eval": "evaluate a run's checkpoint on a split, or classify by LM scoring (zero-/few-shot)",
    "export": "write a run's parameters for llmjax, or --out=hf:PATH [--merge] for Hugging "
              "Face / PEFT",
    "convert": "convert an llmjax export to or from a Hugging Face model directory",
    "generate": "continue a prompt with an llmjax export or a Hugging Face model",
    "chat": "talk to a model through its chat template (one --message, or turns from stdin)",
    "translate": "translate text with a seq2seq run, an llmjax export or a Hugging Face "
                 "encoder-decoder (greedy or beam search)",
    "segment": "segment an image into regions by mean-shift clustering of (colour, position)",
    "sample": "draw new images from a trained GAN run as a PNG grid",
    "quantize": "write a run or export with its dense kernels in int8, int4 or nf4, and report "
                "the error per layer (and the validation metric before and after)",
    "compile": "compile an experiment's steps for a TPU topology (v5e-16, v5p-8, ...) and report "
               "per-device memory, fit, cost and collectives, without a TPU",
}


def usage() -> str:
  width = max(map(len, VERBS))
  return "\n".join(["usage: llmjax VERB [--flags]", "", "verbs:"]
                   + [f"  {name.ljust(width)}  {line}" for name, line in VERBS.items()]
                   + ["", "llmjax VERB --help shows a verb's usage and flags."])


def main(argv: list[str] | None = None) -> None:
  own_command_line = argv is None
  argv = list(sys.argv if argv is None else argv)
  args = argv[1:]
  if not args:
    print(usage(), file=sys.stderr)
    sys.exit(2)
  if args[0] in common.HELP_ARGS or args == ["help"]:
    print(usage())
    return
  if args[0] == "help":  # `llmjax help VERB`
    args = [args[1], "--help"]
  if args[0] not in VERBS:
    problem = (f"expected a verb before {args[0]}" if args[0].startswith("-")
               else f"unknown verb {args[0]!r}")
    print_error(f"{problem}\n\n{usage()}")
    sys.exit(2)
  if own_command_line:  # not a call from another program (a test, a notebook)
    collect_less_often()
  verb = importlib.import_module(f"llmjax.cli.{args[0]}")
  verb.main([f"llmjax {args[0]}"] + args[1:])


def collect_less_often() -> None:
  """$LLMJAX_GC_THRESHOLD, when set: Python's cycle collector runs every that many new objects
  instead of every 700.

  A short run's Python time is mostly tracing jax programs, which makes and drops many small
  objects; at the default threshold the collector runs thousands of times and walks jax's caches
  and every imported module each time. The test suite sets 50,000 for its workers and the CLI
  processes they start (four test files of in-process runs: 8-10% less CPU, two rounds taking
  turns, 2026-12-07). Long-running processes keep Python's default: garbage that holds device
  buffers is then freed sooner. Only a process's own `main()` reads it, never a call from another
  program (tests/conftest.py calls this function itself)."""
  threshold = os.environ.get("LLMJAX_GC_THRESHOLD", "")
  if not threshold:
    return
  if not threshold.isdigit() or int(threshold) == 0:
    print_error(f"LLMJAX_GC_THRESHOLD must be a positive integer (new objects between cycle "
                f"collections), got {threshold!r}")
    sys.exit(2)
  gc.set_threshold(int(threshold), 20, 20)


if __name__ == "__main__":
  main()
