"""Abstract initialisation: eval_shape -> logical shardings -> jit(init, out_shardings).

Full weights never materialise on one device: each parameter is created directly in its shard.
`init_variables(rngs)` is the model's own init on a zero batch (`variables_init` builds it from a
task), so this module knows nothing of models, objectives or batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from llmjax import finetune
from llmjax.parallel import sharding
from llmjax.train.state import TrainState


def variables_init(task, model, example_batch: dict):
  """rngs -> every variable of `model`, initialised on zeros shaped like `example_batch`."""
  def init_variables(rngs):
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_batch)
    return task.init(model, rngs, zeros)
  return init_variables


def _boxed_state(rng, *, init_variables, tx: optax.GradientTransformation, trainable=None):
  """A fresh TrainState whose params (and matching optimizer moments) keep their logical boxes.

  With a `trainable` set of paths (config.finetune), only those are `params` (and get moments);
  the rest are `frozen`.
  """
  params_rng, state_rng = jax.random.split(rng)
  variables = dict(init_variables({"params": params_rng, "dropout": params_rng}))
  params, frozen = finetune.split(variables.pop("params"), trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, model_state=dict(variables), frozen=frozen)


def param_shapes(init_variables):
  """Every parameter's path and abstract value, before any trainable/frozen split."""
  shapes = jax.eval_shape(lambda rng: init_variables({"params": rng, "dropout": rng}),
                          jax.random.PRNGKey(0))
  return dict(finetune.partition.items(nn.unbox(shapes["params"])))


def state_shardings(init_variables, tx, mesh: Mesh, rules, trainable=None):
  """(abstract unboxed state, NamedShardings) without allocating anything."""
  boxed = jax.eval_shape(functools.partial(_boxed_state, init_variables=init_variables, tx=tx,
                                           trainable=trainable), jax.random.PRNGKey(0))
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def init_state(seed: int, init_variables, tx, mesh: Mesh, rules, shardings,
               trainable=None) -> TrainState:
  """Initialise every array directly into its sharding."""
  init = functools.partial(_boxed_state, init_variables=init_variables, tx=tx,
                           trainable=trainable)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(
        jax.random.PRNGKey(seed))
