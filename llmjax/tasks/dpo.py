"""`dpo`: preference tuning of a decoder on {prompt, chosen, rejected} pairs (DPO, IPO, hinge).

The loss (llmjax/objectives/dpo.py) compares the policy's log-probabilities of the two
completions with a reference model's, which comes from `config.task.reference`:
  copy          a frozen copy of the starting policy, held by the loop in the train state's
                `teacher` field like a distillation teacher (outside gradients, optimizer state,
                donation and checkpoints; sharded like the policy; rebuilt from the same start on
                resume)
  adapters_off  the same network without its adapters (LoRA, adapters, prompts): a fine-tuning
                run whose every trainable parameter is an added one needs no second copy
  precomputed   the reference's log-probabilities of every train and validation pair, computed
                once from the starting policy and stored in the workdir (reference_logps/)
Chosen and rejected run as one batch of 2B rows; with `config.task.share_prompt` as one row per
pair instead (or several pairs per row), the prompt once and both completions after it, the
rejected tokens seeing the prompt but never the chosen ones (llmjax/data/preference_shared.py,
attention.branch_mask): the same log-probabilities for less work.

Metrics (means over pairs, TRL's DPOTrainer definitions; TRL key in brackets): loss,
reward_accuracy [rewards/accuracies], reward_margin [rewards/margins], reward_chosen
[rewards/chosen], reward_rejected [rewards/rejected], logp_chosen [logps/chosen], logp_rejected
[logps/rejected]; and preference_accuracy, how often the policy alone gives the chosen completion
the higher log-probability (meaningful before training too, when every reward is 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llmjax import flops, treepaths
from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.errors import ConfigError
from llmjax.models.apply import apply_model, without_moe_statistics
from llmjax.models.peft import Peft
from llmjax.models.transformer import Transformer
from llmjax.objectives import dpo as objective
from llmjax.objectives.distill import TEACHER
from llmjax.tasks import decoded
from llmjax.tasks.base import (CountsFlops, Data, DecodedReport, LossTerms, References, Task,
                               require_encoder_decoder)
from llmjax.tasks.sft import SFT

REFERENCES = ("copy", "adapters_off", "precomputed")
REF_CHOSEN, REF_REJECTED = "ref_logp_chosen", "ref_logp_rejected"  # precomputed batch columns
SIDES = ("chosen", "rejected")
SHARED_KEYS = (("tokens", jnp.int32), ("segment_ids", jnp.int32), ("branch_ids", jnp.int32),
               ("positions", jnp.int32), ("chosen_loss", jnp.float32),
               ("rejected_loss", jnp.float32))  # data/preference_shared.py's rows


@dataclasses.dataclass(frozen=True)
class DPOConfig(TaskConfig):
  """config.task of `dpo` (see the module doc)."""
  beta: float = 0.1  # > 0: the strength of the pull towards the reference
  loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
  label_smoothing: float = 0.0  # sigmoid only: the assumed rate of flipped labels (cDPO), < 0.5
  reference: str = "copy"  # copy | adapters_off | precomputed
  completions: int = 8  # held-out prompts completed greedily at each evaluation (0: none)
  max_new_tokens: int = 0  # per completion; 0: half of data.seq_len
  share_prompt: bool = False  # one row: prompt once, both completions (data/preference_shared.py)
  pairs_per_row: int = 1  # share_prompt: at most this many pairs packed in a row
  row_len: int = 0  # share_prompt: slots of a row; 0: 2 x data.seq_len (any pair fits)

  def validate(self, exp):
    validate_pairs(self, exp)
    require(self.loss_type in objective.LOSS_TYPES,
            f"config.task.loss_type={self.loss_type!r}; allowed: "
            f"{', '.join(objective.LOSS_TYPES)}")
    require(0.0 <= self.label_smoothing < 0.5,
            f"config.task.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    require(self.label_smoothing == 0.0 or self.loss_type == "sigmoid",
            f"config.task.label_smoothing={self.label_smoothing} applies to loss_type "
            f"'sigmoid' only, not {self.loss_type!r}")
    require(self.reference in REFERENCES, f"config.task.reference={self.reference!r}; allowed: "
            f"{', '.join(REFERENCES)}")


def validate_pairs(options, exp) -> None:
  """The checks every preference task (dpo, orpo) makes of its options and the experiment."""
  name = options.name
  require_encoder_decoder(exp, False)
  require(options.beta > 0, f"config.task.beta must be > 0, got {options.beta}")
  require(not exp.distill.teacher, "config.distill.teacher: a preference run (dpo, orpo) "
          f"distills from no teacher; allowed: '' with config.task.name={name!r}")
  require(exp.data.source == "files" and bool(exp.data.files),
          f"config.data.source={exp.data.source!r}: the {name} task reads preference files; set "
          "config.data.source='files' and config.data.files to a .jsonl/.parquet glob")
  require(exp.model.arch != "rnn", f"config.model.arch='rnn': the {name} task trains a "
          "Transformer decoder")
  require(options.completions >= 0, f"config.task.completions must be >= 0, got "
          f"{options.completions}")
  require(0 <= options.max_new_tokens < exp.data.seq_len,
          f"config.task.max_new_tokens must be in [0, data.seq_len={exp.data.seq_len}) (0: "
          f"half of it), got {options.max_new_tokens}")
  validate_sharing(options, exp)


def validate_sharing(options, exp) -> None:
  """config.task.share_prompt and its row options."""
  require(options.pairs_per_row >= 1, f"config.task.pairs_per_row must be >= 1, got "
          f"{options.pairs_per_row}")
  require(options.row_len >= 0, f"config.task.row_len must be >= 0 (0: 2 x data.seq_len), got "
          f"{options.row_len}")
  require(options.share_prompt or (options.pairs_per_row == 1 and options.row_len == 0),
          f"config.task.pairs_per_row={options.pairs_per_row}, row_len={options.row_len}: rows of "
          "several pairs need config.task.share_prompt=True")
  require(not options.share_prompt or exp.model.attention_impl != "splash",
          "config.model.attention_impl='splash' cannot run the branch mask of "
          "config.task.share_prompt=True; use 'xla', 'blocked', 'cudnn' or 'auto'")


class PreferencePairs(DecodedReport, CountsFlops, Task):
  """What the preference tasks (dpo, orpo) share: {prompt, chosen, rejected} rows, a decoder, one
  forward over both completions, greedy completions of held-out prompts."""
  sft = None  # the SFT task whose completions the last decoded_report made

  def rows(self) -> tuple[int, int]:
    """(rows, positions per row) of one example: a pair's two rows, or one shared-prompt row."""
    if self.exp.task.share_prompt:
      return 1, self.exp.task.row_len or 2 * self.exp.data.seq_len
    return 2, self.exp.data.seq_len

  def tokens_per_example(self):
    rows, length = self.rows()
    return rows * length  # tokens_per_s counts every position of the rows, padding included

  def forward_flops_per_example(self):
    rows, length = self.rows()
    return flops.lm_forward(self.exp.model, length).scaled(rows)

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import preference
    d = preference.load(self.exp, workdir)
    return Data(train=d.train, val=d.val, test=None, tokenizer=d.tokenizer, info=d.info,
                artifacts=d.artifacts, texts={"val": d.val_texts})

  def model(self):
    return Transformer(self.exp.model, self.peft())

  def example_batch(self, batch_size):
    if self.exp.task.share_prompt:
      shape = (batch_size, self.exp.task.row_len or 2 * self.exp.data.seq_len)
      return {k: jax.ShapeDtypeStruct(shape, dtype) for k, dtype in SHARED_KEYS}
    shape = (batch_size, self.exp.data.seq_len)
    return {f"{side}_{key}": jax.ShapeDtypeStruct(shape, dtype) for side in SIDES
            for key, dtype in (("tokens", jnp.int32), ("segment_ids", jnp.int32),
                               ("loss", jnp.float32))}

  def init(self, model, rngs, batch):
    if self.exp.task.share_prompt:  # parameters do not depend on the length
      return model.init(rngs, batch["tokens"][:, :self.exp.data.seq_len])
    return model.init(rngs, batch["chosen_tokens"])

  def pair_logps(self, model, variables, batch, *, rng, train):
    """((summed log-probability of each chosen completion [P], of each rejected one [P]), (their
    token counts), log-probability of each next token [rows, L], model state); P pairs: B, or
    with share_prompt B x pairs_per_row (a pair with no chosen token is padding)."""
    if not self.exp.task.share_prompt:
      logp_NL, mask_NL, _, model_state = self.token_logps(model, variables, batch, rng=rng,
                                                          train=train)
      sums_N, counts_N = objective.masked_sums(logp_NL, mask_NL)
      return jnp.split(sums_N, 2), jnp.split(counts_N, 2), logp_NL, model_state
    tokens_BL = batch["tokens"]
    logits_BLV, model_state = apply_model(
        model, variables, tokens_BL, train=train, rng=rng, segment_ids_BL=batch["segment_ids"],
        positions_BL=batch["positions"], branch_ids_BL=batch["branch_ids"],
        deterministic=not train)
    targets_BL = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
    logp_BL = objective.token_logps(logits_BLV, targets_BL)
    (c, c_n), (r, r_n) = (self.segment_sums(logp_BL, batch[f"{s}_loss"], batch) for s in SIDES)
    return (c, r), (c_n, r_n), logp_BL, model_state

  def segment_sums(self, values_BL, mask_BL, batch):
    """(masked sums [B x pairs_per_row], mask counts) per pair of shared-prompt rows."""
    pairs_11K = jnp.arange(1, self.exp.task.pairs_per_row + 1)[None, None]
    mask_BLK = ((batch["segment_ids"][..., None] == pairs_11K)
                * mask_BL[..., None].astype(jnp.float32))
    sums_BK = jnp.einsum("bl,blk->bk", values_BL, mask_BLK,
                         precision=jax.lax.Precision.HIGHEST)
    return sums_BK.reshape(-1), jnp.sum(mask_BLK, axis=1).reshape(-1)

  def token_logps(self, model, variables, batch, *, rng, train):
    """(log-probability of each next token [2B, L], completion mask [2B, L], segment ids
    [2B, L], the model state): one forward over the chosen rows, then the rejected ones."""
    tokens_NL, segment_ids_NL, mask_NL = (
        jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
        for k in ("tokens", "segment_ids", "loss"))
    logits_NLV, model_state = apply_model(model, variables, tokens_NL, train=train, rng=rng,
                                          segment_ids_BL=segment_ids_NL, deterministic=not train)
    targets_NL = jnp.concatenate([tokens_NL[:, 1:], jnp.zeros_like(tokens_NL[:, :1])], axis=1)
    return objective.token_logps(logits_NLV, targets_NL), mask_NL, segment_ids_NL, model_state

  def valid(self, batch):
    """[P] whether each pair is real (padded evaluation rows, empty pair slots: not)."""
    if self.exp.task.share_prompt:
      return self.segment_sums(batch["chosen_loss"], batch["chosen_loss"], batch)[1] > 0
    return jnp.sum(batch["chosen_loss"], axis=-1) > 0

  def decoded_report(self, model, get_params, data, split, limit=None):
    """Greedy completions of the first held-out prompts against their chosen answers (exact
    match, chrF), as the sft task decodes them."""
    self.sft = SFT(self.exp, self.info)  # its texts stay for write_decoded
    return self.sft.decoded_report(model, get_params, data, split, limit)

  def write_decoded(self, workdir, step):
    """Appends the last evaluation's completions to completions.txt, as sft does."""
    return self.sft.write_decoded(workdir, step) if self.sft is not None else []

  def decoded_keys(self):
    return ("exact_match", "chrf", "completed") if self.exp.task.completions else ()


