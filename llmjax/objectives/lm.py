"""Causal language modelling: next-token targets within a segment, masked cross-entropy."""

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


def loss_terms(model, params, batch: dict, *, deterministic: bool, rngs=None, model_state=None):
  """Apply the model to a token batch -> (loss sum, token count, updated model_state)."""
  tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
  targets_BL, loss_mask_BL = next_token_targets(tokens_BL, segment_ids_BL)
  if "weights" in batch:  # optional per-example weights [B]
    loss_mask_BL = loss_mask_BL * batch["weights"][:, None]
  model_state = model_state or {}
  variables = {"params": params, **model_state}
  kwargs = dict(segment_ids_BL=segment_ids_BL, deterministic=deterministic, rngs=rngs)
  if model_state and not deterministic:  # e.g. BatchNorm statistics update while training
    logits_BLV, model_state = model.apply(variables, tokens_BL, mutable=list(model_state),
                                          **kwargs)
  else:
    logits_BLV = model.apply(variables, tokens_BL, **kwargs)
  loss_sum, count = cross_entropy_sum(logits_BLV, targets_BL, loss_mask_BL)
  return loss_sum, count, model_state
