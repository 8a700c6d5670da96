"""llmjax translate --checkpoint=SOURCE (--text="..." | --input=FILE [--output=FILE]).

SOURCE is a seq2seq run (workdir:PATH[@STEP] or its directory: the newest verified checkpoint, or
STEP, with the run's vocabulary and decoding settings), an llmjax export (export:DIR or DIR), or a
Hugging Face encoder-decoder (hf:PATH: Marian, BART). --input has one source per line;
translations go to --output (or stdout) one per line, in order.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from llmjax.cli import common

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A seq2seq run (workdir:PATH[@STEP] or its directory), an llmjax "
                                  "export (export:DIR or DIR) or hf:PATH.", flag_values=FLAGS)
_TEXT = flags.DEFINE_string("text", None, "One text to translate.", flag_values=FLAGS)
_INPUT = flags.DEFINE_string("input", None, "A file of texts to translate, one per line.",
                             flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Where --input's translations go (default stdout).",
                              flag_values=FLAGS)
_BEAMS = flags.DEFINE_integer("num_beams", None, "1 is greedy (default: the run's, else 4).",
                              flag_values=FLAGS)
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", None,
                                     "Beam scores are sum log p / length**this (default 1).",
                                     flag_values=FLAGS)
_EARLY = flags.DEFINE_enum("early_stopping", None, ["true", "false", "never"],
                           "Beam search stopping, as transformers' generate.", flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None,
                                "Token budget per translation (default: the run's, else 128).",
                                flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "byte or hf:PATH; default: the checkpoint's own tokenizer.",
                                 flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.",
                           flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _CHECKPOINT.value or (_TEXT.value is None) == (_INPUT.value is None):
    common.fail("--checkpoint=SOURCE (workdir:PATH[@STEP], DIR, hf:PATH) and exactly one of "
                "--text=TEXT or --input=FILE are required")
  if _BEAMS.value is not None and _BEAMS.value < 1:
    common.fail(f"--num_beams must be >= 1 (1 is greedy), got {_BEAMS.value}")
  texts = [_TEXT.value] if _TEXT.value is not None else _read_lines(_INPUT.value)
  settings = {k: v for k, v in (
      ("num_beams", _BEAMS.value), ("length_penalty", _LENGTH_PENALTY.value),
      ("max_new_tokens", _MAX_NEW.value),
      ("early_stopping", None if _EARLY.value is None else
       {"true": True, "false": False, "never": "never"}[_EARLY.value])) if v is not None}
  with common.user_errors():
    from llmjax import weights  # heavy imports only after the flags are known to be good
    from llmjax.train import rundir
    source, loaded = rundir.open_weights(_CHECKPOINT.value, "--checkpoint", _DTYPE.value)
    if loaded.task is not None:  # before the tokenizer: a run that cannot translate says so
      _require_translates(source.spec, loaded.task)
    tokenizer = weights.tokenizer(source, _TOKENIZER.value)
    translate = _translate_with_run if loaded.task is not None else _translate_with_model
    out = translate(source.spec, loaded, tokenizer, texts, settings)
  _write_lines(out, _OUTPUT.value)


def _translate_with_run(spec: str, loaded, tokenizer, texts: list[str],
                        settings: dict) -> list[str]:
  """A seq2seq run's checkpoint, vocabulary and decoding settings (`settings` win)."""
  return loaded.task.translate(loaded.model, loaded.params, tokenizer, texts, **settings)


def _require_translates(spec: str, task) -> None:
  from llmjax.errors import UserError
  from llmjax import tasks
  if not tasks.supports(task, tasks.Translates):
    raise UserError(f"{spec} is a {task.name} run, whose task does not translate "
                    "(only tasks declaring Translates do: seq2seq)")


def _translate_with_model(spec: str, loaded, tokenizer, texts: list[str],
                          settings: dict) -> list[str]:
  """An llmjax export or a Hugging Face directory, its special ids from its config."""
  from llmjax.data.seq2seq_rows import SpecialIds
  from llmjax.errors import UserError
  from llmjax.tasks.seq2seq import translate_texts
  eos = loaded.eos_token_ids[0] if loaded.eos_token_ids else tokenizer.special_id("sep")
  pad = loaded.pad_token_id if loaded.pad_token_id is not None else tokenizer.special_id("pad")
  start = loaded.decoder_start_token_id if loaded.decoder_start_token_id is not None else pad
  if None in (eos, pad, start):
    raise UserError(f"{spec}: no end-of-sequence, pad or decoder start token id in its config "
                    "or tokenizer")
  defaults = dict(num_beams=4, length_penalty=1.0, early_stopping=False,
                  max_new_tokens=min(128, loaded.model.cfg.max_len))
  return translate_texts(loaded.model, loaded.params, tokenizer, texts,
                         width=loaded.model.cfg.max_len, special=SpecialIds(pad, eos, start),
                         **{**defaults, **settings})


def _read_lines(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.rstrip("\n") for line in f]
  except (OSError, UnicodeDecodeError) as e:
    common.fail(f"--input={path}: cannot read it as UTF-8 text ({e})")
  if not lines:
    common.fail(f"--input={path} has no lines to translate")
  return lines


def _write_lines(lines: list[str], path: str | None) -> None:
  text = "".join(line.replace("\n", " ") + "\n" for line in lines)
  if path is None:
    sys.stdout.write(text)
    return
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
