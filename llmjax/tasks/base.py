"""The task layer: what differs between objectives, behind one small core and declared capabilities.

The core every task has (`Task`): its data, model, example batch, init, loss and report. The loop,
the steps, abstract init, checkpoints, preemption and the CLI call only these. Everything only
some tasks can do is a *capability*: a small mixin class below (`SharesBatch`, `Predicts`,
`DecodedReport`, `Translates`, `WritesFiles`, `CountsFlops`, `Exportable`, `ParamGroups`,
`Samples`, `References`) that a task declares by
subclassing it; callers ask `supports(task, Capability)`, never for the task's class and never by
comparing methods. A task that wraps others (multi-task, distillation) declares what it forwards
by overriding `capabilities`.

Losses return sums and counts, never means, so sharded devices, accumulated microbatches and eval
batches reduce exactly by adding; means are taken once, on the host, in `report`.

Adding a task: subclass the capabilities it has, then `Task` (capabilities first, so their
methods come before the core's in the MRO: `class LM(Predicts, SharesBatch, ..., Task)`), in any
module; `register` it with its options dataclass; add an experiment and tests (docs/tasks.md has
a worked example).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from llmjax import finetune, flops
from llmjax.config import Experiment
from llmjax.config_checks import require
from llmjax.models import moe
from llmjax.models.apply import moe_statistics


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


class Capability:
  """Base of the optional capabilities a task declares by subclassing them (see `supports`)."""


class Task:
  """The core: an objective bound to an experiment and to what its data revealed (`info`)."""
  name = "task"

  def __init__(self, exp: Experiment, info: dict | None = None):
    self.exp = exp
    self.info = info or {}

  @property
  def capabilities(self) -> frozenset[type]:
    """The capabilities this task has: those its class declares (wrappers narrow them)."""
    return declared(type(self))

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
    return finetune.peft_for(self.exp)

  def example_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one batch: for abstract init, jit and benchmarks."""
    raise NotImplementedError

  def init(self, model: nn.Module, rngs: dict, batch: dict) -> dict:
    """All variables of `model`, from zeros shaped like `batch`."""
    raise NotImplementedError

  def loss(self, model: nn.Module, variables: dict, batch: dict, *, rng, train: bool) -> LossTerms:
    """One batch's loss as sums; `rng` drives the task's own randomness and dropout."""
    raise NotImplementedError

  def report(self, sums: dict) -> dict:
    """Evaluation sums (loss_sum, weight and the task's own) -> scalar metrics for metrics.jsonl."""
    raise NotImplementedError

  def headline(self, report: dict) -> str:
    """One line for the end of `llmjax train`."""
    return f"final validation loss {report['loss']:.4f}"

  def eval_batches(self, arrays: dict, batch_size: int,
                   max_batches: int | None = None) -> list[dict]:
    """A split's fixed evaluation batches (the first, in order; the last padded with zero rows)."""
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import text
    return text.eval_batches(arrays, batch_size, max_batches)

  def split_records(self, split: str, report: dict) -> dict[str, dict]:
    """metrics.jsonl records of one evaluation, by split name: {split: report} (a multi-task
    run adds one `split/<task>` per task)."""
    return {split: report}


# --- capabilities: declared by subclassing, asked for with `supports` ---------------------------


class Exportable(Capability):
  """The task's model is one module whose parameters make one export (`llmjax export`); a
  multi-task run (one model per head) is not."""


class SharesBatch(Capability):
  """Can share a batch with other tasks (config.tasks, llmjax/tasks/multitask.py)."""

  def only_rows(self, batch: dict, keep_B: jax.Array) -> dict:
    """`batch` with only the rows where keep_B is 1 counted by `loss` (its loss_sum, weight and
    metric sums; other rows contribute exactly 0 and no gradient)."""
    raise NotImplementedError


class Predicts(Capability):
  """Exposes the scores its loss came from: what distillation (llmjax/tasks/distill.py) needs."""

  # Whether a row's model inputs are fixed by the row alone (no per-step corruption or
  # augmentation): an offline teacher's stored logits are only valid then.
  fixed_inputs = True

  def loss(self, model: nn.Module, variables: dict, batch: dict, *, rng, train: bool) -> LossTerms:
    return self.predict(model, variables, batch, rng=rng, train=train).terms

  def predict(self, model: nn.Module, variables: dict, batch: dict, *, rng, train: bool,
              hidden: bool = False) -> Prediction:
    """The loss terms with the logits and mask they came from. `rng` drives both the task's own
    randomness (masked-LM corruption) and dropout; `train=False` runs the model in eval mode on
    the inputs that `rng` makes, which is how a teacher sees exactly the student's inputs.
    `hidden`: also return the model's last hidden states at the logits' positions."""
    raise NotImplementedError


