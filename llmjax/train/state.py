"""Train state: everything a step reads and writes, as one pytree (no functions inside)."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from llmjax.finetune import partition
from llmjax.objectives.distill import TEACHER


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array  # PRNGKey data (uint32[2]); per-step keys are folded in from `step`
  model_state: Any  # non-trainable collections, e.g. {"batch_stats": ...}; {} for Transformers
  # Parameters that do not train (config.finetune): no gradients, no optimizer state, never
  # donated and never checkpointed (they come back from the base); {} when everything trains.
  frozen: Any = struct.field(default_factory=dict)
  # A distillation teacher's variables (config.distill): read by the loss, never differentiated,
  # donated or checkpointed (loaded again from config.distill.teacher on resume). None when not
  # distilling; {} for an offline teacher, whose logits come with the data.
  teacher: Any = None

  def checkpointed(self) -> "TrainState":
    """What a checkpoint holds: everything but the frozen parameters and the teacher."""
    return self.replace(frozen={}, teacher=None)

  def kept(self) -> tuple:
    """(frozen, teacher): the read-only parts, passed to a donating step undonated."""
    return self.frozen, self.teacher

  def with_kept(self, kept: tuple) -> "TrainState":
    frozen, teacher = kept
    return self.replace(frozen=frozen, teacher=teacher)


def loss_variables(state: TrainState, params, model_state) -> dict:
  """The variables a task's loss sees: trained and frozen parameters merged, the model's other
  collections and, when distilling, the teacher."""
  variables = {"params": partition.merge(params, state.frozen), **model_state}
  if state.teacher is not None:
    variables[TEACHER] = {"variables": state.teacher, "step": state.step}
  return variables
