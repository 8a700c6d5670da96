"""The task layer: what differs between objectives, behind one small interface.

A task owns its model, example batch, data, loss, report and end-of-run outputs; the loop, the
steps, abstract init, checkpoints, preemption and the CLI only ever call these methods. Losses
return sums and counts, never means, so sharded devices, accumulated microbatches and eval
batches reduce exactly by adding; means are taken once, on the host, in `report`.

Adding a task: subclass `Task` in a new module of this package, register it in `TASKS`
(`llmjax/tasks/__init__.py`), add an experiment and tests (docs/tasks.md has a worked example).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from llmjax.config import Experiment


@dataclasses.dataclass(frozen=True)
class LossTerms:
  """One batch's loss as sums: reduced across devices, microbatches and batches by adding."""
  loss_sum: jax.Array  # summed loss over everything that counts (tokens, examples)
  weight: jax.Array  # how many things counted; the mean loss is loss_sum / weight
  sums: dict  # metric sums (correct predictions, a confusion matrix, ...), added like the loss
  model_state: dict  # updated non-trainable collections (BatchNorm statistics); {} if none


jax.tree_util.register_dataclass(LossTerms, data_fields=["loss_sum", "weight", "sums",
                                                         "model_state"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A batch's loss terms beside the scores they came from: what a distillation matches.

  The mask marks exactly the positions the task's loss counts (padding, the unchosen positions of
  masked-LM, padded classifier rows: 0), so a distillation term summed over it reduces like the
  task's own loss and weighs the same things.
  """
  terms: LossTerms
  logits: jax.Array  # [..., V]: scores over the vocabulary or the classes
  mask: jax.Array  # [...]: 1 where the task's loss counts, 0 elsewhere (weights allowed)
  hidden: jax.Array | None = None  # [..., D] last hidden states at the same positions, if asked


jax.tree_util.register_dataclass(Prediction, data_fields=["terms", "logits", "mask", "hidden"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Data:
  """A task's data: in-memory rows for the train iterator and the fixed evaluation splits."""
  train: dict[str, np.ndarray]  # every array has the examples on axis 0
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray] | None
  tokenizer: Any
  info: dict  # what the task's model and loss need to know about the data (label names, ids)
  artifacts: dict[str, str]  # files the run keeps in its workdir: name -> text (tokenizer.json)
  # (batch, seeds_B) -> batch, applied to each training batch on the host (image augmentation);
  # seeds_B are fixed by the run's seed and each example's position in the global order.
  augment: Any = None
  # Text a task reads besides its arrays, by split (seq2seq: the (source, reference) pairs that
  # evaluation translates and scores).
  texts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What a finished run hands its task for end-of-run outputs."""
  workdir: str
  model: nn.Module
  params: Any  # host arrays
  data: Data
  report: dict  # the final evaluation, as `Task.report` returned it


class Task:
  """Base class: an objective bound to an experiment and to what its data revealed (`info`)."""
  name = "task"

  def __init__(self, exp: Experiment, info: dict | None = None):
    self.exp = exp
    self.info = info or {}

  def with_info(self, info: dict) -> "Task":
    return type(self)(self.exp, info)

  def data(self, workdir: str | None) -> Data:
    """Read, tokenize and split; reuse the tokenizer / label set a workdir already holds."""
    raise NotImplementedError

  def model(self) -> nn.Module:
    """The task's model, built with `self.peft()`'s extra parameters."""
    raise NotImplementedError

  def peft(self):
    """What config.finetune adds to the model (LoRA, adapters, prompt, prefix; or nothing)."""
    from llmjax import finetune
    return finetune.peft_for(self.exp)

  def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one batch: for abstract init, jit and benchmarks."""
    raise NotImplementedError

  def init(self, model: nn.Module, rngs: dict, batch: dict) -> dict:
    """All variables of `model`, from zeros shaped like `batch`."""
    raise NotImplementedError

  def loss(self, model: nn.Module, variables: dict, batch: dict, *, rng, train: bool) -> LossTerms:
    return self.predict(model, variables, batch, rng=rng, train=train).terms

  def predict(self, model: nn.Module, variables: dict, batch: dict, *, rng, train: bool,
              hidden: bool = False) -> Prediction:
    """The loss terms with the logits and mask they came from. `rng` drives both the task's own
    randomness (masked-LM corruption) and dropout; `train=False` runs the model in eval mode on
    the inputs that `rng` makes, which is how a teacher sees exactly the student's inputs.
    `hidden`: also return the model's last hidden states at the logits' positions."""
    raise NotImplementedError(f"the {self.name} task does not expose its logits")

  # Whether a row's model inputs are fixed by the row alone (no per-step corruption or
  # augmentation): an offline teacher's stored logits are only valid then.
  fixed_inputs = True

  def report(self, sums: dict) -> dict:
    """Evaluation sums (loss_sum, weight and the task's own) -> scalar metrics for metrics.jsonl."""
    raise NotImplementedError

  def decoded_report(self, model: nn.Module, get_params, data: Data, split: str,
                     limit: int | None = None) -> dict:
    """Metrics of the model's own outputs rather than its loss (BLEU and chrF of translations),
    merged into each evaluation's report; {} for tasks without any. `get_params()` gathers the
    parameters to the host (called only if needed, by every process); `limit` caps the examples
    (None: the task's own setting, -1: the whole split)."""
    return {}

  def headline(self, report: dict) -> str:
    """One line for the end of `llmjax train`."""
    return f"final validation loss {report['loss']:.4f}"

  # --- sharing a batch with other tasks (config.tasks, llmjax/tasks/multitask.py) ---

  def only_rows(self, batch: dict, keep_B: jax.Array) -> dict:
    """`batch` with only the rows where keep_B is 1 counted by `loss` (its loss_sum, weight and
    metric sums; other rows contribute exactly 0 and no gradient). Tasks without it cannot share
    a batch with other tasks."""
    raise NotImplementedError(f"the {self.name} task cannot share a batch with other tasks")

  def eval_batches(self, arrays: dict, batch_size: int,
                   max_batches: int | None = None) -> list[dict]:
    """A split's fixed evaluation batches (the first, in order; the last padded with zero rows)."""
    from llmjax.data import text
    return text.eval_batches(arrays, batch_size, max_batches)

  def split_records(self, split: str, report: dict) -> dict[str, dict]:
    """metrics.jsonl records of one evaluation, by split name: {split: report} (a multi-task
    run adds one `split/<task>` per task)."""
    return {split: report}

  def write_report(self, workdir: str, report: dict, sums: dict, tag: str) -> list[str]:
    """Task-specific files for an evaluation (plots); returns the paths written."""
    return []

  def finish(self, outputs: Outputs) -> list[str]:
    """End-of-training outputs such as samples.txt; returns the paths written."""
    return []

  def tokens_per_example(self) -> int:
    return self.exp.data.seq_len

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one example's forward and backward pass (llmjax.flops), for MFU."""
    from llmjax import flops
    return flops.train_flops_per_step(self.exp.model, 1, self.exp.data.seq_len)


