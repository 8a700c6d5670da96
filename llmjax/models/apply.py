"""Applying a model the way every task does: dropout keys, mutable collections only while
training, the features its output layer reads (which the models sow as `HEAD_INPUT`), and the
statistics of a mixture of experts' sparse layers (`moe_statistics`), whichever task applies it."""

from __future__ import annotations

import contextlib

import jax
from flax import linen as nn

from llmjax.models import moe

# What models sow (collection "intermediates"): the features their output layer reads.
HEAD_INPUT = "head_input"

# Trace-time collectors of sparse layers' statistics: (model, list) pairs, innermost last;
# (None, None) switches collection off (a frozen reference applying the same module).
_SINKS: list[tuple] = []


@contextlib.contextmanager
def moe_statistics(model):
  """Within it, every `apply_model` of `model` (this very module: a teacher beside it is another)
  also collects what its sparse layers sow in `moe.AUX`; yields the list of the sown trees."""
  sown: list = []
  _SINKS.append((model, sown))
  try:
    yield sown
  finally:
    _SINKS.pop()


@contextlib.contextmanager
def without_moe_statistics():
  """Within it, nothing is collected: applications that are not the trained model's own."""
  _SINKS.append((None, None))
  try:
    yield
  finally:
    _SINKS.pop()


def _sink(model) -> list | None:
  for owner, sown in reversed(_SINKS):
    if owner is None or owner is model:
      return sown
  return None


def apply_model(model: nn.Module, variables: dict, *args, train: bool, rng,
                hidden: bool = False, collect: tuple[str, ...] = (), **kwargs):
  """(outputs, updated model_state): mutable collections update only while training.

  With `hidden`, returns ((outputs, last hidden states), model_state): the states the model
  sowed as `HEAD_INPUT` (see `sown_hidden`). With `collect` (names of collections the model
  sows into, such as models/moe.py's statistics), returns (outputs, model_state, {name: sown}).
  """
  model_state = {k: v for k, v in variables.items() if k != "params"}
  rngs = {"dropout": rng} if rng is not None else None
  sink = _sink(model) if moe.has_sparse_layers(model) and moe.AUX not in collect else None
  mutable = (list(model_state) if model_state and train else []) + (
      ["intermediates"] if hidden else []) + list(collect) + ([moe.AUX] if sink is not None else [])
  if not mutable:
    return model.apply(variables, *args, rngs=rngs, **kwargs), model_state
  out, updated = model.apply(variables, *args, mutable=mutable, rngs=rngs, **kwargs)
  updated = dict(updated)
  sown = updated.pop("intermediates", None)
  if sink is not None:
    sink.append(updated.pop(moe.AUX, {}))
  collected = {name: updated.pop(name, {}) for name in collect}
  if train and model_state:
    model_state = updated
  out = (out, sown_hidden(sown)) if hidden else out
  return (out, model_state, collected) if collect else (out, model_state)


def sown_hidden(intermediates) -> jax.Array:
  """The one array a model sowed as `HEAD_INPUT` (wherever in its tree the backbone sits)."""
  found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates or {})
           if any(getattr(k, "key", None) == HEAD_INPUT for k in path)]
  if len(found) != 1:
    raise ValueError(f"expected the model to sow one '{HEAD_INPUT}' array, found {len(found)}")
  return found[0]
