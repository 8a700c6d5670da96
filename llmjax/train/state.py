"""Train state: everything a step reads and writes, as one pytree (no functions inside)."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


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