def token_batch(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """{"tokens", "segment_ids"}: [B, L] int32, the rows every text task starts from."""
  shape = (batch_size, seq_len)
  return {"tokens": jax.ShapeDtypeStruct(shape, jax.numpy.int32),
          "segment_ids": jax.ShapeDtypeStruct(shape, jax.numpy.int32)}


# What models sow (collection "intermediates"): the features their output layer reads.
HEAD_INPUT = "head_input"


def apply_model(model: nn.Module, variables: dict, *args, train: bool, rng,
                hidden: bool = False, **kwargs):
  """(outputs, updated model_state): mutable collections update only while training.

  With `hidden`, returns ((outputs, last hidden states), model_state): the states the model
  sowed as `HEAD_INPUT` (see `sown_hidden`).
  """
  model_state = {k: v for k, v in variables.items() if k != "params"}
  rngs = {"dropout": rng} if rng is not None else None
  mutable = (list(model_state) if model_state and train else []) + (
      ["intermediates"] if hidden else [])
  if not mutable:
    return model.apply(variables, *args, rngs=rngs, **kwargs), model_state
  out, updated = model.apply(variables, *args, mutable=mutable, rngs=rngs, **kwargs)
  updated = dict(updated)
  sown = updated.pop("intermediates", None)
  if train and model_state:
    model_state = updated
  return ((out, sown_hidden(sown)) if hidden else out), model_state


def sown_hidden(intermediates) -> jax.Array:
  """The one array a model sowed as `HEAD_INPUT` (wherever in its tree the backbone sits)."""
  found = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(intermediates or {})
           if any(getattr(k, "key", None) == HEAD_INPUT for k in path)]
  if len(found) != 1:
    raise ValueError(f"expected the model to sow one '{HEAD_INPUT}' array, found {len(found)}")
  return found[0]
