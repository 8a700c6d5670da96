"""Beam search with Hugging Face's semantics, inside one compiled loop over a cached decoder.

It follows transformers' vectorised beam search step for step, so the two choose the same
tokens: each step keeps the best `2 * num_beams` (more with several EOS ids) continuations of
all beams by summed log-probability; the best `num_beams` of them that did not just end carry
on; those among the first `num_beams` that ended (EOS, or the token budget) become finished
hypotheses scored `sum log p / length ** length_penalty` (length counts generated tokens, EOS
included), and the `num_beams` best finished hypotheses are kept. `early_stopping`: True stops a
row once it has `num_beams` finished hypotheses; False stops it when the best running beam,
scored at its current length, cannot beat the worst finished one; "never" assumes a positive
length penalty could still lengthen the best beam to the budget.

Tensor letters: B rows, K beams, R = B * K decoder rows, C = 2K candidates, N new tokens,
V vocabulary, E end-of-sequence ids.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_NEG = -1.0e9  # transformers' "impossible" score, added rather than set, as it does


def _gather(x_BK, index_BC):
  """x[b, index[b, c]] for every row b (beams picked per row)."""
  return jnp.take_along_axis(x_BK, index_BC.reshape(index_BC.shape + (1,) * (x_BK.ndim - 2)),
                             axis=1)


def _start(first_logits_RV, cache, batch: int, k: int, n: int, pad_id: int) -> dict:
  """The loop state before the first step: beam 0 of each row live, nothing finished."""
  return dict(
      t=jnp.int32(0), logits_RV=first_logits_RV, cache=cache,
      running_BKN=jnp.full((batch, k, n), pad_id, jnp.int32),
      running_scores_BK=jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG),
      finished_BKN=jnp.full((batch, k, n), pad_id, jnp.int32),
      finished_scores_BK=jnp.full((batch, k), _NEG, jnp.float32),
      is_finished_BK=jnp.zeros((batch, k), bool),
      improvable_B1=jnp.ones((batch, 1), bool), go=jnp.bool_(True))


def _finished(s: dict, top_scores_BC, candidates_BCN, ended_BC, *, k: int, keep: int,
              length_penalty: float, early_stopping: bool | str):
  """Those of the first K candidates that ended, merged with the finished hypotheses: the best
  K of both as (tokens [B, K, N], scores [B, K], is_finished [B, K])."""
  t = s["t"]
  just_ended_BC = ended_BC & (jnp.arange(keep) < k)[None]
  final_BC = top_scores_BC / (t + 1).astype(jnp.float32) ** length_penalty
  full_B1 = jnp.all(s["is_finished_BK"], axis=-1, keepdims=True) & (early_stopping is True)
  final_BC += full_B1 * _NEG
  final_BC += ~s["improvable_B1"] * _NEG
  final_BC += ~just_ended_BC * _NEG
  merged_scores = jnp.concatenate([s["finished_scores_BK"], final_BC], axis=1)
  _, best_BK = jax.lax.top_k(merged_scores, k)
  finished_BKN = _gather(jnp.concatenate([s["finished_BKN"], candidates_BCN], axis=1), best_BK)
  finished_scores_BK = _gather(merged_scores, best_BK)
  is_finished_BK = _gather(jnp.concatenate([s["is_finished_BK"], just_ended_BC], axis=1),
                           best_BK)
  return finished_BKN, finished_scores_BK, is_finished_BK


def beam_search(first_logits_RV: jax.Array, cache, step: Callable, reorder: Callable, *,
                num_beams: int, max_new_tokens: int, eos_E: jax.Array, pad_id: int,
                length_penalty: float, early_stopping: bool | str) -> jax.Array:
  """Best hypothesis per row [B, N] (`pad_id` after its EOS).

  `first_logits_RV`: the decoder's logits for its start token, row r = b * K + k (beam k of row
  b; all K beams of a row start equal). `step(tokens_R, cache) -> (logits_RV, cache)` feeds one
  token per decoder row; `reorder(cache, rows_R) -> cache` makes decoder row r continue row
  rows_R[r].
  """
  rows, vocab = first_logits_RV.shape
  batch, k, n = rows // num_beams, num_beams, max_new_tokens
  keep = max(2, 1 + eos_E.shape[0]) * k

  def body(s):
    t = s["t"]
    log_probs_BKV = jax.nn.log_softmax(s["logits_RV"].astype(jnp.float32)).reshape(batch, k, -1)
    scores_BX = (log_probs_BKV + s["running_scores_BK"][:, :, None]).reshape(batch, -1)
    top_scores_BC, top_index_BC = jax.lax.top_k(scores_BX, keep)
    parent_BC, token_BC = top_index_BC // vocab, (top_index_BC % vocab).astype(jnp.int32)
    candidates_BCN = _gather(s["running_BKN"], parent_BC).at[:, :, t].set(token_BC)
    ended_BC = jnp.isin(token_BC, eos_E) | (t + 1 >= n)

    # The best K candidates that did not end run on.
    running_scores_BC = top_scores_BC + ended_BC * _NEG
    _, next_BK = jax.lax.top_k(running_scores_BC, k)
    running_BKN = _gather(candidates_BCN, next_BK)
    running_scores_BK = _gather(running_scores_BC, next_BK)
    parent_BK = _gather(parent_BC, next_BK)

    finished_BKN, finished_scores_BK, is_finished_BK = _finished(
        s, top_scores_BC, candidates_BCN, ended_BC, k=k, keep=keep,
        length_penalty=length_penalty, early_stopping=early_stopping)

    # Can a running beam still beat the worst finished one?
    best_length = n if (early_stopping == "never" and length_penalty > 0) else t + 1
    best_running_B1 = running_scores_BK[:, :1] / jnp.float32(best_length) ** length_penalty
    worst_BK = jnp.where(is_finished_BK,
                         jnp.min(finished_scores_BK, axis=1, keepdims=True), _NEG)
    improvable_B1 = s["improvable_B1"] & jnp.any(best_running_B1 > worst_BK, axis=-1,
                                                 keepdims=True)
    go = (jnp.any(improvable_B1) & ~(jnp.all(is_finished_BK) & (early_stopping is True))
          & ~jnp.all(ended_BC))

    rows_R = (parent_BK + jnp.arange(batch)[:, None] * k).reshape(-1)
    cache = reorder(s["cache"], rows_R)
    logits_RV, cache = jax.lax.cond(go, lambda c: step(running_BKN[:, :, t].reshape(-1), c),
                                    lambda c: (s["logits_RV"], c), cache)
    return dict(t=t + 1, logits_RV=logits_RV, cache=cache, running_BKN=running_BKN,
                running_scores_BK=running_scores_BK, finished_BKN=finished_BKN,
                finished_scores_BK=finished_scores_BK, is_finished_BK=is_finished_BK,
                improvable_B1=improvable_B1, go=go)

  state = jax.lax.while_loop(lambda s: s["go"], body, _start(first_logits_RV, cache, batch, k, n,
                                                             pad_id))
  return state["finished_BKN"][:, 0]
