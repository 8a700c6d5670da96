"""Preference pairs with a shared prompt (config.task.share_prompt): one row holds a pair's prompt
once and both completions after it, as a tree, so the prompt's work is done once.

Each pair is cut exactly as in its two rows (llmjax/data/preference.py `_fit`: each completion
with the prompt before it fits `seq_len`). Its part of a row is then

  trunk (branch 0)   the prompt but its last token, positions 0 .. P - 2
  chosen (branch 1)  the prompt's last token and the chosen completion, positions P - 1 ..
  rejected (branch 2) the prompt's last token and the rejected completion, positions P - 1 ..

The prompt's last token is written in each branch because its output predicts that branch's
first completion token; everything else a branch sees (attention.branch_mask: its own branch and
the trunk, never the other branch) and every position is what its own row has, so each
completion's log-probabilities are those of its two-row layout. Where the two cuts kept
different prompt tokens (a long prompt before completions of different lengths) the trunk is
empty and each branch holds its own cut prompt from position 0: still exact, nothing shared.

Pairs go into rows of `row_len` slots, at most `pairs_per_row` each (segment ids 1, 2, ...),
first fit among the newest few rows, in order; a pair longer than a row is dropped and counted.
`<side>_loss[t]` is 1 where slot t predicts a completion token of that side.
"""

from __future__ import annotations

import numpy as np

from llmjax.data.chat_rows import OPEN_ROWS

KEYS = (("tokens", np.int32), ("segment_ids", np.int32), ("branch_ids", np.int32),
        ("positions", np.int32), ("chosen_loss", np.float32), ("rejected_loss", np.float32))


def tree(prompt_P, chosen_C, rejected_C, seq_len: int, fit):
  """(trunk tokens, ((branch tokens, first scored slot in it) for chosen, rejected), cut) of one
  pair; `fit` is the two-row layout's cut (preference._fit)."""
  p_c, c, cut_c = fit(prompt_P, chosen_C, seq_len)
  p_r, r, cut_r = fit(prompt_P, rejected_C, seq_len)
  if len(p_c) == len(p_r) and len(p_c):
    last = p_c[-1:]
    return p_c[:-1], ((np.concatenate([last, c]), 0), (np.concatenate([last, r]), 0)), \
        cut_c or cut_r
  # different cuts (or no prompt): nothing shared, each branch its own two-row layout
  return p_c[:0], ((np.concatenate([p_c, c]), max(len(p_c) - 1, 0)),
                   (np.concatenate([p_r, r]), max(len(p_r) - 1, 0))), cut_c or cut_r


def pack(trees: list, row_len: int, pairs_per_row: int) -> tuple[dict, int]:
  """(the KEYS arrays [rows, row_len], pairs dropped as longer than a row) of `tree`s."""
  rows, free, dropped = [], [], 0
  for trunk, branches, _ in trees:
    size = len(trunk) + sum(len(b) for b, _ in branches)
    if size > row_len:
      dropped += 1
      continue
    first = max(0, len(rows) - OPEN_ROWS)
    r = next((r for r in range(first, len(rows))
              if free[r] >= size and len(rows[r]) < pairs_per_row), None)
    if r is None:
      rows.append([])
      free.append(row_len)
      r = len(rows) - 1
    rows[r].append((trunk, branches))
    free[r] -= size
  out = {k: np.zeros((len(rows), row_len), dt) for k, dt in KEYS}
  for r, pairs in enumerate(rows):
    at = 0
    for s, (trunk, branches) in enumerate(pairs, 1):
      at = _write(out, r, at, s, trunk, branches)
  return out, dropped


def _write(out: dict, r: int, at: int, segment: int, trunk, branches) -> int:
  """Write one pair's tree at slot `at` of row r; the slot after it."""
  n = len(trunk)
  out["tokens"][r, at:at + n] = trunk
  out["positions"][r, at:at + n] = np.arange(n)
  out["segment_ids"][r, at:at + n] = segment
  at += n
  for branch, (side, (tokens, scored)) in enumerate(zip(("chosen", "rejected"), branches), 1):
    m = len(tokens)
    out["tokens"][r, at:at + m] = tokens
    out["positions"][r, at:at + m] = n + np.arange(m)
    out["segment_ids"][r, at:at + m] = segment
    out["branch_ids"][r, at:at + m] = branch
    out[f"{side}_loss"][r, at + scored:at + m - 1] = 1.0  # slot t predicts slot t + 1
    at += m
  return at
