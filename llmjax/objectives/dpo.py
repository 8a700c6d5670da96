"""Preference objectives (DPO and its variants) from sequence log-probabilities, as sums.

Each pair is a prompt with a chosen and a rejected completion. With pi the policy's and ref the
reference model's summed log-probability of a completion given its prompt,

  h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)

and the per-pair losses are (TRL's DPOTrainer definitions):
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO; eps > 0: cDPO)
  ipo      (h - 1 / (2 beta))^2, with log-probabilities averaged over the completion's tokens
  hinge    max(0, 1 - beta h)
The implicit rewards are beta (pi - ref) of each completion, never differentiated.

ORPO (Hong et al. 2024; TRL's ORPOTrainer) needs no reference. With pi the policy's
log-probability of a completion averaged over its tokens and nll a negative log-likelihood of the
chosen row (TRL: averaged over its prompt and completion tokens),

  log_odds = (pi_chosen - pi_rejected) - (log(1 - exp(pi_chosen)) - log(1 - exp(pi_rejected)))
  loss     = nll - beta log sigmoid(log_odds)       (beta: the paper's lambda)

with rewards beta pi of each completion.

Every quantity here is a sum over the pairs that count (`valid_B`), so devices, microbatches and
evaluation batches reduce by adding; the means are taken on the host.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# Sum keys of `pair_sums`, each over the pairs that count.
SUM_KEYS = ("reward_correct_sum", "reward_margin_sum", "reward_chosen_sum",
            "reward_rejected_sum", "logp_chosen_sum", "logp_rejected_sum", "preferred_sum")
# Sum keys ORPO adds to `pair_sums`' (TRL's nll_loss, log_odds_ratio, log_odds_chosen).
ORPO_SUM_KEYS = ("nll_loss_sum", "log_odds_ratio_sum", "log_odds_chosen_sum")
# ORPO's log(1 - exp(logp)) takes logp at most this: logp = 0 exactly (a padded row's 0, or a
# completion the model is certain of) would give log 0; this keeps the term finite.
_LOGP_MAX = -1e-7


def token_logps(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """The log-probability of each target [B, L], float32."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def masked_sums(target_BL: jax.Array, mask_BL: jax.Array):
  """(sum of the masked values per row [B], the mask's count per row [B]); float32."""
  mask_BL = mask_BL.astype(jnp.float32)
  return jnp.sum(target_BL * mask_BL, axis=-1), jnp.sum(mask_BL, axis=-1)


def sequence_logps(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array):
  """(summed log-probability of the masked targets per row [B], their count [B]); float32."""
  return masked_sums(token_logps(logits_BLV, targets_BL), mask_BL)


def pair_losses(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, *,
                beta: float, loss_type: str, label_smoothing: float = 0.0):
  """(losses [B], chosen rewards [B], rejected rewards [B]) of each pair (see module doc).

  For `ipo` the log-probabilities given here must already be per-token means (TRL's)."""
  h_B = (policy_chosen_B - policy_rejected_B) - (ref_chosen_B - ref_rejected_B)
  if loss_type == "sigmoid":
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
  elif loss_type == "ipo":
    losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "hinge":
    losses_B = jax.nn.relu(1.0 - beta * h_B)
  else:
    raise ValueError(f"loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
  chosen_B = jax.lax.stop_gradient(beta * (policy_chosen_B - ref_chosen_B))
  rejected_B = jax.lax.stop_gradient(beta * (policy_rejected_B - ref_rejected_B))
  return losses_B, chosen_B, rejected_B


def odds_ratio_losses(policy_chosen_B, policy_rejected_B, nll_B, *, beta: float):
  """(losses [B], chosen rewards [B], rejected rewards [B], log odds ratio [B]) of ORPO (see
  the module doc); the log-probabilities are per-token means."""
  log_odds_B = ((policy_chosen_B - policy_rejected_B)
                - (_log1m_exp(policy_chosen_B) - _log1m_exp(policy_rejected_B)))
  losses_B = nll_B - beta * jax.nn.log_sigmoid(log_odds_B)
  chosen_B = jax.lax.stop_gradient(beta * policy_chosen_B)
  rejected_B = jax.lax.stop_gradient(beta * policy_rejected_B)
  return losses_B, chosen_B, rejected_B, log_odds_B


def _log1m_exp(x_B):
  """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler's log1mexp)."""
  x_B = jnp.minimum(x_B, _LOGP_MAX)
  return jnp.where(x_B > -math.log(2.0), jnp.log(-jnp.expm1(x_B)), jnp.log1p(-jnp.exp(x_B)))


def orpo_sums(nll_B, log_odds_B, valid_B) -> dict:
  """ORPO's metric sums over the valid pairs: ORPO_SUM_KEYS."""
  valid_B = valid_B.astype(jnp.float32)
  values = (nll_B, jax.nn.log_sigmoid(log_odds_B), log_odds_B)
  return {key: jnp.sum(jax.lax.stop_gradient(x_B) * valid_B)
          for key, x_B in zip(ORPO_SUM_KEYS, values)}


def pair_sums(losses_B, chosen_rewards_B, rejected_rewards_B, policy_chosen_B,
              policy_rejected_B, valid_B):
  """(loss sum, pair count, metric sums over the valid pairs: SUM_KEYS)."""
  valid_B = valid_B.astype(jnp.float32)

  def total(x_B):
    return jnp.sum(jax.lax.stop_gradient(x_B).astype(jnp.float32) * valid_B)
  sums = {
      # TRL's rewards/accuracies: the chosen reward strictly above the rejected one.
      "reward_correct_sum": total(chosen_rewards_B > rejected_rewards_B),
      "reward_margin_sum": total(chosen_rewards_B - rejected_rewards_B),
      "reward_chosen_sum": total(chosen_rewards_B),
      "reward_rejected_sum": total(rejected_rewards_B),
      "logp_chosen_sum": total(policy_chosen_B),
      "logp_rejected_sum": total(policy_rejected_B),
      # The policy's own preference, without the reference: what a model ranks by likelihood.
      "preferred_sum": total(policy_chosen_B > policy_rejected_B),
  }
  return jnp.sum(losses_B * valid_B), jnp.sum(valid_B), sums


def report(sums: dict) -> dict:
  """Host means of `pair_sums` (the loss, rewards and log-probabilities per pair)."""
  pairs = max(float(sums["weight"]), 1.0)
  return {"loss": float(sums["loss_sum"]) / pairs, "pairs": float(sums["weight"]),
          **{key.removesuffix("_sum").replace("reward_correct", "reward_accuracy")
             .replace("preferred", "preference_accuracy"): float(sums[key]) / pairs
             for key in SUM_KEYS + ORPO_SUM_KEYS if key in sums}}
