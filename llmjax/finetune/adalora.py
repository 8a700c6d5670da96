"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, W + B diag(e) A, with a shrinking rank budget.

Each module's r triplets (a column of A, an entry of e, a row of B) are scored by the smoothed
sensitivity |p * g| of their parameters (an EMA, times the EMA of its uncertainty), and on a
cubic schedule only the `budget(t)` best triplets across the whole model keep their e; the rest
are set to zero. Nothing is resized: a masked triplet is an exact zero of a fixed-shape array,
so the step never recompiles. An orthogonality penalty keeps A and B near-orthonormal, as the
SVD form assumes. All of it is an optax transformation around the run's optimizer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llmjax.config import FinetuneConfig
from llmjax.finetune import partition


class BudgetState(NamedTuple):
  inner: optax.OptState
  step: jax.Array
  ipt: dict  # lora leaf path -> EMA of |p * g|
  unc: dict  # lora leaf path -> EMA of |s - ipt|
  keep: dict  # e path -> bool [*lead, r]: the triplets the budget keeps

  @property
  def last_finite(self) -> jax.Array:  # what the train step reads of apply_if_finite's state
    return self.inner.last_finite


def modules(params) -> list[str]:
  """Paths of the AdaLoRA modules ('layer_0/attn/q/lora'), each with a, b and e."""
  return sorted(p[:-2] for p, _ in partition.items(params) if p.endswith("/lora/e"))


def schedule(f: FinetuneConfig, total_steps: int):
  """(warmup, final) steps: the initial budget before `warmup`, the target after
  total - final, a cubic decrease between (PEFT's tinit / tfinal)."""
  warmup = f.adalora_warmup or total_steps // 10
  final = f.adalora_final or total_steps // 5
  return warmup, max(final, 0)


def budget(step, initial: int, target: int, warmup: int, final: int, total: int):
  """Triplets kept at `step`: initial, then (initial - target) (1 - progress)^3 + target."""
  span = max(total - final - warmup, 1)
  progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
  return jnp.floor((initial - target) * (1.0 - progress) ** 3 + target).astype(jnp.int32)


def _lead(e) -> int:
  return e.ndim - 1  # the layer axis of a scanned stack, or nothing


def triplet_scores(score: dict, module: str, e) -> jax.Array:
  """[*lead, r]: s(e_i) + mean s(A[:, i]) + mean s(B[i, :]) (PEFT's per-triplet importance)."""
  lead = _lead(e)
  a, b = score[module + "/a"], score[module + "/b"]
  in_axes = tuple(range(lead, a.ndim - 1))
  out_axes = tuple(range(lead + 1, b.ndim))
  return score[module + "/e"] + a.mean(axis=in_axes) + b.mean(axis=out_axes)


def orthogonality_penalty(params, names: list[str]) -> jax.Array:
  """sum ||A^T A - I||_F + ||B B^T - I||_F over modules (and layers), over the module count."""
  flat = dict(partition.items(params))
  total = 0.0
  for module in names:
    e = flat[module + "/e"]
    lead, r = _lead(e), e.shape[-1]
    a = flat[module + "/a"].reshape(e.shape[:lead] + (-1, r))  # [*lead, in, r]
    b = flat[module + "/b"].reshape(e.shape[:lead] + (r, -1))  # [*lead, r, out]
    eye = jnp.eye(r, dtype=jnp.float32)
    for gram in (jnp.einsum("...ir,...is->...rs", a, a), jnp.einsum("...ro,...so->...rs", b, b)):
      total += jnp.sum(jnp.sqrt(jnp.sum((gram.astype(jnp.float32) - eye) ** 2, axis=(-2, -1))))
  return total / max(len(names), 1)


