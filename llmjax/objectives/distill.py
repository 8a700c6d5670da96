"""Knowledge-distillation losses: a teacher's softened distribution as the student's target.

Sums, never means, like every task loss: `kl_sum` adds T^2 * KL(teacher_T || student_T) over
the positions a task's loss counts (mask 1), so padding, unmasked MLM positions and padded
classifier rows never count, and the T^2 factor keeps the gradient's scale independent of the
temperature (Hinton et al., 2015). `topk_kl_sum` is the same with the teacher stored as its k
largest logits per position (an offline teacher): the teacher distribution is renormalised over
those k tokens, so k = V gives `kl_sum` exactly. The teacher's logits enter as data: callers
pass them through `jax.lax.stop_gradient` (they are never differentiated).

Letters: X any leading axes (batch, length), V classes or vocabulary, K kept teacher logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The variables collection a teacher reaches the loss in: {"variables": the teacher's variables,
# "step": the train step (for schedules)}; tasks/distill.py takes it out before the student runs.
TEACHER = "teacher"


def _masked_sum(values_X: jax.Array, mask_X: jax.Array) -> tuple[jax.Array, jax.Array]:
  mask_X = mask_X.astype(jnp.float32)
  return jnp.sum(values_X * mask_X), jnp.sum(mask_X)


def kl_sum(teacher_logits_XV: jax.Array, student_logits_XV: jax.Array, mask_X: jax.Array,
           temperature: float) -> tuple[jax.Array, jax.Array]:
  """(sum over masked positions of T^2 KL(softmax(t / T) || softmax(s / T)), positions counted);
  float32 whatever the logits' dtype."""
  teacher_XV = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits_XV).astype(jnp.float32) / temperature)
  student_XV = jax.nn.log_softmax(student_logits_XV.astype(jnp.float32) / temperature)
  kl_X = jnp.sum(jnp.exp(teacher_XV) * (teacher_XV - student_XV), axis=-1)
  kl_sum_, count = _masked_sum(kl_X, mask_X)
  return temperature**2 * kl_sum_, count


def topk_kl_sum(teacher_values_XK: jax.Array, teacher_ids_XK: jax.Array,
                student_logits_XV: jax.Array, mask_X: jax.Array,
                temperature: float) -> tuple[jax.Array, jax.Array]:
  """`kl_sum` against a teacher kept as its top-K logits (values, token ids) per position: the
  teacher's softened distribution over those K tokens, the student's over the whole vocabulary
  (the tokens the teacher dropped carry no target mass)."""
  teacher_XK = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_values_XK).astype(jnp.float32) / temperature)
  student_XV = jax.nn.log_softmax(student_logits_XV.astype(jnp.float32) / temperature)
  student_XK = jnp.take_along_axis(student_XV, teacher_ids_XK, axis=-1)
  kl_X = jnp.sum(jnp.exp(teacher_XK) * (teacher_XK - student_XK), axis=-1)
  kl_sum_, count = _masked_sum(kl_X, mask_X)
  return temperature**2 * kl_sum_, count


def top_k(teacher_logits_XV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values [..., K], ids [..., K]) of a teacher's K largest logits: what an offline teacher
  stores per position."""
  return jax.lax.top_k(teacher_logits_XV, k)


def projected_mse_sum(student_hidden_XD: jax.Array, kernel_DE: jax.Array,
                      teacher_hidden_XE: jax.Array, mask_X: jax.Array) -> jax.Array:
  """Sum over masked positions of mean_e (student_hidden @ kernel - teacher_hidden)^2: the
  student's features mapped to the teacher's width by a learned projection (FitNets, Romero et
  al., 2015); the teacher's side is never differentiated."""
  projected_XE = jnp.einsum("...d,de->...e", student_hidden_XD.astype(jnp.float32),
                            kernel_DE.astype(jnp.float32))
  target_XE = jax.lax.stop_gradient(teacher_hidden_XE).astype(jnp.float32)
  return _masked_sum(jnp.mean(jnp.square(projected_XE - target_XE), axis=-1), mask_X)[0]


def combined(alpha: float, distill_sum: jax.Array, task_sum: jax.Array) -> jax.Array:
  """alpha * distillation + (1 - alpha) * task loss, both sums over the same positions."""
  return alpha * distill_sum + (1.0 - alpha) * task_sum
