"""Log-probabilities of candidate continuations ("choices") after a context, under a causal LM.

Shape letters: N examples, C choices per example, S sequences (N * C), B rows, L row length,
V vocabulary.

Each (context, choice) pair is one sequence: the model reads context + choice[:-1] and the
log-probabilities it gives the choice tokens are summed. Sequences are packed into rows of a
fixed length (best fit, longest first) with segment ids 1, 2, ... (0 = padding), so attention
never crosses sequences and positions restart at each one; a sequence that fits no partly filled
row starts its own. Rows go to the device a fixed number at a time (the last batch padded with
empty rows), so the scorer compiles once per model and row shape.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import UserError
from llmjax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Scores:
  """Summed log-probabilities [N, C] (float32) and the choice token counts they sum over."""
  logprobs: np.ndarray
  n_tokens: np.ndarray

  def per_token(self) -> np.ndarray:
    """[N, C] mean log-probability per choice token (length-normalised scores)."""
    return (self.logprobs / self.n_tokens).astype(np.float32)


def choice_logprobs(model, params, contexts: Sequence[Sequence[int]],
                    choices: Sequence[Sequence[Sequence[int]]], *, max_len: int | None = None,
                    rows_per_batch: int = 8) -> np.ndarray:
  """[N, C] float32: log p(choice c's tokens | context n), summed over the choice tokens."""
  return score_choices(model, params, contexts, choices, max_len=max_len,
                       rows_per_batch=rows_per_batch).logprobs


def choice_scores(model, params, contexts, choices, *, length_normalize: bool = False,
                  max_len: int | None = None, rows_per_batch: int = 8) -> np.ndarray:
  """[N, C] float32: summed log-probabilities, or with `length_normalize` their per-token mean."""
  scores = score_choices(model, params, contexts, choices, max_len=max_len,
                         rows_per_batch=rows_per_batch)
  return scores.per_token() if length_normalize else scores.logprobs


def score_choices(model, params, contexts: Sequence[Sequence[int]],
                  choices: Sequence[Sequence[Sequence[int]]], *, max_len: int | None = None,
                  rows_per_batch: int = 8) -> Scores:
  """Packed, batched scoring of every choice of every example.

  `max_len` is the row length (default the model's max_len); no context + choice may be longer
  than it or than the model's max_len. `rows_per_batch` rows run per device call.
  """
  row_len = _check_model(model, max_len, rows_per_batch)
  limit = min(row_len, model.cfg.max_len)
  contexts_N, choices_NC = _check_tokens(contexts, choices, limit, model.cfg.vocab_size)
  n, c = len(choices_NC), len(choices_NC[0])
  pairs = [(contexts_N[i], choice) for i in range(n) for choice in choices_NC[i]]
  rows = pack_rows([len(x) + len(y) - 1 for x, y in pairs], row_len)
  sums_S = np.zeros(len(pairs), np.float64)
  pending = None
  for start in range(0, len(rows), rows_per_batch):
    batch = rows[start:start + rows_per_batch]
    tokens_BL, segments_BL, targets_BL, owner_BL = _layout(pairs, batch, rows_per_batch, row_len)
    # Read the previous batch back only after this one is dispatched: the host never stalls it.
    out_BL = _target_logprobs(model, params, jnp.asarray(tokens_BL), jnp.asarray(segments_BL),
                              jnp.asarray(targets_BL))
    if pending is not None:
      _accumulate(sums_S, *pending)
    pending = (out_BL, owner_BL)
  _accumulate(sums_S, *pending)
  counts_NC = np.array([[len(y) for y in row] for row in choices_NC], np.int32)
  return Scores(sums_S.reshape(n, c).astype(np.float32), counts_NC)


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """Indices of `lengths` grouped into rows of at most `row_len` tokens (best fit decreasing)."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
  for i in order:
    at = bisect.bisect_left(free, (lengths[i], -1))
    if at == len(free):
      rows.append([i])
      bisect.insort(free, (row_len - lengths[i], len(rows) - 1))
    else:
      space, row = free.pop(at)
      rows[row].append(i)
      bisect.insort(free, (space - lengths[i], row))
  return rows


@functools.partial(jax.jit, static_argnames="model")
def _target_logprobs(model, params, tokens_BL, segment_ids_BL, targets_BL):
  """[B, L] float32: log p(targets_BL[b, l] | the row's segment up to l)."""
  logits_BLV = model.apply({"params": params}, tokens_BL, segment_ids_BL=segment_ids_BL)
  logits_BLV = logits_BLV.astype(jnp.float32)
  target_BL = jnp.take_along_axis(logits_BLV, targets_BL[:, :, None], axis=-1)[:, :, 0]
  return target_BL - jax.nn.logsumexp(logits_BLV, axis=-1)


def _layout(pairs, rows, n_rows: int, row_len: int):
  """Tokens, segment ids, next-token targets and owning sequence (-1: not a choice token)."""
  tokens_BL = np.zeros((n_rows, row_len), np.int32)
  segments_BL = np.zeros((n_rows, row_len), np.int32)
  targets_BL = np.zeros((n_rows, row_len), np.int32)
  owner_BL = np.full((n_rows, row_len), -1, np.int64)
  for b, row in enumerate(rows):
    offset = 0
    for segment, s in enumerate(row, start=1):
      context, choice = pairs[s]
      sequence = np.concatenate([context, choice])
      end = offset + len(sequence) - 1
      tokens_BL[b, offset:end] = sequence[:-1]
      targets_BL[b, offset:end] = sequence[1:]
      segments_BL[b, offset:end] = segment
      owner_BL[b, offset + len(context) - 1:end] = s  # the positions that predict the choice
      offset = end
  return tokens_BL, segments_BL, targets_BL, owner_BL


def _accumulate(sums_S: np.ndarray, out_BL, owner_BL: np.ndarray) -> None:
  logprobs_BL = np.asarray(out_BL, np.float64)
  scored = owner_BL >= 0
  sums_S += np.bincount(owner_BL[scored], weights=logprobs_BL[scored], minlength=len(sums_S))


def _check_model(model, max_len: int | None, rows_per_batch: int) -> int:
  """The row length, after checking the model is a causal decoder and the sizes are positive."""
  if not isinstance(model, Transformer) or not model.cfg.causal:
    raise UserError(f"choice scoring needs a causal decoder (a Transformer with causal=True); "
                    f"got {type(model).__name__}"
                    + (" (bidirectional)" if isinstance(model, Transformer) else ""))
  row_len = model.cfg.max_len if max_len is None else max_len
  if row_len < 2:
    raise UserError(f"max_len must be >= 2 (a context token and a choice token), got {row_len}")
  if rows_per_batch < 1:
    raise UserError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
  return row_len


def _check_tokens(contexts, choices, limit: int, vocab_size: int):
  """Contexts and choices as int32 arrays; a UserError naming the example for each bad one."""
  if len(contexts) != len(choices):
    raise UserError(f"{len(contexts)} contexts but {len(choices)} choice lists; one list per "
                    "context")
  if not choices:
    raise UserError("no examples to score")
  width = len(choices[0])
  if width == 0:
    raise UserError("example 0 has no choices")
  contexts_N, choices_NC = [], []
  for n, (context, row) in enumerate(zip(contexts, choices)):
    if len(row) != width:
      raise UserError(f"example {n} has {len(row)} choices but example 0 has {width}; every "
                      "example needs the same number of choices")
    context = _ids(context, f"example {n} context", vocab_size)
    if not len(context):
      raise UserError(f"example {n} has an empty context; the first choice token needs at "
                      "least one token before it (e.g. the tokenizer's BOS)")
    ids = []
    for c, choice in enumerate(row):
      choice = _ids(choice, f"example {n} choice {c}", vocab_size)
      if not len(choice):
        raise UserError(f"example {n} choice {c} is empty (no tokens)")
      if len(context) + len(choice) > limit:
        raise UserError(f"example {n} choice {c}: context ({len(context)} tokens) + choice "
                        f"({len(choice)}) = {len(context) + len(choice)} tokens, more than "
                        f"max_len {limit}")
      ids.append(choice)
    contexts_N.append(context)
    choices_NC.append(ids)
  return contexts_N, choices_NC


def _ids(tokens, what: str, vocab_size: int) -> np.ndarray:
  ids = np.asarray(tokens, np.int64)
  if ids.ndim != 1:
    raise UserError(f"{what}: expected a flat list of token ids, got shape {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
    raise UserError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")
  return ids.astype(np.int32)
