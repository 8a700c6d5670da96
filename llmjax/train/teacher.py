"""`config.distill.teacher`: the model a student is distilled from, loaded once and sharded like
the student.

The teacher is the student's own task with the teacher checkpoint's model config (any size, any
architecture the loaders read: an llmjax workdir or export, or a Hugging Face directory), so it
reads the same batches the same way. Its variables are created abstractly, given the logical
shardings the run's rules assign, and each array is read straight into its shards; they live in
the train state's `teacher` field, which is never differentiated, donated or checkpointed (a
resumed run loads the teacher again).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import linen as nn

from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.hf.arch import RUNTIME_FIELDS
from llmjax.parallel import sharding
from llmjax.train import init, pretrained

KEY = "config.distill.teacher"


@dataclasses.dataclass(frozen=True)
class Teacher:
  task: object  # the student's task class, bound to the teacher's model config
  model: nn.Module
  abstract: dict  # the teacher's variables ("params", maybe "batch_stats"), unboxed shapes
  shardings: dict


def model_config(exp: config_lib.Experiment) -> config_lib.ModelConfig:
  """The teacher's ModelConfig: its checkpoint's shape, the student's numerics (dtype)."""
  spec = exp.distill.teacher
  kind, path = pretrained.weights_source(spec, KEY)
  if kind == "hf":
    from llmjax import hf
    fields = dataclasses.asdict(hf.model_config(path))
  else:
    fields = pretrained.source_model_config(spec, KEY)
  known = {f.name for f in dataclasses.fields(config_lib.ModelConfig)}
  fields = {k: v for k, v in fields.items() if k in known}
  # How the teacher computes follows the run; its layout (scan_layers) follows its checkpoint.
  runtime = {k: getattr(exp.model, k) for k in RUNTIME_FIELDS if k != "scan_layers"}
  return config_lib.ModelConfig(**{**fields, **runtime, "remat": "none", "dropout": 0.0})


def build(exp: config_lib.Experiment, student_task, student_info: dict, mesh, rules) -> Teacher:
  """The teacher's task, model, abstract variables and shardings; checks it can teach."""
  _check_recorded_info(exp.distill.teacher, student_info)
  teacher_exp = dataclasses.replace(
      exp, model=model_config(exp), finetune=config_lib.FinetuneConfig(),
      distill=config_lib.DistillConfig(),
      train=dataclasses.replace(exp.train, init_from="", init_new=""))
  task = type(student_task)(teacher_exp, student_info)
  model = task.model()
  init_variables = init.variables_init(task, model, task.example_batch(1))
  boxed = jax.eval_shape(lambda rng: init_variables({"params": rng, "dropout": rng}),
                         jax.random.PRNGKey(0))
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return Teacher(task, model, nn.unbox(boxed), shardings)


def check_outputs(exp, teacher: Teacher, student_task, student_model) -> None:
  """The teacher's logits must cover the student's vocabulary or labels one to one."""
  batch = student_task.example_batch(1)
  zeros = lambda: jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), batch)  # noqa: E731

  def logits_shape(task, model):
    def run(rng):
      variables = task.init(model, {"params": rng, "dropout": rng}, zeros())
      return task.predict(model, variables, zeros(), rng=None, train=False).logits
    return jax.eval_shape(run, jax.random.PRNGKey(0)).shape

  theirs, ours = logits_shape(teacher.task, teacher.model), logits_shape(student_task,
                                                                         student_model)
  if theirs[-1] != ours[-1]:
    what = "vocabulary" if len(ours) > 2 else "label set"
    raise ConfigError(f"{KEY}={exp.distill.teacher!r}: the teacher's {what} has {theirs[-1]} "
                      f"entries but the student's has {ours[-1]}; a teacher must score the same "
                      f"{what}")


def load(exp, teacher: Teacher) -> dict:
  """The teacher's variables, verified and read straight into their shardings."""
  spec = exp.distill.teacher
  params = pretrained.load_all(spec, teacher.abstract["params"], teacher.shardings["params"], KEY)
  state_abstract = {k: v for k, v in teacher.abstract.items() if k != "params"}
  model_state = {}
  if state_abstract:  # BatchNorm statistics come with the teacher's weights
    model_state = pretrained.load_model_state(
        spec, state_abstract, {k: teacher.shardings[k] for k in state_abstract}, KEY)
  return {"params": params, **model_state}


def _check_recorded_info(spec: str, student_info: dict) -> None:
  """A workdir teacher records its tokenizer and labels (task_info.json): they must be the
  student's."""
  kind, path = pretrained.weights_source(spec, KEY)
  file = os.path.join(path, "task_info.json")
  if kind != "workdir" or not os.path.isfile(file):
    return
  with open(file) as f:
    theirs = json.load(f)
  for field, what in (("tokenizer", "tokenizer"), ("label_names", "label set")):
    if field in theirs and field in student_info and theirs[field] != student_info[field]:
      raise ConfigError(f"{KEY}={spec!r}: the teacher's {what} is {_short(theirs[field])} but "
                        f"the student's is {_short(student_info[field])}; they must be the same")


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 120 else text[:117] + "..."


def describe(exp, teacher: Teacher) -> str:
  count = sum(x.size for x in jax.tree.leaves(teacher.abstract["params"]))
  m = teacher.task.exp.model
  return (f"distilling from {exp.distill.teacher}: {m.arch} d_model={m.d_model} "
          f"n_layers={m.n_layers}, {count:,} parameters")
