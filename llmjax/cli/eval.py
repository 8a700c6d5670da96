"""llmjax eval --workdir=DIR [--step=N] [--split=val|test]: a run's checkpoint on a whole split.

Also zero-/few-shot classification by LM scoring:
  llmjax eval --checkpoint=hf:PATH|DIR --data=FILE.jsonl --labels=NAME,NAME,...
      --template='...{text}...' [--shots=K --shot_data=FILE.jsonl] [--length_norm]
"""

from __future__ import annotations

import sys

from absl import flags

from llmjax.cli import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest verified).")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"], "Which split to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Zero-/few-shot: an LM as hf:PATH or an llmjax export DIR.")
_DATA = flags.DEFINE_string("data", None, "Zero-/few-shot: JSONL file of examples to classify.")
_LABELS = flags.DEFINE_string("labels", None,
                              "Zero-/few-shot: comma-separated label names (their verbalisations).")
_TEMPLATE = flags.DEFINE_string("template", "{text}",
                                "Zero-/few-shot: context template with {text}; the label follows.")
_SHOTS = flags.DEFINE_integer("shots", 0, "Zero-/few-shot: labelled in-context examples (K).")
_SHOT_DATA = flags.DEFINE_string("shot_data", None,
                                 "Zero-/few-shot: JSONL file the K shots are drawn from.")
_LENGTH_NORM = flags.DEFINE_boolean("length_norm", False,
                                    "Zero-/few-shot: score labels by mean, not summed, log-prob.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "Zero-/few-shot: the text field.")
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "Zero-/few-shot: the label field.")
_SEED = flags.DEFINE_integer("seed", 0, "Zero-/few-shot: seed for drawing the shots.")


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  common.fail("llmjax eval is being built")


if __name__ == "__main__":
  main()
