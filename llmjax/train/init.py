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
from llmjax.random_draws import drawn_together
from llmjax.train.state import TrainState


class VariablesInit:
  """rngs -> every variable of `model`, initialised on zeros shaped like `example_batch`.

  `abstract()` is its shapes with their logical boxes, traced once: a run asks for them three
  times or more (the trainable/frozen plan, the state's shardings, MFU's parameter count) and each
  trace of a model costs as much as its whole init program."""

  def __init__(self, task, model, example_batch: dict):
    self.task, self.model, self.example_batch = task, model, example_batch
    self._abstract = None

  def __call__(self, rngs):
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.example_batch)
    return self.task.init(self.model, rngs, zeros)

  def abstract(self) -> dict:
    """Every variable's abstract value with its logical box."""
    if self._abstract is None:
      self._abstract = jax.eval_shape(lambda rng: self({"params": rng, "dropout": rng}),
                                      jax.random.PRNGKey(0))
    return self._abstract


def variables_init(task, model, example_batch: dict) -> VariablesInit:
  return VariablesInit(task, model, example_batch)


def _state_of(variables: dict, state_rng, *, tx: optax.GradientTransformation, trainable=None):
  """A fresh TrainState from a model's `variables`: with a `trainable` set of paths
  (config.finetune), only those are `params` (and get optimizer moments); the rest are `frozen`.
  Logical boxes on the variables carry through to the matching moments."""
  variables = dict(variables)
  params, frozen = finetune.split(variables.pop("params"), trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, model_state=dict(variables), frozen=frozen)


def _boxed_state(rng, *, init_variables, tx: optax.GradientTransformation, trainable=None):
  """A fresh TrainState whose params (and matching optimizer moments) keep their logical boxes."""
  params_rng, state_rng = jax.random.split(rng)
  return _state_of(init_variables({"params": params_rng, "dropout": params_rng}), state_rng,
                   tx=tx, trainable=trainable)


def param_shapes(init_variables: VariablesInit):
  """Every parameter's path and abstract value, before any trainable/frozen split."""
  return dict(finetune.partition.items(nn.unbox(init_variables.abstract()["params"])))


def state_shardings(init_variables: VariablesInit, tx, mesh: Mesh, rules, trainable=None):
  """(abstract unboxed state, NamedShardings) without allocating anything (the model's abstract
  variables are traced once, then only the optimizer's state is)."""
  state_rng = jax.eval_shape(lambda: jax.random.split(jax.random.PRNGKey(0))[1])
  boxed = jax.eval_shape(functools.partial(_state_of, tx=tx, trainable=trainable),
                         init_variables.abstract(), state_rng)
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def init_state(seed: int, init_variables, tx, mesh: Mesh, rules, shardings,
               trainable=None) -> TrainState:
  """Initialise every array directly into its sharding; the small random draws are hashed
  together (llmjax.random_draws: the same values, half the compile of a small model's init)."""
  init = functools.partial(_boxed_state, init_variables=init_variables, tx=tx,
                           trainable=trainable)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(drawn_together(lambda rng: nn.unbox(init(rng))), out_shardings=shardings)(
        jax.random.PRNGKey(seed))