class DPO(PreferencePairs, References):
  """A decoder tuned so that it prefers each chosen completion over its rejected one."""
  name = "dpo"

  def base_model(self):
    """The same network without config.finetune's added parameters (the adapters-off
    reference)."""
    return Transformer(self.exp.model, Peft())

  def forward_flops_per_example(self):
    """Both rows through the policy, and through the reference (forward only, no gradients)
    unless its log-probabilities are precomputed."""
    policy = super().forward_flops_per_example()
    if self.exp.task.reference == "precomputed":
      return policy
    return dataclasses.replace(policy, no_grad=policy.no_grad + policy.total)

  def example_batch(self, batch_size):
    batch = super().example_batch(batch_size)
    if self.exp.task.reference == "precomputed":
      shape = (batch_size,) + ((self.exp.task.pairs_per_row,) if self.exp.task.share_prompt
                               else ())
      batch.update({k: jax.ShapeDtypeStruct(shape, jnp.float32)
                    for k in (REF_CHOSEN, REF_REJECTED)})
    return batch

  def logps(self, model, variables, batch, *, rng, train):
    """(policy log-probability of each chosen completion [P], of each rejected one [P], the
    model state): one forward over both sides; per-token means for ipo (TRL's)."""
    logps, counts, _, model_state = self.pair_logps(model, variables, batch, rng=rng,
                                                    train=train)
    if self.exp.task.loss_type == "ipo":
      logps = [x / jnp.maximum(n, 1.0) for x, n in zip(logps, counts)]
    return logps[0], logps[1], model_state

  def reference_logps(self, model, variables, batch):
    """(reference log-probabilities of chosen [B], of rejected [B]), never differentiated."""
    params = variables["params"]
    reference = variables.get(TEACHER)
    if REF_CHOSEN in batch:  # [B] or, sharing the prompt, [B, pairs_per_row]
      return batch[REF_CHOSEN].reshape(-1), batch[REF_REJECTED].reshape(-1)
    if reference is not None:
      with without_moe_statistics():  # the frozen reference's routing is not the policy's
        chosen, rejected, _ = self.logps(model, reference["variables"], batch, rng=None,
                                         train=False)
    elif self.exp.task.reference == "adapters_off":
      base = {"params": self.base_params(params)}
      chosen, rejected, _ = self.logps(self.base_model(), base, batch, rng=None, train=False)
    else:
      raise ValueError(f"config.task.reference={self.exp.task.reference!r}: the loss got no "
                       "reference (a train state's teacher field, or precomputed columns)")
    return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)

  def base_params(self, params):
    """`params` without the subtrees config.finetune added."""
    keep = self._base_paths()
    return treepaths.nest({p: v for p, v in treepaths.items(params) if p in keep})

  @functools.cache
  def _base_paths(self) -> frozenset:
    zeros = jax.ShapeDtypeStruct((1, self.exp.data.seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda: self.base_model().init(jax.random.PRNGKey(0),
                                                           jnp.zeros(zeros.shape, zeros.dtype)))
    return frozenset(p for p, _ in treepaths.items(shapes["params"]))

  def loss(self, model, variables, batch, *, rng, train):
    variables = dict(variables)
    ref_chosen_B, ref_rejected_B = self.reference_logps(model, variables, batch)
    variables.pop(TEACHER, None)
    chosen_B, rejected_B, model_state = self.logps(model, variables, batch, rng=rng, train=train)
    t = self.exp.task
    losses_B, chosen_rewards_B, rejected_rewards_B = objective.pair_losses(
        chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=t.beta, loss_type=t.loss_type,
        label_smoothing=t.label_smoothing)
    loss_sum, pairs, sums = objective.pair_sums(losses_B, chosen_rewards_B, rejected_rewards_B,
                                                chosen_B, rejected_B, self.valid(batch))
    return LossTerms(loss_sum, pairs, sums, model_state)

  def report(self, sums):
    return objective.report(sums)

  def headline(self, report):
    line = (f"final validation DPO loss {report['loss']:.4f}, reward accuracy "
            f"{report['reward_accuracy']:.3f}, preference accuracy "
            f"{report['preference_accuracy']:.3f}")
    return line + decoded.headline_part(report)

  # --- References
  def reference_kind(self):
    return self.exp.task.reference

  def check_reference(self, trainable, param_paths):
    if self.exp.task.reference != "adapters_off":
      return
    base = self._base_paths()
    added = sorted(set(param_paths) - base)
    wrong = sorted(set(trainable or param_paths) & base)
    if not added or wrong:
      raise ConfigError(
          "config.task.reference='adapters_off' needs a run whose trainable parameters are all "
          f"added by config.finetune (lora, adapter, prompt, prefix); config.finetune.method="
          f"{self.exp.finetune.method!r} trains {len(wrong)} base parameter(s) "
          f"({', '.join(wrong[:3])}...); use reference='copy'")

  def reference_columns(self, model, variables, batch):
    chosen, rejected, _ = self.logps(model, variables, batch, rng=None, train=False)
    if self.exp.task.share_prompt:  # stored per row: [B, pairs_per_row]
      chosen, rejected = (x.reshape(-1, self.exp.task.pairs_per_row) for x in (chosen, rejected))
    return {REF_CHOSEN: chosen, REF_REJECTED: rejected}
