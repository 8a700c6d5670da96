"""The decoded report the generating tasks (seq2seq, sft, dpo) share: decode the first held-out
prompts with the current parameters and score the texts against their references."""

from __future__ import annotations

import jax


def report(get_params, data, split: str, limit: int, decode, score) -> dict:
  """score(decode(params, sources), references) over the first `limit` (every one if < 0)
  (source, reference) pairs of data.texts[split]. Every process takes part in gathering the
  parameters (`get_params()`); process 0 decodes and scores, the others return {} (as does a
  split with no pairs)."""
  pairs = data.texts.get(split) or []
  pairs = pairs[:limit] if limit >= 0 else pairs
  if not pairs:
    return {}
  params = get_params()
  if jax.process_index() != 0:
    return {}
  return score(decode(params, [s for s, _ in pairs]), [t for _, t in pairs])


def headline_part(report: dict) -> str:
  """The headline's tail `, greedy chrF ..., exact match ...` when the report has decoded scores."""
  if "chrf" not in report:
    return ""
  return f", greedy chrF {report['chrf']:.2f}, exact match {report['exact_match']:.3f}"
