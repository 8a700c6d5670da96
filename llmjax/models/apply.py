"""Applying a model the way every task does: dropout keys, mutable collections only while
training, and the features its output layer reads (which the models sow as `HEAD_INPUT`)."""

from __future__ import annotations

import jax
from flax import linen as nn

# What models sow (collection "intermediates"): the features their output layer reads.
HEAD_INPUT = "head_input"


def apply_model(model: nn.Module, variables: dict, *args, train: bool, rng,
                hidden: bool = False, collect: tuple[str, ...] = (), **kwargs):
  """(outputs, updated model_state): mutable collections update only while training.

  With `hidden`, returns ((outputs, last hidden states), model_state): the states the model
  sowed as `HEAD_INPUT` (see `sown_hidden`). With `collect` (names of collections the model
  sows into, such as models/moe.py's statistics), returns (outputs, model_state, {name: sown}).
  """
  model_state = {k: v for k, v in variables.items() if k != "params"}
  rngs = {"dropout": rng} if rng is not None else None
  mutable = (list(model_state) if model_state and train else []) + (
      ["intermediates"] if hidden else []) + list(collect)
  if not mutable:
    return model.apply(variables, *args, rngs=rngs, **kwargs), model_state
  out, updated = model.apply(variables, *args, mutable=mutable, rngs=rngs, **kwargs)
  updated = dict(updated)
  sown = updated.pop("intermediates", None)
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
