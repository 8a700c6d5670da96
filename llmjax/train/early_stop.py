"""Early stopping (config.train.early_stop_*): stop a run at the evaluation after which a
validation metric has not improved for `early_stop_patience` evaluations.

The decision is a pure function of the rule, the tracker (best value, its step, evaluations
without improvement) and the new value (`update`), as Keras' `EarlyStopping` counts: an
evaluation improves when it beats the best by more than `min_delta`; a non-finite value never
does. The tracker travels in the checkpoint's data item (JSON beside the iterator state), so it is
saved atomically with the step it belongs to and a resumed run counts on exactly where the saved
one was. The metric must be one the task reports: `check` traces the eval step abstractly at
assembly and refuses any other name before anything is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from llmjax import tasks
from llmjax.config import TrainConfig
from llmjax.config_checks import require
from llmjax.errors import TrainingError
from llmjax.train import offline_teacher, step

STATE_KEY = "early_stop"  # its key in the checkpoint's data item


@dataclasses.dataclass(frozen=True)
class Tracker:
  """Where early stopping stands: the best value so far, its step, evaluations since then."""
  best: float | None = None
  best_step: int | None = None
  bad_evals: int = 0
  stopped: bool = False


def improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
  """Whether `value` beats `best` by more than `min_delta` in direction `mode` (min | max)."""
  if not math.isfinite(value):
    return False
  if best is None:
    return True
  return value < best - min_delta if mode == "min" else value > best + min_delta


def update(tracker: Tracker, value: float, step_: int, *, patience: int, mode: str,
           min_delta: float) -> Tracker:
  """The tracker after an evaluation at `step_` gave `value`; `stopped` once `patience`
  evaluations in a row did not improve."""
  if improves(value, tracker.best, mode, min_delta):
    return Tracker(float(value), int(step_), 0, False)
  bad = tracker.bad_evals + 1
  return dataclasses.replace(tracker, bad_evals=bad, stopped=bad >= patience)


def lookup(task, report: dict, name: str):
  """The value of metric `name` in an evaluation's report (None if absent): a key of its `val`
  record, or `<task>/<key>` for a key of a `val/<task>` record (config.tasks)."""
  records = task.split_records("val", report)
  if name in records["val"]:
    return records["val"][name]
  head, _, key = name.partition("/")
  return records.get(f"val/{head}", {}).get(key)


class EarlyStopping:
  """The loop's view: observe each evaluation, say whether to stop, rank checkpoints."""

  def __init__(self, t: TrainConfig, data_state: dict | None):
    self.t = t
    self.on = t.early_stop_patience > 0
    saved = Tracker(**(data_state or {}).get(STATE_KEY, {}))
    # judged by this run's patience: a stopped run given more patience trains on
    self.tracker = dataclasses.replace(saved, stopped=saved.bad_evals >= max(
        t.early_stop_patience, 1))

  @property
  def stopped(self) -> bool:
    return self.on and self.tracker.stopped

  def value(self, task, report: dict) -> float:
    """The metric's value in `report`, the same on every process (process 0's: decoded
    metrics such as BLEU exist there only)."""
    found = lookup(task, report, self.t.early_stop_metric)
    value, missing = (float("nan"), 1.0) if found is None else (float(found), 0.0)
    if jax.process_count() > 1:
      value, missing = map(float, multihost_utils.broadcast_one_to_all(
          np.array([value, missing], np.float64)))
    if missing:
      raise TrainingError(f"config.train.early_stop_metric={self.t.early_stop_metric!r} is not in "
                          "this evaluation's report")
    return value

  def observe(self, task, report: dict, step_: int) -> bool:
    """Count the evaluation at `step_`; True when it is a new best."""
    if not self.on:
      return False
    t = self.t
    self.tracker = update(self.tracker, self.value(task, report), step_,
                          patience=t.early_stop_patience, mode=t.early_stop_mode,
                          min_delta=t.early_stop_min_delta)
    if self.tracker.stopped and jax.process_index() == 0:
      print(self.reason(step_), file=sys.stderr)
    return self.tracker.best_step == step_

  def best(self) -> str:
    """The best value so far and its step, as printed."""
    k = self.tracker
    return ("none (no finite value)" if k.best is None
            else f"{self.t.early_stop_metric} {k.best:.6g} at step {k.best_step}")

  def reason(self, step_: int) -> str:
    t = self.t
    return (f"early stopping at step {step_}: validation {t.early_stop_metric} did not improve "
            f"({t.early_stop_mode}, min_delta {t.early_stop_min_delta:g}) in "
            f"{t.early_stop_patience} evaluations (config.train.early_stop_patience); best "
            f"{self.best()}")

  def rank(self, task, report: dict) -> float:
    """What checkpoint retention ranks by (lower is better): the early-stopping metric, else
    the validation loss."""
    if not self.on:
      return report["loss"]
    value = self.value(task, report)
    return value if self.t.early_stop_mode == "min" else -value

  def saved(self, data_state: dict) -> dict:
    """`data_state` with the tracker (unchanged when early stopping is off)."""
    return {**data_state, STATE_KEY: dataclasses.asdict(self.tracker)} if self.on else data_state


def reported_metrics(s) -> list[str]:
  """The scalar metric names an evaluation of assembled run `s` reports (traced, no compute)."""
  batch = s.task.example_batch(s.exp.train.batch_size)
  if s.exp.distill.top_k:  # an offline teacher's logits arrive as columns of the rows
    batch = offline_teacher.example_columns(s.teacher, s.exp.distill.top_k, batch)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    shapes = jax.eval_shape(functools.partial(step.eval_step, loss=step.bind_loss(s.task, s.model)),
                            s.abstract_state, batch)
  report = tasks.report_with_moe(s.task, jax.tree.map(lambda x: np.ones(x.shape, np.float64),
                                                      shapes))
  if tasks.supports(s.task, tasks.DecodedReport):
    report.update(dict.fromkeys(s.task.decoded_keys(), 0.0))
  names = []
  for split, record in s.task.split_records("val", report).items():
    prefix = split.removeprefix("val").lstrip("/")
    names += [f"{prefix}/{k}" if prefix else k for k, v in record.items()
              if isinstance(v, (int, float))]
  return names


def check(s) -> None:
  """config.train.early_stop_metric names a metric the task reports (ConfigError otherwise)."""
  t = s.exp.train
  if t.early_stop_patience <= 0:
    return
  names = reported_metrics(s)
  require(t.early_stop_metric in names,
          f"config.train.early_stop_metric={t.early_stop_metric!r}: the {s.task.name} task does "
          f"not report it; its validation metrics: {', '.join(names)}")
