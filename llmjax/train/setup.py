"""A run's assembly: validate the experiment against the devices and the data, then build what
the loop needs (task, mesh and rules, model, optimiser, abstract state and its shardings, the
distillation teacher, the jitted steps). Nothing here writes to the workdir: whatever can reject
the input fails before `llmjax.train.loop` touches it.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from flax import linen as nn

from llmjax import finetune, tasks
from llmjax.config import Experiment
from llmjax.errors import ConfigError
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding
from llmjax.tasks.distill import PROJECTION_SHAPE, Distilled
from llmjax.train import early_stop, init, optim, pretrained, reference, step
from llmjax.train import teacher as teacher_lib


@dataclasses.dataclass
class Setup:
  """What the loop needs, assembled and validated before anything is written."""
  exp: Experiment
  mesh: jax.sharding.Mesh
  rules: tuple
  task: tasks.Task
  model: nn.Module
  data: tasks.Data
  tx: object
  schedule: object
  init_variables: object  # rngs -> variables (the task's init on a zero example batch)
  abstract_state: object
  state_shardings: object
  trainable: frozenset | None = None  # parameter paths that train (None: all of them)
  teacher: object = None  # config.distill's teacher (llmjax.train.teacher.Teacher) or None


def prepare(exp: Experiment, workdir: str | None = None, devices=None) -> Setup:
  """Validate against the devices and data; build task, model, optimiser and abstract state."""
  resuming = bool(workdir) and os.path.isdir(os.path.join(workdir, "checkpoints"))
  exp = pretrained.resolve_model(exp, pin=not resuming)  # a new run records the step it starts at
  task = tasks.build(exp)
  mesh = meshlib.make_mesh(exp.mesh, devices)
  rules = sharding.rules_for(exp.mesh.rules)
  sharding.check_divisible(exp.model, mesh, exp.mesh.rules)
  check_batch(exp, mesh)
  data = task.data(workdir)
  check_vocab(exp, data.tokenizer)
  task = task.with_info(data.info)
  model = task.model()
  teacher = None
  if exp.distill.teacher:  # the task's loss becomes the distilled one; the state gains a teacher
    task, teacher, data = distilled(exp, task, model, data, mesh, rules)
  tx = optim.make_optimizer(exp.optim, exp.train.steps, optim.param_groups(task))
  schedule = optim.learning_rate_schedule(exp.optim, exp.train.steps)
  init_variables = init.variables_init(task, model, task.example_batch(1))
  param_shapes = init.param_shapes(init_variables)
  trainable = finetune.plan(exp, param_shapes)
  if tasks.supports(task, tasks.References):  # a reference this run cannot give fails here
    task.check_reference(trainable, frozenset(param_shapes))
    reference.check_vocabulary(exp, data.tokenizer)
  tx = finetune.optimizer(exp, tx, trainable)
  abstract_state, state_shardings = reference.abstract(
      task, *init.state_shardings(init_variables, tx, mesh, rules, trainable))
  if teacher is not None:
    online = not exp.distill.top_k
    abstract_state = abstract_state.replace(teacher=teacher.abstract if online else {})
    state_shardings = state_shardings.replace(teacher=teacher.shardings if online else {})
  if exp.train.init_from and not resuming:
    full = pretrained.float_base(exp, init_variables, finetune.merge(abstract_state.params,
                                                                     abstract_state.frozen))
    pretrained.check(exp.train.init_from, pretrained.new_params(exp), full)
  s = Setup(exp, mesh, rules, task, model, data, tx, schedule, init_variables, abstract_state,
            state_shardings, trainable, teacher)
  early_stop.check(s)  # config.train.early_stop_metric is one this run reports
  return s


def check_batch(exp: Experiment, mesh) -> None:
  """The global batch splits evenly over the data-parallel devices and the microbatches, and
  the sequence over the context-parallel ones."""
  context = mesh.shape["context"]
  if exp.data.seq_len % context:
    raise ConfigError(f"config.data.seq_len={exp.data.seq_len} must be divisible by the "
                      f"context-parallel size (config.mesh.context={context})")
  per_step = meshlib.batch_parallelism(mesh) * exp.optim.accum_steps
  if exp.train.batch_size % per_step:
    raise ConfigError(f"config.train.batch_size={exp.train.batch_size} must be divisible by the "
                      f"data-parallel size (mesh data*fsdp={meshlib.batch_parallelism(mesh)}) x "
                      f"config.optim.accum_steps={exp.optim.accum_steps}")


def check_vocab(exp: Experiment, tokenizer) -> None:
  """The model's embedding table holds every id the tokenizer can produce."""
  if tokenizer is not None and tokenizer.vocab_size > exp.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={exp.model.vocab_size} is smaller than the "
                      f"tokenizer's vocabulary ({tokenizer.vocab_size}; config.data.tokenizer="
                      f"{exp.data.tokenizer!r})")


def distilled(exp: Experiment, task, model, data, mesh, rules):
  """(the task with config.distill's loss, the teacher, the data with what the run records of
  the distillation in its info): the teacher is checked against the student first."""
  if not tasks.supports(task, tasks.Predicts):
    raise ConfigError(f"config.distill.teacher={exp.distill.teacher!r}: the {task.name} task does "
                      "not expose its logits (it does not declare Predicts), which distillation "
                      "matches")
  if exp.distill.top_k and not task.fixed_inputs:
    raise ConfigError(f"config.distill.top_k={exp.distill.top_k}: an offline teacher needs inputs "
                      f"fixed by the data, but the {task.name} task changes them every step "
                      "(masked-LM corruption, image augmentation); use the online teacher "
                      "(top_k=0)")
  teacher = teacher_lib.build(exp, task, data, mesh, rules)
  teacher_lib.check_outputs(exp, teacher, task, model)
  print(teacher_lib.describe(exp, teacher), file=sys.stderr)
  if exp.distill.hidden_weight:  # the projection's shape is recorded: eval can rebuild the tree
    widths = [teacher_lib.hidden_width(t, m) for t, m in ((task, model),
                                                          (teacher.task, teacher.model))]
    data = dataclasses.replace(data, info={**data.info, PROJECTION_SHAPE: widths})
    task = task.with_info(data.info)
  return Distilled(task, teacher.task.with_info(data.info), teacher.model), teacher, data


def compile_steps(s: Setup):
  """The jitted train and eval steps, with explicit shardings; the train state is donated."""
  return step.jit_steps(step.bind_loss(s.task, s.model), s.tx, s.schedule,
                        s.exp.optim.accum_steps, s.mesh, s.state_shardings, s.model)