def with_budget(tx: optax.GradientTransformation, f: FinetuneConfig,
                total_steps: int) -> optax.GradientTransformation:
  warmup, final = schedule(f, total_steps)

  def init(params):
    names = modules(params)
    flat = dict(partition.items(params))
    # tree.map reaches through flax's logical boxes, so the scores shard like their params.
    like = lambda v, dtype, fill: jax.tree.map(lambda x: jnp.full(x.shape, fill, dtype), v)
    # Two separate trees of zeros: one array in two leaves would be donated twice.
    scores = lambda: {p: like(v, jnp.float32, 0) for p, v in flat.items() if "/lora/" in p}
    keep = {m + "/e": like(flat[m + "/e"], bool, True) for m in names}
    return BudgetState(tx.init(params), jnp.zeros((), jnp.int32), scores(), scores(), keep)

  def update(grads, state, params):
    names = modules(params)
    if f.adalora_orth_reg:
      penalty_grads = jax.grad(orthogonality_penalty)(params, names)
      grads = jax.tree.map(lambda g, p: g + f.adalora_orth_reg * p, grads, penalty_grads)
    updates, inner = tx.update(grads, state.inner, params)
    flat_p, flat_g = dict(partition.items(params)), dict(partition.items(grads))
    sensitivity = {p: jnp.abs(flat_p[p] * flat_g[p]).astype(jnp.float32) for p in state.ipt}
    ipt = {p: f.adalora_beta1 * state.ipt[p] + (1 - f.adalora_beta1) * s
           for p, s in sensitivity.items()}
    unc = {p: f.adalora_beta2 * state.unc[p] + (1 - f.adalora_beta2) * jnp.abs(s - ipt[p])
           for p, s in sensitivity.items()}
    finite = inner.last_finite  # a skipped step's gradients must not enter the scores
    ipt = jax.tree.map(lambda new, old: jnp.where(finite, new, old), ipt, state.ipt)
    unc = jax.tree.map(lambda new, old: jnp.where(finite, new, old), unc, state.unc)
    keep = _reallocate(state, ipt, unc, names, flat_p, warmup, final, total_steps,
                       f.lora_rank, f.adalora_target_rank, f.adalora_interval)
    updates = _zero_masked(updates, params, keep)
    return updates, BudgetState(inner, state.step + 1, ipt, unc, keep)

  return optax.GradientTransformation(init, update)


def _reallocate(state, ipt, unc, names, flat_p, warmup, final, total, rank, target, interval):
  """The kept triplets after this step: re-chosen every `interval` steps past warmup, frozen
  once the final budget is reached."""
  step = state.step + 1
  score = {p: ipt[p] * unc[p] for p in ipt}
  per_module = [triplet_scores(score, m, flat_p[m + "/e"]) for m in names]
  flat_scores = jnp.concatenate([s.reshape(-1) for s in per_module])
  count = flat_scores.shape[0] // rank  # modules, counting each layer of a scanned stack
  kept = budget(step, rank * count, target * count, warmup, final, total)
  threshold = jnp.sort(flat_scores)[::-1][jnp.clip(kept - 1, 0, flat_scores.shape[0] - 1)]
  due = (step > warmup) & (step <= total - final) & (step % interval == 0)
  due |= step == total - final  # the final allocation is made once, then kept
  return {m + "/e": jnp.where(due, s >= threshold, state.keep[m + "/e"])
          for m, s in zip(names, per_module)}


def _zero_masked(updates, params, keep: dict):
  """Updates that leave every masked e exactly zero (and the rest as the optimizer chose)."""
  flat_u, flat_p = dict(partition.items(updates)), dict(partition.items(params))
  for path, mask in keep.items():
    flat_u[path] = jnp.where(mask, flat_u[path], -flat_p[path])
  return partition.nest(flat_u)


def kept_ranks(params) -> dict[str, list[int]]:
  """Per module, the number of nonzero e entries (per layer for scanned stacks)."""
  flat = dict(partition.items(params))
  out = {}
  for module in modules(params):
    e = jax.device_get(flat[module + "/e"])
    counts = (e != 0).sum(axis=-1)
    out[module] = [int(c) for c in jnp.atleast_1d(counts)]
  return out
