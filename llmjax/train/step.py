"""Pure train and eval steps: `(state, batch) -> (state, metrics)`, loss and optimiser bound.

The steps know nothing of models or objectives: `loss(variables, batch, *, rng, train)` returns
`LossTerms` (sums and counts; a task's loss with its model bound, see `bind_loss`). `jit_steps`
jits both once with explicit shardings, donating the train state; the loop and the benchmarks
share it, so benchmarks time what runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from llmjax import tasks
from llmjax.models import moe
from llmjax.parallel import sharding
from llmjax.parallel.mesh import BATCH_AXES
from llmjax.train.compile_options import compiler_options
from llmjax.train.state import TrainState, loss_variables


# What a logged interval of train steps averages: the loss, the gradient norm and, for a mixture
# of experts, its scalar statistics (per counted weight, like the loss).
TRAIN_MEANS = ("loss", "grad_norm") + moe.TRAIN_SUMS


def split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [A, B/A, ...], microbatch a = rows a, a+A, ...: each device keeps its own rows."""
  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    spec = jax.sharding.PartitionSpec(None, BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, spec) if _has_mesh() else x
  return jax.tree.map(split, batch)


def _has_mesh() -> bool:
  return not jax.sharding.get_abstract_mesh().empty


def bind_loss(task, model):
  """The step's loss: `task.loss` with its model bound, and the statistics of its sparse layers
  (a mixture of experts, any task: `tasks.loss_with_moe`)."""
  return functools.partial(tasks.loss_with_moe, task, model)


def _logged(terms) -> dict:
  """The metric sums a train step reports besides its loss (the scalar MoE statistics)."""
  return {k: v for k, v in terms.sums.items() if k in moe.TRAIN_SUMS}


def _grads(state: TrainState, batch: dict, rng, loss, accum_steps: int):
  """Summed loss, weight (tokens, examples), summed grads and summed logged metrics (`_logged`)
  over `accum_steps` microbatches.

  Gradients are taken over `state.params` only: frozen parameters enter as constants, so no
  gradient of theirs is ever computed.
  """
  def loss_fn(params, microbatch, key, model_state):
    variables = loss_variables(state, params, model_state)
    terms = loss(variables, microbatch, rng=key, train=True)
    return terms.loss_sum, (terms.weight, terms.model_state, _logged(terms))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (count, model_state, logged)), grads = grad_fn(state.params, batch, rng,
                                                             state.model_state)
    return loss_sum, count, grads, model_state, logged

  def body(carry, xs):
    loss_acc, count_acc, grads_acc, model_state, logged_acc = carry
    microbatch, index = xs
    (loss_sum, (count, model_state, logged)), grads = grad_fn(
        state.params, microbatch, jax.random.fold_in(rng, index), model_state)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    logged_acc = jax.tree.map(jnp.add, logged_acc, logged)
    return (loss_acc + loss_sum, count_acc + count, grads_acc, model_state, logged_acc), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  microbatches = split_microbatches(batch, accum_steps)
  # the logged sums' structure: the loss traced abstractly on one microbatch (nothing computed)
  first = jax.tree.map(lambda x: x[0], microbatches)
  shapes = jax.eval_shape(loss_fn, state.params, first, rng, state.model_state)[1][2]
  logged = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, state.model_state,
          logged)
  xs = (microbatches, jnp.arange(accum_steps))
  (loss_sum, count, grads, model_state, logged), _ = jax.lax.scan(body, init, xs)
  return loss_sum, count, grads, model_state, logged


def train_step(state: TrainState, batch: dict, *, loss, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum_steps: int = 1):
  """One optimizer update on a global batch; loss is the mean over everything that counts."""
  rng = jax.random.fold_in(state.rng, state.step)
  loss_sum, count, grads, model_state, logged = _grads(state, batch, rng, loss, accum_steps)
  denominator = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss_sum) & opt_state.last_finite
  metrics = {
      "loss": loss_sum / denominator,
      "weight": count,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step),
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      **{key: value / denominator for key, value in logged.items()},
  }
  # apply_if_finite already zeroed the update of a non-finite step (and counted it); running
  # statistics such as BatchNorm's must not take it in either.
  model_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), model_state,
                             state.model_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            model_state=model_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, loss):
  """{"loss_sum", "weight", **metric sums} of one batch, deterministic; batches add up."""
  variables = loss_variables(state, state.params, state.model_state)
  terms = loss(variables, batch, rng=None, train=False)
  return {"loss_sum": terms.loss_sum, "weight": terms.weight, **terms.sums}


class DonatingStep:
  """`train(state, batch)`, jitted with the state donated except its frozen parameters and
  teacher.

  Those are a separate, undonated argument: they are read every step and never change, so
  donating them would only ask XLA to copy them into the output. `lower` works like a jitted
  function's.
  """

  def __init__(self, step_fn, state_shardings, batch_sharding, metrics_sharding, options):
    def step(state, kept, batch):
      new_state, metrics = step_fn(state.with_kept(kept), batch)
      return new_state.checkpointed(), metrics
    rest = state_shardings.checkpointed()
    self.jitted = jax.jit(step, in_shardings=(rest, state_shardings.kept(), batch_sharding),
                          out_shardings=(rest, metrics_sharding), donate_argnums=0,
                          compiler_options=options)

  def __call__(self, state, batch):
    return _call_apart(self.jitted, state, batch)

  def lower(self, state, batch):
    return _Lowered(self.jitted.lower(state.checkpointed(), state.kept(), batch))


def _call_apart(fn, state, batch):
  new_state, metrics = fn(state.checkpointed(), state.kept(), batch)
  return new_state.with_kept(state.kept()), metrics


class _Lowered:
  """A lowered `DonatingStep`: `compile()` gives a step called as `(state, batch)` again; the
  rest (as_text, cost_analysis, ...) is jax's."""

  def __init__(self, lowered):
    self._lowered = lowered

  def compile(self):
    return _Compiled(self._lowered.compile())

  def __getattr__(self, name):
    return getattr(self._lowered, name)


class _Compiled:
  def __init__(self, compiled):
    self._compiled = compiled

  def __call__(self, state, batch):
    return _call_apart(self._compiled, state, batch)

  def __getattr__(self, name):  # memory_analysis, as_text, ...
    return getattr(self._compiled, name)


def jit_steps(loss, tx: optax.GradientTransformation, schedule, accum_steps: int, mesh,
              state_shardings, model=None):
  """(train, evaluate): jitted with explicit shardings and the compile options of the backend
  and of `model` (the one `loss` is bound to, if it declares any: compile_options.py)."""
  batch_sharding = sharding.batch_sharding(mesh)
  options = compiler_options(mesh, model)
  train = DonatingStep(
      functools.partial(train_step, loss=loss, tx=tx, schedule=schedule,
                        accum_steps=accum_steps),
      state_shardings, batch_sharding, sharding.replicated(mesh), options)
  evaluate = jax.jit(functools.partial(eval_step, loss=loss),
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=sharding.replicated(mesh), compiler_options=options)
  return train, evaluate
