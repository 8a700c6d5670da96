"""Optimiser from OptimConfig: AdamW or SGD (momentum, Nesterov), warmup then cosine / constant /
step decay, clipping, a weight-decay mask (no decay for norms, biases, embeddings), and a
non-finite guard; per parameter group settings for a task that declares ParamGroups."""

from __future__ import annotations

import re
from typing import Callable

import jax
import optax

from llmjax import tasks
from llmjax.config import OptimConfig
from llmjax.treepaths import path_str

# Parameters that never get weight decay: norms, biases, embeddings (path regexes).
NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$", r"embedding$")


def regex_mask(params, patterns, *, match_means: bool = True):
  """Bool pytree over params: whether the parameter path matches any pattern."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(path_str(path)) for c in compiled) == match_means, params)


def step_boundaries(cfg: OptimConfig, total_steps: int) -> list[int]:
  """schedule=step: the steps where lr is multiplied by step_factor (fractions of the run)."""
  return [int(float(f) * total_steps) for f in cfg.step_boundaries.split(",") if f.strip()]


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine decay to min_lr_ratio, constant, or steps (x step_factor)."""
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.lr)
  else:  # boundaries count from the start of the run, warmup included
    after = optax.piecewise_constant_schedule(
        cfg.lr, {max(b - cfg.warmup_steps, 0): cfg.step_factor
                 for b in step_boundaries(cfg, total_steps)})
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _transform(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """Clipping, then AdamW or SGD with cfg's schedule; decay masked off norms/biases/embeddings."""
  schedule = learning_rate_schedule(cfg, total_steps)
  decay_mask = lambda params: regex_mask(params, NO_DECAY, match_means=False)
  chain = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  if cfg.name == "sgd":  # decay added to the gradient before momentum, as torch's SGD does
    chain += [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
              optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)]
  else:
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   groups: tuple[dict, Callable[[str], str]] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW or SGD; decay masked off norms/biases/embeddings; non-finite updates skipped.

  `groups` ({name: OptimConfig}, path -> name): each group of parameters gets its own settings
  (optax.multi_transform; clipping is per group), as a task that declares ParamGroups asks.
  """
  if groups is None:
    inner = _transform(cfg, total_steps)
  else:
    settings, group_of = groups
    labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: group_of(path_str(path)), params)
    inner = optax.multi_transform(
        {name: _transform(c, total_steps) for name, c in settings.items()}, labels)
  # A non-finite step leaves params and moments untouched; the loop decides when to give up.
  return optax.apply_if_finite(inner, max_consecutive_errors=2**30)


def param_groups(task) -> tuple[dict, Callable[[str], str]] | None:
  """`make_optimizer`'s groups for a task that declares ParamGroups; None for any other."""
  if not tasks.supports(task, tasks.ParamGroups):
    return None
  return task.param_groups(), task.param_group
