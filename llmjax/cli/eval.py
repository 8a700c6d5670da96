"""llmjax eval --workdir=DIR [--step=N] [--split=val|test]: a run's checkpoint on a whole split.

Also zero-/few-shot classification by LM scoring:
  llmjax eval --checkpoint=SOURCE --data=FILE.jsonl --labels=NAME,NAME,...
      --template='...{text}...' [--shots=K --shot_data=FILE.jsonl] [--length_norm]
SOURCE: workdir:PATH[@STEP], export:DIR, hf:PATH, peft:DIR, or a bare run or export directory;
scored with the tokenizer the weights record unless --tokenizer is given.
"""

from __future__ import annotations

import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest verified).",
                             flag_values=FLAGS)
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"], "Which split to evaluate.",
                           flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Zero-/few-shot: an LM as workdir:PATH[@STEP], export:DIR, "
                                  "hf:PATH, peft:DIR, or a bare run or export directory.",
                                  flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "Zero-/few-shot: JSONL file of examples to classify.",
                            flag_values=FLAGS)
_LABELS = flags.DEFINE_string("labels", None,
                              "Zero-/few-shot: comma-separated label names (their verbalisations).",
                              flag_values=FLAGS)
_TEMPLATE = flags.DEFINE_string("template", "{text}",
                                "Zero-/few-shot: context template with {text}; the label follows.",
                                flag_values=FLAGS)
_SHOTS = flags.DEFINE_integer("shots", 0, "Zero-/few-shot: labelled in-context examples (K).",
                              flag_values=FLAGS)
_SHOT_DATA = flags.DEFINE_string("shot_data", None,
                                 "Zero-/few-shot: JSONL file the K shots are drawn from.",
                                 flag_values=FLAGS)
_LENGTH_NORM = flags.DEFINE_boolean("length_norm", False,
                                    "Zero-/few-shot: score labels by mean, not summed, log-prob.",
                                    flag_values=FLAGS)
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "Zero-/few-shot: the text field.",
                                flag_values=FLAGS)
_LABEL_KEY = flags.DEFINE_string("label_key", "label", "Zero-/few-shot: the label field.",
                                 flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Zero-/few-shot: seed for drawing the shots.",
                             flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Zero-/few-shot: byte or hf:PATH; default: "
                                 "the checkpoint's own tokenizer.", flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    common.fail("give either --workdir=DIR (a training run) or --checkpoint=SOURCE with "
                "--data=FILE.jsonl --labels=A,B,... (zero-/few-shot scoring)")
  with common.user_errors():
    from llmjax.eval import evaluate  # heavy imports only after the flags are known to be good
    if _WORKDIR.value:
      report = evaluate.evaluate_run(_WORKDIR.value, _STEP.value, _SPLIT.value)
      print(evaluate.table(report))
      print(f"wrote {', '.join(report['files'])}")
    else:
      print(evaluate.table(_zero_shot()))


def _zero_shot() -> dict:
  from llmjax.errors import UserError
  from llmjax.eval import zeroshot
  from llmjax import weights
  from llmjax.train import rundir
  if not _DATA.value or not _LABELS.value:
    raise UserError("--checkpoint needs --data=FILE.jsonl and --labels=NAME,NAME,...")
  if _SHOTS.value < 0 or (_SHOTS.value > 0 and not _SHOT_DATA.value):
    raise UserError(f"--shots={_SHOTS.value} needs --shot_data=FILE.jsonl (a separate labelled "
                    "split the shots are drawn from)")
  labels = [name.strip() for name in _LABELS.value.split(",")]
  examples = zeroshot.read_jsonl(_DATA.value, _TEXT_KEY.value, _LABEL_KEY.value)
  pool = (zeroshot.read_jsonl(_SHOT_DATA.value, _TEXT_KEY.value, _LABEL_KEY.value)
          if _SHOTS.value else None)
  source, loaded = rundir.open_weights(_CHECKPOINT.value, "--checkpoint")
  tokenizer = weights.tokenizer(source, _TOKENIZER.value)
  template = _TEMPLATE.value.replace("\\n", "\n")  # a typed \n is a newline
  result = zeroshot.classify(loaded.model, loaded.params, tokenizer, examples, labels, template,
                             shots=_SHOTS.value, shot_pool=pool,
                             length_normalize=_LENGTH_NORM.value, seed=_SEED.value)
  return {"examples": len(examples), "shots": _SHOTS.value, **result["report"]}


if __name__ == "__main__":
  main()
