"""A finished (or running) run's directory, reopened: its experiment, task and verified state.

`llmjax export` and `llmjax eval` start here; the task comes back with the info its data revealed
(`task_info.json`: label names, special token ids), so no data needs reading to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from llmjax import checkpoint, config as config_lib, tasks
from llmjax.errors import UserError
from llmjax.parallel import mesh as meshlib, sharding
from llmjax.train import init, optim

CONFIG_FILE, TASK_INFO_FILE = "config.json", "task_info.json"


@dataclasses.dataclass
class Restored:
  exp: config_lib.Experiment
  task: tasks.Task
  model: object
  step: int
  state: object
  mesh: jax.sharding.Mesh


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
  model, tx = run_task.model(), optim.make_optimizer(exp.optim, exp.train.steps)
  mesh = meshlib.make_mesh(dataclasses.replace(exp.mesh, data=-1, fsdp=1, tensor=1, rules="dp"))
  init_variables = init.variables_init(run_task, model, run_task.example_batch(1))
  abstract, shardings = init.state_shardings(init_variables, tx, mesh, sharding.rules_for("dp"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1_000_000)
  try:
    steps = ckpt.all_steps()
    if not steps or (step is not None and step not in steps):
      raise UserError(f"--step={step}: available checkpoint steps in {workdir}: "
                      f"{steps or 'none'}")
    chosen = steps[-1] if step is None else step
    state, _, _ = ckpt.restore(chosen, abstract, shardings)
  finally:
    ckpt.close()
  return Restored(exp, run_task, model, chosen, state, mesh)