class DecodedReport(Capability):
  """Reports metrics of the model's own outputs rather than its loss (BLEU, chrF)."""

  def decoded_report(self, model: nn.Module, get_params, data: Data, split: str,
                     limit: int | None = None) -> dict:
    """Merged into each evaluation's report. `get_params()` gathers the parameters to the host
    (called only if needed, by every process); `limit` caps the examples (None: the task's own
    setting, -1: the whole split)."""
    raise NotImplementedError

  def decoded_keys(self) -> tuple[str, ...]:
    """The keys `decoded_report` adds to an evaluation with the run's settings."""
    raise NotImplementedError

  def write_decoded(self, workdir: str, step: int) -> list[str]:
    """Files of the texts the last `decoded_report` decoded, written after each of the loop's
    evaluations (process 0); returns the paths written."""
    return []


class Translates(Capability):
  """Turns texts into texts with the run's model and decoding settings (`llmjax translate`)."""

  def translate(self, model: nn.Module, params, tokenizer, sources: list[str],
                **settings) -> list[str]:
    """Texts -> outputs with the run's settings, `settings` overriding them."""
    raise NotImplementedError


class WritesFiles(Capability):
  """Writes files of its own: per evaluation (plots) and at the end of a run (samples.txt)."""

  def write_report(self, workdir: str, report: dict, sums: dict, tag: str) -> list[str]:
    """Task-specific files for an evaluation (plots); returns the paths written."""
    return []

  def finish(self, outputs: Outputs) -> list[str]:
    """End-of-training outputs such as samples.txt; returns the paths written."""
    return []


class CountsFlops(Capability):
  """Knows its throughput units and model FLOPs (llmjax.flops), for tokens_per_s and MFU."""

  def tokens_per_example(self) -> float:
    """What one example counts for in `tokens_per_s` (tokens; images for image tasks)."""
    raise NotImplementedError

  def forward_flops_per_example(self) -> flops.Forward:
    """One example's forward FLOPs, by the weight groups its matmuls read."""
    raise NotImplementedError

  def train_flops_per_example(self, params: dict | None = None,
                              trainable: frozenset | None = None) -> float:
    """Model FLOPs of one example's training step, for MFU: 3 x forward less the weight
    gradients of frozen weights (`params`: path -> shape; `trainable`: None when all train)."""
    return flops.train_flops(self.forward_flops_per_example(), params, trainable)


class ParamGroups(Capability):
  """Trains groups of its parameters with their own optimiser settings (a GAN's generator and
  discriminator), combined with optax.multi_transform by llmjax.train.optim."""

  def param_groups(self) -> dict[str, Any]:
    """Group name -> the group's config.OptimConfig."""
    raise NotImplementedError

  def param_group(self, path: str) -> str:
    """The group of the parameter at `path` ('generator/out/kernel')."""
    raise NotImplementedError


class Samples(Capability):
  """Draws new examples from noise (a GAN's generator): reports on them and writes them at every
  evaluation, and `llmjax sample` draws more. `variables` are host arrays: {"params", ...the
  model's other collections (BatchNorm statistics)}."""

  def sample(self, model: nn.Module, variables: dict, n: int, seed: int) -> np.ndarray:
    """n new examples (images: uint8 [n, H, W, C]) from the latents that `seed` draws."""
    raise NotImplementedError

  def sample_report(self, model: nn.Module, variables: dict, data: Data) -> dict:
    """Scalar metrics of the model's samples, merged into each evaluation's report (every
    process calls it)."""
    return {}

  def sample_files(self, workdir: str, model: nn.Module, variables: dict, tag: str) -> list[str]:
    """Files of the model's samples at an evaluation (process 0 only); returns the paths."""
    return []


