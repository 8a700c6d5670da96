"""Language modelling objectives: next-token targets within a segment (causal), BERT-style
corruption (masked), and the masked cross-entropy both use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_targets(tokens_BL: jax.Array, segment_ids_BL: jax.Array):
  """Targets are the next token of the same segment; the last token of a segment has no target.

  Returns (targets_BL, loss_mask_BL). Padding (segment id 0) never contributes.
  """
  targets_BL = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
  next_segment_BL = jnp.concatenate(
      [segment_ids_BL[:, 1:], jnp.zeros_like(segment_ids_BL[:, :1])], axis=1)
  loss_mask_BL = (segment_ids_BL != 0) & (next_segment_BL == segment_ids_BL)
  return targets_BL, loss_mask_BL.astype(jnp.float32)


def cross_entropy_sum(logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array):
  """(sum of masked token losses, number of target tokens); float32 whatever the logits dtype."""
  losses_BL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BLV.astype(jnp.float32), targets_BL)
  return jnp.sum(losses_BL * loss_mask_BL), jnp.sum(loss_mask_BL)


def mask_tokens(rng, tokens_BL: jax.Array, can_mask_BL: jax.Array, *, mask_id: int,
                vocab_size: int, mask_prob: float, mask_token_ratio: float,
                random_token_ratio: float):
  """BERT's corruption: choose each maskable token with `mask_prob`; of the chosen, replace
  `mask_token_ratio` by [MASK], `random_token_ratio` by a random token, keep the rest.

  Returns (inputs_BL, chosen_BL float32): the loss counts the chosen positions only.
  """
  choose_key, how_key, random_key = jax.random.split(rng, 3)
  chosen_BL = (jax.random.uniform(choose_key, tokens_BL.shape) < mask_prob) & can_mask_BL
  how_BL = jax.random.uniform(how_key, tokens_BL.shape)
  to_mask_BL = chosen_BL & (how_BL < mask_token_ratio)
  to_random_BL = chosen_BL & (how_BL >= mask_token_ratio) & (
      how_BL < mask_token_ratio + random_token_ratio)
  random_BL = jax.random.randint(random_key, tokens_BL.shape, 0, vocab_size, tokens_BL.dtype)
  inputs_BL = jnp.where(to_mask_BL, mask_id, jnp.where(to_random_BL, random_BL, tokens_BL))
  return inputs_BL, chosen_BL.astype(jnp.float32)
