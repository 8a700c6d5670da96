"""Magnitude pruning (config.prune) as an optax transformation around the run's optimizer.

The masks (bool, one per pruned parameter, shaped and logically boxed like it, so they shard
like their weights) live in the optimizer state and with it in every checkpoint: a resumed run
goes on with the same masks and schedule. Each update (inside the jitted step):
1. on a pruning step, the mask is chosen from the weights as they are before the update: the
   smallest |w| per array (layer), across all pruned arrays (global), or the M - N smallest of
   every M consecutive weights along the kernel's second-to-last axis (nm); weights pruned
   before rank first, so masks only grow;
2. the gradients of pruned weights are zeroed before the inner optimizer: its moments of them
   decay instead of following gradients that cannot be applied, and clipping sees live weights;
3. the update of a pruned weight is replaced by -w, so the new weight is exactly w - w = 0
   whatever weight decay or momentum asked for.
Sparsity s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3 at t = t0, t0 + frequency, ...
and at end itself (Zhu & Gupta 2017); one-shot pruning is the schedule with end = t0.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import distributed, treepaths
from llmjax.config_prune import PruneConfig
from llmjax.errors import ConfigError, capped

SPARSITY = "sparsity"  # the metric key: the fraction of zeros over every pruned parameter


class PruneState(NamedTuple):
  inner: optax.OptState
  count: jax.Array  # int32: updates applied so far (the train state's step)
  masks: dict  # parameter path -> bool mask (True: kept)

  @property
  def last_finite(self) -> jax.Array:  # what the train step reads of apply_if_finite's state
    return self.inner.last_finite


def pruned_paths(p: PruneConfig, paths) -> list[str]:
  """The parameter paths config.prune.params matches (full match), sorted."""
  pattern = re.compile(p.params)
  return sorted(path for path in paths if pattern.fullmatch(path))


def check(p: PruneConfig, param_shapes: dict, trainable) -> None:
  """The regex names trained parameters; N:M's grouped axis divides by M (before any write)."""
  if not p.on:
    return
  paths = [k for k in param_shapes if trainable is None or k in trainable]
  matched = pruned_paths(p, paths)
  if not matched:
    raise ConfigError(f"config.prune.params={p.params!r} matches no trained parameter; "
                      f"parameters: {capped(paths)}")
  if p.method == "nm":
    _, m = p.n_m()
    for path in matched:
      shape = param_shapes[path].shape
      if len(shape) < 2 or shape[-2] % m:
        raise ConfigError(f"config.prune.nm={p.nm!r}: {path} has shape {tuple(shape)}, whose "
                          f"input axis (second to last) is not divisible by M={m}")


def schedule(p: PruneConfig, t):
  """The sparsity the pruning step `t` reaches (the cubic schedule; N:M's 1 - N/M)."""
  if p.method == "nm":
    n, m = p.n_m()
    return jnp.float32(1.0 - n / m)
  if not p.gradual:
    return jnp.float32(p.target)
  progress = jnp.clip((t - p.start_step) / (p.end_step - p.start_step), 0.0, 1.0)
  return p.target + (p.initial - p.target) * (1.0 - progress) ** 3


def due(p: PruneConfig, t):
  """Whether step `t` (updates applied before it) prunes."""
  end = p.end_step if p.gradual else p.start_step
  on_grid = (t - p.start_step) % p.frequency == 0
  return (t >= p.start_step) & (t <= end) & (on_grid | (t == end))  # end_step reaches target


def _ranks(scores):
  """The rank of each score along the last axis (0: smallest; ties in index order)."""
  return jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)


def _pruned_count(sparsity, size: int):
  """How many of `size` weights a sparsity prunes (rounded to the nearest)."""
  return jnp.floor(sparsity * size + 0.5).astype(jnp.int32)


def _nm_mask(score, n: int, m: int):
  """Keep the n largest scores of every m consecutive along the second-to-last axis."""
  moved = jnp.moveaxis(score, -2, -1)
  groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
  keep = _ranks(groups) >= m - n
  return jnp.moveaxis(keep.reshape(moved.shape), -1, -2)


def new_masks(p: PruneConfig, params: dict, masks: dict, sparsity) -> dict:
  """Masks at `sparsity` from |params|; weights already pruned score below every live one."""
  scores = {k: jnp.where(masks[k], jnp.abs(params[k]).astype(jnp.float32), -1.0) for k in masks}
  if p.method == "nm":
    n, m = p.n_m()
    return {k: _nm_mask(s, n, m) for k, s in scores.items()}
  if p.method == "layer":
    return {k: _ranks(s.reshape(-1)).reshape(s.shape) >= _pruned_count(sparsity, s.size)
            for k, s in scores.items()}
  keys = sorted(scores)
  flat = jnp.concatenate([scores[k].reshape(-1) for k in keys])
  keep = _ranks(flat) >= _pruned_count(sparsity, flat.size)
  out, start = {}, 0
  for k in keys:
    out[k] = keep[start:start + scores[k].size].reshape(scores[k].shape)
    start += scores[k].size
  return out


def _masked(tree, masks: dict, replace):
  """`tree` with each masked leaf's pruned entries set to replace(path) (where mask is False)."""
  flat = dict(treepaths.items(tree))
  for path, mask in masks.items():
    flat[path] = jnp.where(mask, flat[path], replace(path))
  return treepaths.nest(flat)


def with_pruning(tx: optax.GradientTransformation, p: PruneConfig) -> optax.GradientTransformation:
  """`tx` with config.prune's masks chosen on schedule and applied to every update."""

  def init(params):
    flat = dict(treepaths.items(params))
    # tree.map reaches through flax's logical boxes: each mask shards like its weight.
    masks = {k: jax.tree.map(lambda x: jnp.ones(x.shape, bool), flat[k])
             for k in pruned_paths(p, flat)}
    return PruneState(tx.init(params), jnp.zeros((), jnp.int32), masks)

  def update(grads, state, params):
    flat_p = dict(treepaths.items(params))
    masks = jax.lax.cond(due(p, state.count),
                         lambda: new_masks(p, flat_p, state.masks, schedule(p, state.count)),
                         lambda: state.masks)
    grads = _masked(grads, masks, lambda path: 0.0)
    updates, inner = tx.update(grads, state.inner, params)
    updates = _masked(updates, masks, lambda path: -flat_p[path])  # w + (-w) is exactly 0
    return updates, PruneState(inner, state.count + 1, masks)

  return optax.GradientTransformation(init, update)


def sparsity(p: PruneConfig, params) -> dict:
  """{"sparsity": zeros over all pruned weights, "sparsity/<path>": per parameter} ({} off)."""
  if not p.on:
    return {}
  flat = dict(treepaths.items(params))
  paths = pruned_paths(p, flat)
  # Zeros counted where the weights live; only the counts come to the host (a collective with
  # several processes, as every process evaluates).
  zeros = distributed.to_host(_count_zeros({k: flat[k] for k in paths}))
  sizes = {k: int(np.size(flat[k])) for k in paths}
  report = {SPARSITY: sum(int(z) for z in zeros.values()) / max(sum(sizes.values()), 1)}
  report.update({f"{SPARSITY}/{k}": int(zeros[k]) / max(sizes[k], 1) for k in paths})
  return report


@jax.jit
def _count_zeros(flat: dict) -> dict:
  return {k: jnp.sum(v == 0, dtype=jnp.int32) for k, v in flat.items()}
