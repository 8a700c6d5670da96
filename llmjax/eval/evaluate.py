"""A run's checkpoint evaluated on a whole split: the task's report, eval/step_N.json, plots.

The same task code runs here as every `train.eval_every` steps of training; only the batches
differ (all of the split here, the first `train.eval_batches` there).
"""

from __future__ import annotations

import json
import math
import os

import jax
from flax import linen as nn

from llmjax import distributed, finetune, tasks
from llmjax.errors import UserError
from llmjax.hf import api
from llmjax.models import quant_tree
from llmjax.parallel import sharding
from llmjax.train import loop, reference, rundir, step as steplib


def split_arrays(data: tasks.Data, split: str, workdir: str) -> dict:
  arrays = {"val": data.val, "test": data.test}[split]
  if arrays is None:
    raise UserError(f"--split={split}: the data of {workdir} has no {split} split (for labelled "
                    "files set config.data.test_files; for tfds config.data.tfds_test_split)")
  return arrays


def evaluate_run(workdir: str, step: int | None = None, split: str = "val",
                 max_batches: int | None = None) -> dict:
  """{"step", "split", **the task's report} for a verified checkpoint; writes eval/step_N.json.
  `max_batches`: only the split's first batches (`train.eval_batches` of them are what training's
  evaluations read), recorded as "batches" in the report."""
  run = rundir.restore(workdir, step)
  task, data = tasks.setup(run.exp, workdir)
  state, data = reference.for_evaluation(run, data, workdir)  # a dpo run's reference model
  arrays = split_arrays(data, split, workdir)
  devices = run.mesh.size
  batch_size = devices * math.ceil(run.exp.train.batch_size / devices)
  batches = task.eval_batches(arrays, batch_size, max_batches)
  eval_fn = jax.jit(lambda state, batch: steplib.eval_step(
      state, batch, loss=steplib.bind_loss(task, run.model)))
  rules = sharding.rules_for("dp")
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(rules):
    sums = loop.eval_sums(run.mesh, eval_fn, state, batches)
  report = {"step": run.step, "split": split, **tasks.report_with_moe(task, sums),
            **finetune.prune.sparsity(run.exp.prune, run.params)}
  if max_batches is not None:
    report["batches"] = len(batches)
  if tasks.supports(task, tasks.DecodedReport):
    report.update(task.decoded_report(run.model, lambda: distributed.to_host(run.params), data,
                                      split, limit=-1))
  if tasks.supports(task, tasks.Samples):  # quality of new samples, as at training's evaluations
    report.update(task.sample_report(run.model, distributed.to_host(
        {"params": run.params, **run.state.model_state}), data))
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"step_{run.step}.json" if split == "val"
                      else f"step_{run.step}_{split}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)
  report["files"] = [path] + (task.write_report(workdir, report, sums, f"step {run.step} {split}")
                              if tasks.supports(task, tasks.WritesFiles) else [])
  return report


def quantized_reports(workdir: str, spec: str, step: int | None = None, split: str = "val",
                      max_batches: int | None = None) -> dict:
  """{"float": report, spec: report}: the task's report on the first `max_batches` batches of
  `split` with the run's weights as trained and with its dense kernels quantized by `spec`."""
  run = rundir.restore(workdir, step)
  task, data = tasks.setup(run.exp, workdir)
  arrays = split_arrays(data, split, workdir)
  devices = run.mesh.size
  batches = task.eval_batches(arrays, devices * math.ceil(run.exp.train.batch_size / devices),
                              max_batches)
  qmodel, found = api.quantized_model(run.model, spec)
  params = distributed.to_host(run.params)
  out = {}
  for name, model, weights in (("float", run.model, params),
                               (spec, qmodel, quant_tree.quantize_tree(params, found))):
    eval_fn = jax.jit(lambda state, batch, model=model: steplib.eval_step(
        state, batch, loss=steplib.bind_loss(task, model)))
    state = run.state.replace(params=weights, frozen={})
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.rules_for("dp")):
      out[name] = task.report(loop.eval_sums(run.mesh, eval_fn, state, batches))
  return out


def table(report: dict) -> str:
  """Scalar metrics one per line, then the per-class table when there is one; a multi-task
  report's tasks follow, each under its name."""
  lines = [f"{k:>20}  {v:.4f}" if isinstance(v, float) else f"{k:>20}  {v}"
           for k, v in report.items() if isinstance(v, (int, float, str))]
  per_class = report.get("per_class")
  if per_class:
    # Right-aligned columns, each as wide as its header or its widest entry.
    width = max(len("class"), *(len(str(c["name"])) for c in per_class))
    lines.append("")
    lines.append(f"{'class':>{width}}  precision  recall      f1  support")
    for c in per_class:
      lines.append(f"{c['name']:>{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  "
                   f"{c['f1']:6.4f}  {c['support']:7d}")
  for head, task_report in report.get("tasks", {}).items():
    lines += ["", f"--- {head}", table(task_report)]
  return "\n".join(lines)
