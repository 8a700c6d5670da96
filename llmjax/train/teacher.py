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

from llmjax import config as config_lib, weights
from llmjax.data.tokenizers import TOKENIZER_FILE
from llmjax.errors import ConfigError, capped
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


def source(exp: config_lib.Experiment) -> weights.WeightsSource:
  """The weights config.distill.teacher names (a PEFT adapter is no teacher)."""
  return weights.parse(exp.distill.teacher, KEY, kinds=("workdir", "export", "hf"))


def model_config(exp: config_lib.Experiment) -> config_lib.ModelConfig:
  """The teacher's ModelConfig: its checkpoint's shape, the student's numerics (dtype)."""
  # How the teacher computes follows the run; its layout (scan_layers) follows its checkpoint.
  runtime = {k: getattr(exp.model, k) for k in RUNTIME_FIELDS if k != "scan_layers"}
  return source(exp).model_config(**{**runtime, "remat": "none", "dropout": 0.0})


def build(exp: config_lib.Experiment, student_task, student_data, mesh, rules) -> Teacher:
  """The teacher's task, model, abstract variables and shardings; checks it can teach."""
  _check_recorded_info(exp, student_data)
  student_info = student_data.info
  teacher_exp = dataclasses.replace(
      exp, model=model_config(exp), finetune=config_lib.FinetuneConfig(),
      distill=config_lib.DistillConfig(),
      train=dataclasses.replace(exp.train, init_from="", init_new=""))
  task = type(student_task)(teacher_exp, student_info)
  model = task.model()
  init_variables = init.variables_init(task, model, task.example_batch(1))
  boxed = init_variables.abstract()
  with nn.logical_axis_rules(rules):
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return Teacher(task, model, nn.unbox(boxed), shardings)


def _prediction_shapes(task, model):
  """The shapes of `task.predict`'s logits and hidden states on one example, allocating nothing."""
  batch = task.example_batch(1)

  def run(rng):
    zeros = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), batch)
    variables = task.init(model, {"params": rng, "dropout": rng}, zeros)
    prediction = task.predict(model, variables, zeros, rng=None, train=False, hidden=True)
    return prediction.logits, prediction.hidden
  return jax.eval_shape(run, jax.random.PRNGKey(0))


def hidden_width(task, model) -> int:
  """The width of the features `model`'s output layer reads (what hidden-state matching maps)."""
  return int(_prediction_shapes(task, model)[1].shape[-1])


def check_outputs(exp, teacher: Teacher, student_task, student_model) -> None:
  """The teacher's logits must cover the student's vocabulary or labels one to one."""
  theirs = _prediction_shapes(teacher.task, teacher.model)[0].shape
  ours = _prediction_shapes(student_task, student_model)[0].shape
  if theirs[-1] != ours[-1]:
    what = "vocabulary" if len(ours) > 2 else "label set"
    raise ConfigError(f"{KEY}={exp.distill.teacher!r}: the teacher's {what} has {theirs[-1]} "
                      f"entries but the student's has {ours[-1]}; a teacher must score the same "
                      f"{what}")


def load(exp, teacher: Teacher) -> dict:
  """The teacher's variables, verified and read straight into their shardings."""
  weights_from = source(exp)
  params = weights_from.load(teacher.abstract["params"], teacher.shardings["params"])
  state_abstract = {k: v for k, v in teacher.abstract.items() if k != "params"}
  model_state = {}
  if state_abstract:  # BatchNorm statistics come with the teacher's weights
    model_state = pretrained.load_model_state(
        weights_from, state_abstract, {k: teacher.shardings[k] for k in state_abstract})
  return {"params": params, **model_state}


def _check_recorded_info(exp, student_data) -> None:
  """A teacher run records its vocabulary (tokenizer.json, or the tokenizer's name) and labels
  (task_info.json): they must be the student's."""
  weights_from = source(exp)
  spec = weights_from.spec
  theirs = weights_from.task_info()
  if not theirs:
    return
  ours = student_data.info
  vocab_dir = weights_from.tokenizer_dir()
  vocab_file = os.path.join(vocab_dir, TOKENIZER_FILE) if vocab_dir else None
  if vocab_file and os.path.isfile(vocab_file) and TOKENIZER_FILE in student_data.artifacts:
    with open(vocab_file) as f:  # trained vocabularies: the same tokens with the same ids
      same = _vocab(f.read()) == _vocab(student_data.artifacts[TOKENIZER_FILE])
    if not same:
      raise ConfigError(f"{KEY}={spec!r}: the teacher's vocabulary ({vocab_file}) is not the "
                        f"student's (config.data.tokenizer={ours.get('tokenizer')!r}); give the "
                        f"student the teacher's: config.data.tokenizer='hf:{vocab_dir}'")
  elif "tokenizer" in theirs and "tokenizer" in ours and theirs["tokenizer"] != ours["tokenizer"]:
    raise ConfigError(f"{KEY}={spec!r}: the teacher's tokenizer is {theirs['tokenizer']!r} but "
                      f"the student's is {ours['tokenizer']!r}; they must be the same")
  if "label_names" in theirs and "label_names" in ours and \
      theirs["label_names"] != ours["label_names"]:
    raise ConfigError(f"{KEY}={spec!r}: the teacher's label set is "
                      f"{_short(theirs['label_names'])} but the student's is "
                      f"{_short(ours['label_names'])}; they must be the same, in the same order")


def _vocab(tokenizer_json: str):
  return json.loads(tokenizer_json).get("model", {}).get("vocab")


def _short(names) -> str:
  return f"[{capped(map(repr, names), 8)}]"


def describe(exp, teacher: Teacher) -> str:
  count = sum(x.size for x in jax.tree.leaves(teacher.abstract["params"]))
  m = teacher.task.exp.model
  return (f"distilling from {exp.distill.teacher}: {m.arch} d_model={m.d_model} "
          f"n_layers={m.n_layers}, {count:,} parameters")
