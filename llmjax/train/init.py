"""Abstract initialisation: eval_shape -> logical shardings -> jit(init, out_shardings).

Full weights never materialise on one device: each parameter is created directly in its shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from llmjax.parallel import sharding
from llmjax.train.state import TrainState


def _boxed_state(rng, *, model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
  """A fresh TrainState whose params (and matching optimizer moments) keep their logical boxes."""
  params_rng, state_rng = jax.random.split(rng)
  tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
  variables = model.init({"params": params_rng, "dropout": params_rng}, tokens_BL)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, model_state=dict(variables))


def state_shardings(model, tx, seq_len: int, mesh: Mesh, rules):
  """(abstract unboxed state, NamedShardings) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_boxed_state, model=model, tx=tx, seq_len=seq_len),
                         jax.random.PRNGKey(0))
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def init_state(seed: int, model, tx, seq_len: int, mesh: Mesh, rules, shardings) -> TrainState:
  """Initialise every array directly into its sharding."""
  init = functools.partial(_boxed_state, model=model, tx=tx, seq_len=seq_len)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
        jax.random.PRNGKey(seed))
