"""Corpus BLEU and chrF of detokenised text, by sacrebleu (its default 13a tokenisation for
BLEU, character 6-grams and beta 2 for chrF), as translation papers report them."""

from __future__ import annotations

from typing import Sequence


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """{"bleu", "chrf"} in sacrebleu's 0-100 scale for one reference per hypothesis."""
  import sacrebleu  # only evaluation of translations needs it
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  if not hypotheses:
    return {"bleu": 0.0, "chrf": 0.0}
  refs = [list(references)]
  return {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), refs).score),
          "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), refs).score)}