class References(Capability):
  """Its loss compares the policy with a reference model (DPO): the loop provides the reference as
  `reference_kind` asks (llmjax/train/reference.py): `copy`, a frozen copy of the starting
  parameters in the train state's `teacher` field (never differentiated, donated or
  checkpointed); `adapters_off`, nothing (the loss runs the same network without its adapters);
  `precomputed`, columns of the rows that `reference_columns` computes once."""

  def reference_kind(self) -> str:
    """copy | adapters_off | precomputed."""
    raise NotImplementedError

  def check_reference(self, trainable: frozenset | None, param_paths) -> None:
    """Refuse (ConfigError) a reference this run's trainable split cannot give."""

  def reference_columns(self, model: nn.Module, variables: dict, batch: dict) -> dict:
    """The precomputed reference's columns of one batch (jit-safe), from the starting
    variables."""
    raise NotImplementedError


CAPABILITIES = (Exportable, SharesBatch, Predicts, DecodedReport, Translates, WritesFiles,
                CountsFlops, ParamGroups, Samples, References)


def declared(cls: type) -> frozenset[type]:
  """The capabilities a task class declares (subclasses, directly or through a base)."""
  return frozenset(c for c in CAPABILITIES if issubclass(cls, c))


def supports(task: Task, capability: type) -> bool:
  """Whether `task` has `capability` (one of CAPABILITIES): how callers ask, never by class."""
  if capability not in CAPABILITIES:
    raise TypeError(f"{capability!r} is not a task capability; known: "
                    f"{', '.join(c.__name__ for c in CAPABILITIES)}")
  return capability in task.capabilities


def require_encoder_decoder(exp: Experiment, wanted: bool) -> None:
  """The seq2seq task and the encoder_decoder architecture go together: a built-in task's
  options check that its model is (`wanted`) or is not an encoder-decoder."""
  require((exp.model.arch == "encoder_decoder") == wanted,
          f"config.task.name={exp.task.name!r} with config.model.arch={exp.model.arch!r}: the "
          "seq2seq task and the encoder_decoder architecture go together (presets marian, bart, "
          "wmt)")


def require_label_smoothing(value: float) -> None:
  require(0.0 <= value < 1.0, f"config.task.label_smoothing must be in [0, 1), got {value}")


def require_num_classes(value: int) -> None:
  require(value == 0 or value >= 2,
          f"config.task.num_classes must be 0 (from the data) or >= 2, got {value}")


def token_batch(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """{"tokens", "segment_ids"}: [B, L] int32, the rows every text task starts from."""
  shape = (batch_size, seq_len)
  return {"tokens": jax.ShapeDtypeStruct(shape, jax.numpy.int32),
          "segment_ids": jax.ShapeDtypeStruct(shape, jax.numpy.int32)}


# --- mixtures of experts: what every task whose model has sparse layers gets ----------------------

def loss_with_moe(task: Task, model: nn.Module, variables: dict, batch: dict, *, rng,
                  train: bool) -> LossTerms:
  """`task.loss` plus its model's sparse-layer statistics (models/moe.py), whichever task it is:
  every `apply_model` of `model` inside collects them. In training the weighted load-balancing
  and z-losses join the loss (once per counted weight, so the step's mean adds them once);
  evaluation keeps the task's own loss. Sums: per-weight means times the weight (`moe.SUMS`)."""
  with moe_statistics(model) as sown:
    terms = task.loss(model, variables, batch, rng=rng, train=train)
  stats = moe.aux_stats(sown)
  if not stats:
    return terms
  loss_sum, cfg = terms.loss_sum, model.cfg
  if train:
    extra = cfg.moe_aux_loss_weight * stats["aux_loss"] + cfg.moe_z_loss_weight * stats["z_loss"]
    loss_sum = loss_sum + extra * terms.weight
  sums = {key: stats[name] * terms.weight for key, name in zip(moe.SUMS, moe.STATS)}
  return dataclasses.replace(terms, loss_sum=loss_sum, sums={**terms.sums, **sums})


def report_with_moe(task: Task, sums: dict) -> dict:
  """`task.report` of the task's own sums, with the sparse layers' per-weight means (the load a
  list, one share per expert) when `loss_with_moe` added them."""
  report = task.report({k: v for k, v in sums.items() if k not in moe.SUMS})
  weight = max(float(sums.get("weight", 0.0)), 1.0)
  for key in moe.SUMS:
    if key in sums:
      value = np.asarray(sums[key], np.float64) / weight
      report[key] = value.tolist() if value.ndim else float(value)
  return report
