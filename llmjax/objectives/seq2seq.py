"""Teacher-forced sequence-to-sequence loss: label-smoothed cross-entropy over target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smoothed_cross_entropy_sums(logits_BTV: jax.Array, targets_BT: jax.Array,
                                mask_BT: jax.Array, smoothing: float) -> dict:
  """Sums over real target tokens (mask 1): "loss_sum" of the label-smoothed cross-entropy (the
  target keeps 1 - smoothing, every token gets smoothing / V, as transformers' and optax's
  smoothing do), "nll_sum" of the plain negative log-likelihood, "correct" argmax hits and
  "weight" the token count; float32 whatever the logits dtype."""
  log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
  nll_BT = -jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
  if smoothing:
    vocab = logits_BTV.shape[-1]
    smooth_BTV = optax.smooth_labels(jax.nn.one_hot(targets_BT, vocab, dtype=jnp.float32),
                                     smoothing)
    loss_BT = -jnp.sum(smooth_BTV * log_probs_BTV, axis=-1)
  else:
    loss_BT = nll_BT
  mask_BT = mask_BT.astype(jnp.float32)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss_BT * mask_BT), "nll_sum": jnp.sum(nll_BT * mask_BT),
          "correct": jnp.sum(correct_BT * mask_BT), "weight": jnp.sum(mask_BT)}
