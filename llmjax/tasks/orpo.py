"""`orpo`: odds-ratio preference optimisation (Hong et al. 2024) of a decoder on {prompt, chosen,
rejected} pairs: supervised fine-tuning on the chosen answers and a preference term in one
stage, with no reference model.

Per pair, with the policy's log-probability of each completion averaged over its tokens
(llmjax/objectives/dpo.py has the formula; TRL's ORPOTrainer is the reference for it):

  loss = nll(chosen row) - beta log sigmoid(log odds(chosen) - log odds(rejected))

`config.task.nll_tokens` says which tokens the NLL averages over: `sequence` (TRL's: the prompt
and the chosen completion) or `completion` (the chosen completion only, as sft trains). The loss
is a mean over pairs, the paper's expectation; TRL averages the NLL over all chosen tokens of a
batch instead, which is the same when the rows are equally long.

The data, the model, the forward over both completions and the greedy completions are dpo's
(tasks/dpo.py `PreferencePairs`); so are the metrics, with TRL's ORPO definitions: loss,
reward_accuracy, reward_margin, reward_chosen, reward_rejected (rewards beta x the mean
log-probability), logp_chosen, logp_rejected (means per token), preference_accuracy, and
nll_loss, log_odds_ratio (the mean of log sigmoid(log odds)), log_odds_chosen (the mean log odds
ratio).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.objectives import dpo as objective
from llmjax.tasks import decoded
from llmjax.tasks.base import LossTerms
from llmjax.tasks.dpo import PreferencePairs, validate_pairs

NLL_TOKENS = ("sequence", "completion")


@dataclasses.dataclass(frozen=True)
class ORPOConfig(TaskConfig):
  """config.task of `orpo` (see the module doc)."""
  beta: float = 0.1  # > 0: the weight of the odds-ratio term (the paper's lambda, TRL's beta)
  nll_tokens: str = "sequence"  # sequence (TRL: prompt and chosen completion) | completion
  completions: int = 8  # held-out prompts completed greedily at each evaluation (0: none)
  max_new_tokens: int = 0  # per completion; 0: half of data.seq_len
  share_prompt: bool = False  # one row: prompt once, both completions (data/preference_shared.py)
  pairs_per_row: int = 1  # share_prompt: at most this many pairs packed in a row
  row_len: int = 0  # share_prompt: slots of a row; 0: 2 x data.seq_len (any pair fits)

  def validate(self, exp):
    validate_pairs(self, exp)
    require(self.nll_tokens in NLL_TOKENS, f"config.task.nll_tokens={self.nll_tokens!r}; "
            f"allowed: {', '.join(NLL_TOKENS)}")


class ORPO(PreferencePairs):
  """A decoder fine-tuned on the chosen completions while preferring them over the rejected."""
  name = "orpo"

  def nll_mask(self, batch):
    """[B, L] 1 where position t's next token counts in the chosen row's NLL."""
    if self.exp.task.nll_tokens == "completion":
      return batch["chosen_loss"]
    if self.exp.task.share_prompt:
      return shared_sequence_mask(batch["segment_ids"], batch["branch_ids"])
    segment_ids_BL = batch["chosen_segment_ids"]
    # every token of the row but its first: t predicts t + 1, both real (one pair per row)
    real_BL = jnp.concatenate([segment_ids_BL[:, 1:], jnp.zeros_like(segment_ids_BL[:, :1])],
                              axis=1) > 0
    return (real_BL & (segment_ids_BL > 0)).astype(jnp.float32)

  def loss(self, model, variables, batch, *, rng, train):
    sums, counts, logp_NL, model_state = self.pair_logps(model, variables, batch, rng=rng,
                                                         train=train)
    chosen_B, rejected_B = (x / jnp.maximum(n, 1.0) for x, n in zip(sums, counts))
    if self.exp.task.share_prompt:
      nll_sum_B, nll_count_B = self.segment_sums(logp_NL, self.nll_mask(batch), batch)
    else:
      nll_sum_B, nll_count_B = objective.masked_sums(logp_NL[:chosen_B.shape[0]],
                                                     self.nll_mask(batch))
    nll_B = -nll_sum_B / jnp.maximum(nll_count_B, 1.0)
    losses_B, chosen_rewards_B, rejected_rewards_B, log_odds_B = objective.odds_ratio_losses(
        chosen_B, rejected_B, nll_B, beta=self.exp.task.beta)
    valid_B = self.valid(batch)
    loss_sum, pairs, sums = objective.pair_sums(losses_B, chosen_rewards_B, rejected_rewards_B,
                                                chosen_B, rejected_B, valid_B)
    sums.update(objective.orpo_sums(nll_B, log_odds_B, valid_B))
    return LossTerms(loss_sum, pairs, sums, model_state)

  def report(self, sums):
    return objective.report(sums)

  def headline(self, report):
    line = (f"final validation ORPO loss {report['loss']:.4f} (NLL {report['nll_loss']:.4f}), "
            f"reward accuracy {report['reward_accuracy']:.3f}")
    return line + decoded.headline_part(report)


def shared_sequence_mask(segment_ids_BL, branch_ids_BL):
  """[B, L] of shared-prompt rows: 1 where slot t and the slot after it are the same pair's
  prompt or chosen tokens (branches 0, 1): every token of the chosen sequence but its first."""
  def next_(x_BL):
    return jnp.concatenate([x_BL[:, 1:], jnp.zeros_like(x_BL[:, :1])], axis=1)
  sequence_BL = (segment_ids_BL > 0) & (branch_ids_BL <= 1)
  same_BL = (next_(segment_ids_BL) == segment_ids_BL) & next_(sequence_BL)
  return (sequence_BL & same_BL).astype(jnp.float32)
