"""GAN objectives on the discriminator's logits (D(x) = sigmoid(logit)), as sums over a batch.

Goodfellow et al. (2014): the discriminator maximises log D(x) + log(1 - D(G(z))); the generator
minimises log(1 - D(G(z))) ("minimax"), or, since that saturates when D rejects every fake early
on, maximises log D(G(z)) ("non_saturating", the paper's own recommendation and the default).
Each function returns a sum over the rows weighted by `mask_B` (1 for a real row, 0 for padding),
so devices, microbatches and evaluation batches reduce by adding; the caller divides once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GENERATOR_LOSSES = ("non_saturating", "minimax")


def discriminator_loss_sum(real_logits_B: jax.Array, fake_logits_B: jax.Array,
                           mask_B: jax.Array) -> jax.Array:
  """Sum of -log D(x) - log(1 - D(G(z))): binary cross-entropy, reals labelled 1, fakes 0."""
  # -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l), exact for large |l|.
  per_row_B = jax.nn.softplus(-real_logits_B.astype(jnp.float32)) + jax.nn.softplus(
      fake_logits_B.astype(jnp.float32))
  return jnp.sum(per_row_B * mask_B)


def generator_loss_sum(fake_logits_B: jax.Array, mask_B: jax.Array,
                       kind: str = "non_saturating") -> jax.Array:
  """Sum of -log D(G(z)) (non_saturating) or log(1 - D(G(z))) (minimax)."""
  logits_B = fake_logits_B.astype(jnp.float32)
  if kind == "non_saturating":
    per_row_B = jax.nn.softplus(-logits_B)
  elif kind == "minimax":
    per_row_B = -jax.nn.softplus(logits_B)
  else:
    raise ValueError(f"generator loss {kind!r}; allowed: {', '.join(GENERATOR_LOSSES)}")
  return jnp.sum(per_row_B * mask_B)


def probability_sum(logits_B: jax.Array, mask_B: jax.Array) -> jax.Array:
  """Sum of D's probabilities sigmoid(logit) over the counted rows (d_real, d_fake)."""
  return jnp.sum(jax.nn.sigmoid(logits_B.astype(jnp.float32)) * mask_B)
