"""A finished (or running) run's directory, reopened: its experiment, task and verified state.

`llmjax export` and `llmjax eval` start here; the task comes back with the info its data revealed
(`task_info.json`: label names, special token ids), so no data needs reading to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax

from llmjax import checkpoint, config as config_lib, finetune, tasks, weights
from llmjax.errors import UserError
from llmjax.parallel import mesh as meshlib, sharding
from llmjax.tasks import distill
from llmjax.train import init, optim, pretrained

CONFIG_FILE, TASK_INFO_FILE = "config.json", "task_info.json"


@dataclasses.dataclass
class Restored:
  exp: config_lib.Experiment
  task: tasks.Task
  model: object
  step: int
  state: object
  mesh: jax.sharding.Mesh
  # data -> the state the run started from (seed and init_from; a dpo run's copied reference)
  started: Callable | None = None

  @property
  def params(self) -> dict:
    """Every parameter of the model: the trained ones and the frozen base together."""
    return finetune.merge(self.state.params, self.state.frozen)


def experiment(workdir: str) -> config_lib.Experiment:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"--workdir={workdir} has no {CONFIG_FILE}: not an llmjax run directory")
  with open(path) as f:
    return config_lib.from_json(f.read())


def task(workdir: str, exp: config_lib.Experiment) -> tasks.Task:
  path = os.path.join(workdir, TASK_INFO_FILE)
  info = {}
  if os.path.exists(path):
    with open(path) as f:
      info = json.load(f)
  return tasks.build(exp, info)


def restore(workdir: str, step: int | None = None) -> Restored:
  """The run's checkpoint `step` (default: newest), verified, on this host's devices (dp)."""
  exp = experiment(workdir)
  run_task = task(workdir, exp)
  model = run_task.model()
  mesh = meshlib.make_mesh(dataclasses.replace(exp.mesh, data=-1, fsdp=1, tensor=1, expert=1,
                                                 rules="dp"))
  rules = sharding.rules_for("dp")
  # The checkpoint's tree (with a distillation's projection, if it trained one), restored and
  # then narrowed to the model's own parameters.
  saved_task = distill.as_trained(run_task)
  init_variables = init.variables_init(saved_task, model, run_task.example_batch(1))
  trainable = finetune.plan(exp, init.param_shapes(init_variables))
  tx = finetune.optimizer(exp, optim.make_optimizer(exp.optim, exp.train.steps,
                                                     optim.param_groups(run_task)), trainable)
  abstract, shardings = init.state_shardings(init_variables, tx, mesh, rules, trainable)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise UserError(f"--step={step}: available checkpoint steps in {workdir}: "
                      f"{steps or 'none'}")
    chosen = steps[-1] if step is None else step
    state, data_state, _ = ckpt.restore(chosen, abstract.checkpointed(),
                                        shardings.checkpointed())
  finally:
    ckpt.close()
  if trainable is not None:  # the checkpoint holds only what trained: rebuild the base
    with jax.set_mesh(mesh):
      state = pretrained.with_base(exp, state, data_state, init_variables, tx, mesh, rules,
                                   shardings, trainable)
  state = state.replace(params=distill.without_projection(state.params))

  def started(data):
    with jax.set_mesh(mesh):
      start = pretrained.initialised(pretrained.as_recorded(exp, data_state), init_variables, tx,
                                     mesh, rules, shardings, trainable)
      return finetune.initialise_added(exp, start, data)
  return Restored(exp, run_task, model, chosen, state, mesh, started)


def open_weights(value: str, key: str, dtype: str = "float32"):
  """(source, llmjax.hf.convert.Loaded) of a CLI --checkpoint: any weights source, ready to run;
  a training run (workdir:PATH[@STEP] or its bare directory) reopened by `restore`."""
  source = weights.parse_checkpoint(value, key)
  return source, source.open(dtype, open_run=restore)
