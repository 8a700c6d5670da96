"""What a run leaves for people: metrics.jsonl, TensorBoard events, plots, progress bar."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from llmjax import tasks
from llmjax.train import tbevents


class MetricWriter:
  """One JSON object per logged (step, split) in metrics.jsonl, mirrored to TensorBoard."""

  def __init__(self, workdir: str, *, is_main: bool = True):
    self.is_main = is_main
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._held = None  # the (step, split) pairs in the file, read at the first write
    if is_main:
      self._tb = tbevents.EventWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Append a record, unless the file holds this (step, split) already: a finished run run
    again evaluates its last step again, and its record stays the one there is."""
    if not self.is_main:
      return
    if self._held is None:  # after a resume's truncate_after: what is left of the history
      self._held = {(r["step"], r["split"]) for r in read_metrics(self.path)}
    if (int(step), split) in self._held:
      return
    self._held.add((int(step), split))
    record = {"step": int(step), "split": split}
    # Scalars only: per-class tables and confusion matrices go to eval/ and plots/.
    record.update({k: _plain(v) for k, v in metrics.items() if not isinstance(v, (list, dict))})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "split") and isinstance(value, (int, float)):
        self._tb.add_scalar(f"{split}/{key}", value, int(step))
    for key, value in metrics.items():  # a flat list of numbers: a histogram over its index
      if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        self._tb.add_histogram(f"{split}/{key}", value, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep the fact, as text
  return value


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_eval(writer: MetricWriter, task, step: int, report: dict) -> None:
  """An evaluation's metrics.jsonl records (`val`, and `val/<task>` for each of several tasks)
  and the files of the texts it decoded (sft's completions.txt)."""
  for split, metrics in task.split_records("val", report).items():
    writer.write(step, split, metrics)
  if writer.is_main and tasks.supports(task, tasks.DecodedReport):
    task.write_decoded(os.path.dirname(writer.path), step)


def truncate_after(path: str, step: int) -> None:
  """Drop records past `step` (a resumed run re-logs them), keeping the file one history."""
  records = [r for r in read_metrics(path) if r["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  os.replace(path + ".tmp", path)


def plot_loss(metrics_path: str, out_png: str, title: str) -> None:
  """Train and validation loss against step."""
  import matplotlib  # heavy: only when a plot is drawn
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # heavy, as above

  records = read_metrics(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for split, style in (("train", "-"), ("val", "o-")):
    points = [(r["step"], r["loss"]) for r in records
              if r["split"] == split and isinstance(r.get("loss"), float)]
    if points:
      ax.plot(*zip(*points), style, label=split, markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  os.makedirs(os.path.dirname(out_png), exist_ok=True)
  fig.savefig(out_png, dpi=120, bbox_inches="tight")
  plt.close(fig)
