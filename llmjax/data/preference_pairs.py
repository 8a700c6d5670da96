"""Offline preference pairs from text every machine has, written as JSONL {prompt, chosen,
rejected} rows (the dpo task's format; llmjax/data/preference.py).

  python -m llmjax.data.preference_pairs --out=DIR [--source=gettext,stdlib] [--lang=de]
      [--max_chars=300] [--val_fraction=0.05] [--test_fraction=0.05] [--seed=0]

- gettext: the prompt "Translate to German: <English>" (the instruction data's, a user message);
  chosen: the human translation; rejected: the translation of the nearest *different* English
  message of the training split (the translation task's retrieval baseline,
  llmjax/eval/translation_baselines.py, with the message itself out of its memory): a fluent,
  plausible and wrong answer.
- stdlib: the prompt asks for a standard-library function by signature and docstring (as the
  instruction data does); chosen: its source; rejected: its own header (decorators, signature,
  docstring) over the body of another function with the same arity, of the same split (the next
  one in a stable hash order): right form, wrong behaviour.

Splits are the instruction data's (llmjax/data/instruct.py): a stable hash of each example's
name, so the held-out prompts here are held out from SFT on the same seed too. A pair whose
prompt and chosen answer exceed `max_chars`, or that finds no rejected answer, is left out.
DIR/{train,val,test}.jsonl and DIR/manifest.json (counts and sha256 per split) are written.
"""

from __future__ import annotations

import ast
import json
import sys

from llmjax.data import gettext_pairs, instruct, text
from llmjax.eval import translation_baselines

SOURCES = ("gettext", "stdlib")


def gettext_rows(lang: str, locale_dir: str, splits, max_chars: int) -> dict[str, list[dict]]:
  """{split: rows} of translation pairs; rejected by retrieval over the training split."""
  pairs, _ = gettext_pairs.gettext_pairs(locale_dir, lang)
  by_split: dict[str, list] = {s: [] for s in instruct.SPLITS}
  for english, translation in pairs:
    question = instruct.translation_messages(english, translation, lang)[:1]
    if len(question[0]["content"]) + len(translation) <= max_chars:
      by_split[splits(f"gettext:{english}")].append((english, translation, question))
  memory = [(e, t) for e, t, _ in by_split["train"]]
  out = {}
  for split, items in by_split.items():
    rejected = translation_baselines.nearest_other(memory, [(e, t) for e, t, _ in items])
    out[split] = [{"prompt": q, "chosen": t, "rejected": r, "name": f"gettext:{e}",
                   "source": "gettext"} for (e, t, q), r in zip(items, rejected) if r]
  return out


def body_start(source: str) -> int | None:
  """The line (0-based) where a function's body starts after its header and docstring; None
  if it has no body beyond its docstring."""
  try:
    body = ast.parse(source).body[0].body
  except (SyntaxError, IndexError, AttributeError):  # a source that does not parse alone
    return None
  if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                           ast.Constant) \
      and isinstance(body[0].value.value, str):
    body = body[1:]
  return body[0].lineno - 1 if body else None


def stdlib_rows(splits, max_chars: int, seed: int) -> dict[str, list[dict]]:
  """{split: rows} of functions; rejected: the header over another same-arity function's body."""
  groups: dict[tuple[str, int], list] = {}
  for f in instruct.stdlib_functions():
    question = instruct.function_messages(f)[:1]
    start = body_start(f.source)
    if start is not None and len(question[0]["content"]) + len(f.source) <= max_chars:
      groups.setdefault((splits(f"stdlib:{f.name}"), f.arity), []).append((f, question, start))
  out: dict[str, list[dict]] = {s: [] for s in instruct.SPLITS}
  for (split, _), items in sorted(groups.items()):
    items.sort(key=lambda item: text.unit_hash(seed, item[0].name))
    for i, (f, question, start) in enumerate(items):
      lines = f.source.splitlines(keepends=True)
      for other, _, other_start in items[i + 1:] + items[:i]:
        rejected = "".join(lines[:start] + other.source.splitlines(keepends=True)[other_start:])
        if rejected != f.source:
          out[split].append({"prompt": question, "chosen": f.source, "rejected": rejected,
                             "name": f"stdlib:{f.name}", "source": "stdlib"})
          break
  return out


def build(sources: list[str], lang: str, locale_dir: str, max_chars: int, val_fraction: float,
          test_fraction: float, seed: int) -> dict[str, list[dict]]:
  """{split: rows} of every source, in source order."""
  def splits(name):
    return instruct.split_of(name, val_fraction, test_fraction, seed)
  out: dict[str, list[dict]] = {s: [] for s in instruct.SPLITS}
  for source in sources:
    rows = (gettext_rows(lang, locale_dir, splits, max_chars) if source == "gettext"
            else stdlib_rows(splits, max_chars, seed))
    for split in out:
      out[split] += rows[split]
  return out


def main(argv: list[str] | None = None) -> int:
  """python -m llmjax.data.preference_pairs (the instruction data's command line)."""
  return instruct.command("python -m llmjax.data.preference_pairs", __doc__, SOURCES, build, argv,
                          content=lambda row: json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
  sys.exit(main())
