"""The run loop, top to bottom: an assembled run (`llmjax.train.setup`: config -> task and its
data -> mesh and rules -> model and example batch -> abstract init -> shardings) -> state (fresh,
restored, or from other weights with new heads; split into trainable and frozen) -> the run's
files -> data iterator (fresh or restored) -> jitted step -> metrics, evaluations, checkpoints,
plots and the task's outputs.

The loop never branches on the task: everything objective-specific is a `Task` method.
Everything that can reject the input (mesh, shapes, data) runs in `setup.prepare`, before the
workdir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from flax import linen as nn

from llmjax import checkpoint, distributed, finetune, flops, tasks
from llmjax.config import Experiment
from llmjax.data import text
from llmjax.errors import TrainingError
from llmjax.parallel import sharding
from llmjax.train import (early_stop, init, offline_teacher, preemption, pretrained, reference,
                          reporting, rundir, setup, step as steplib, teacher_run)
from llmjax.train import teacher as teacher_lib


def run(exp: Experiment, workdir: str) -> dict:
  """Train (or resume) `exp` in `workdir`; returns the final validation metrics.

  SIGTERM/SIGINT finish the current step, save it and return {"step", "preempted": True}.
  A teacher named `experiment:FILE[:ARG]` is trained first, in WORKDIR/teacher.
  """
  exp, stopped = teacher_run.train_first(exp, workdir, run)
  if stopped:
    return stopped
  s = setup.prepare(exp, workdir)
  exp = s.exp
  distributed.check_shared_directory(workdir)  # before a checkpoint is split across hosts
  os.makedirs(workdir, exist_ok=True)
  t = exp.train
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints,
                                 keep_best=t.keep_best, async_save=t.async_checkpoint)
  # Before any file is (re)written: a resume that cannot go on (another base) changes nothing.
  state, data_state = initial_state(s, ckpt)
  # A resumed run keeps the base step it started from (config.json and the base identity say it).
  s = dataclasses.replace(s, exp=pretrained.as_recorded(s.exp, data_state))
  if exp.distill.top_k:  # the teacher's top-k logits join the rows (computed once, stored)
    s = dataclasses.replace(s, data=offline_teacher.attach(s, workdir))
  s = dataclasses.replace(s, data=reference.attach_data(  # a precomputed reference's columns
      s, workdir, state if data_state is None else (lambda: started_state(s))))
  base = _write_run_files(s, workdir, state)
  start = int(jax.device_get(state.step))
  stopper = early_stop.EarlyStopping(t, data_state)
  if data_state is not None and jax.process_index() == 0:  # restored: say where it goes on
    print(_resume_line(workdir, start, t.steps, stopper), file=sys.stderr)
  writer = reporting.MetricWriter(workdir, is_main=jax.process_index() == 0)
  if jax.process_index() == 0:
    reporting.truncate_after(writer.path, start)
  loop = _Loop(s, workdir, ckpt, writer, _data_iterator(s, data_state), base, stopper)
  try:
    with (jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules),
          preemption.Listener() as signals):
      state = loop.train(state, start, signals)
      if loop.preempted_at is not None:
        return {"step": loop.preempted_at, "preempted": True}
      end = int(jax.device_get(state.step))
      final, sums = loop.final_evaluation(state, end)
      if end not in ckpt.all_steps():
        loop.save(state, end)
  finally:  # pending async saves complete (or report their failure) on every exit path
    writer.close()
    ckpt.close()
  _write_outputs(s, workdir, state, writer.path, final, sums, end)
  stopped = {"early_stopped": dataclasses.asdict(stopper.tracker)} if stopper.stopped else {}
  return {"step": end, "headline": s.task.headline(final), **stopped, **final}


def _resume_line(workdir: str, start: int, steps: int, stopper) -> str:
  if stopper.stopped:
    return (f"{workdir} stopped early at step {start} (best {stopper.best()}): its final "
            "evaluation runs again; raise config.train.early_stop_patience to train on")
  if start < steps:
    return f"resuming {workdir} at step {start} of {steps}"
  return (f"{workdir} already finished at step {start} of {steps} (config.train.steps): its "
          "final evaluation runs again, its records in metrics.jsonl stay as they are")


def initial_state(s: setup.Setup, ckpt: checkpoint.Checkpointer):
  """(state, data_state): the newest verified checkpoint, else a fresh init (maybe from weights).

  Checkpoints hold no frozen parameters: a resumed fine-tuning run rebuilds its base the way it
  first did and must find the same one (checksums in the checkpoint's data item).
  """
  found = ckpt.restore_latest_good(s.abstract_state.checkpointed(),
                                   s.state_shardings.checkpointed())
  if found is None:
    return fresh_state(s), None
  _, (state, data_state, _) = found
  if s.trainable is not None:
    state = pretrained.with_base(s.exp, state, data_state, s.init_variables, s.tx, s.mesh,
                                 s.rules, s.state_shardings.replace(teacher=None), s.trainable)
  return with_teacher(s, state, lambda: started_state(s)), data_state


def started_state(s: setup.Setup):
  """The seed's init, overlaid with init_from's weights, split into trainable and frozen: the
  state a fresh run starts from."""
  state = pretrained.initialised(s.exp, s.init_variables, s.tx, s.mesh, s.rules,
                                 s.state_shardings.replace(teacher=None), s.trainable)
  return finetune.initialise_added(s.exp, state, s.data)


def fresh_state(s: setup.Setup):
  """The starting state, with the teacher (distilling) or reference (`References` tasks)."""
  state = started_state(s)
  return with_teacher(s, state, state)


def with_teacher(s: setup.Setup, state, start):
  """`state` with config.distill's teacher attached (read from its checkpoint; {} offline), or
  the copied reference of a `References` task (from `start`, a state or a function giving it)."""
  state = reference.attach_state(s, state, start)
  if s.teacher is None:
    return state
  if s.exp.distill.top_k:
    return state.replace(teacher={})
  return state.replace(teacher=teacher_lib.load(s.exp, s.teacher))


def _write_run_files(s: setup.Setup, workdir: str, state) -> dict | None:
  """config.json, the task's info and artifacts, the parameter report (process 0 writes them);
  returns the frozen base's identity (None when every parameter trains)."""
  is_main = jax.process_index() == 0
  if is_main:
    files = {rundir.CONFIG_FILE: s.exp.to_json(),
             rundir.TASK_INFO_FILE: json.dumps(s.data.info, indent=2), **s.data.artifacts}
    for name, text_ in files.items():
      _write_atomic(os.path.join(workdir, name), text_)
  base = pretrained.base_identity(s.exp, state.frozen) if s.trainable is not None else None
  if is_main:
    _write_atomic(os.path.join(workdir, finetune.PARAMS_FILE),
                  json.dumps(finetune.params_report(s.exp, state, base), indent=2))
  return base


def _write_atomic(path: str, text_: str) -> None:  # whole or not at all: old file or none
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # tasks/<head>/ files of config.tasks
  with open(path + ".tmp", "w") as f:
    f.write(text_)
  os.replace(path + ".tmp", path)


def _data_iterator(s: setup.Setup, data_state: dict | None):
  """This process's rows of each global training batch, from where `data_state` left off."""
  batch_size = s.exp.train.batch_size
  iterator = text.batch_iterator(s.data.train, batch_size, seed=s.exp.data.seed, shuffle=True,
                                 num_epochs=None, rows=sharding.process_rows(s.mesh, batch_size),
                                 transform=s.data.augment)
  if data_state:
    iterator.set_state(text.iterator_state(data_state["grain"], batch_size))
  return iterator


def _process_slices(mesh, global_batches: list[dict]) -> list[dict]:
  """This process's rows of each global batch (every process holds the same global list)."""
  if not global_batches:
    return []
  rows = sharding.process_rows(mesh, len(next(iter(global_batches[0].values()))))
  return [jax.tree.map(lambda x: x[rows], batch) for batch in global_batches]


def _data_state(iterator) -> dict:
  state = iterator.get_state()  # the iterator's position as JSON, saved with each checkpoint
  return {"grain": state.decode() if isinstance(state, bytes) else json.dumps(state)}


class _Loop:
  """The step loop and its periodic work; step n-1's metrics are read after step n is dispatched."""

  def __init__(self, s: setup.Setup, workdir: str, ckpt, writer, iterator, base: dict | None,
               stopper):
    self.s, self.workdir, self.ckpt, self.writer = s, workdir, ckpt, writer
    self.iterator = iterator
    self.stopper = stopper  # early stopping (config.train.early_stop_*), off by default
    self.base = base  # the frozen parameters' identity, saved with every step
    self.train_fn, self.eval_fn = setup.compile_steps(s)
    self.val_batches = _process_slices(s.mesh, s.task.eval_batches(
        s.data.val, s.exp.train.batch_size, s.exp.train.eval_batches))
    self.throughput = _Throughput(s)
    self.last_rank = None  # what retention ranks the next checkpoint by (validation loss)
    self.last_eval = None  # (step, report, sums) of the last periodic evaluation
    self.consecutive_nonfinite = 0
    self.preempted_at = None

  def evaluate_with_sums(self, state) -> tuple[dict, dict]:
    metrics, sums = evaluate(self.s, self.eval_fn, state, self.val_batches)
    if tasks.supports(self.s.task, tasks.DecodedReport):
      metrics.update(self.s.task.decoded_report(
          self.s.model, lambda: distributed.to_host(finetune.merge(state.params, state.frozen)),
          self.s.data, "val"))
    if tasks.supports(self.s.task, tasks.Samples):
      metrics.update(self._samples(state))
    self.last_rank = self.stopper.rank(self.s.task, metrics)
    return metrics, sums

  def final_evaluation(self, state, end: int) -> tuple[dict, dict]:
    """The run's last evaluation, written; an early stop's own evaluation is not run again."""
    if self.last_eval is not None and self.last_eval[0] == end:
      return self.last_eval[1:]
    final, sums = self.evaluate_with_sums(state)
    reporting.write_eval(self.writer, self.s.task, end, final)
    return final, sums

  def _samples(self, state) -> dict:
    """The task's report on its samples, and their files (plots/samples_step_N.png)."""
    task, model = self.s.task, self.s.model
    variables = distributed.to_host({"params": finetune.merge(state.params, state.frozen),
                                     **state.model_state})
    report = task.sample_report(model, variables, self.s.data)
    if jax.process_index() == 0:
      task.sample_files(self.workdir, model, variables, f"step_{int(jax.device_get(state.step))}")
    return report

  def save(self, state, step: int) -> None:
    data_state = self.stopper.saved(_data_state(self.iterator))
    if self.base is not None:
      data_state["base"] = self.base
    self.ckpt.save(step, state.checkpointed(), data_state,
                   json.loads(self.s.exp.to_json()), metric=self.last_rank)

  def train(self, state, start: int, signals):
    t = self.s.exp.train
    bar = _progress(t, start)
    pending, interval = None, []
    for step_index in range(start, t.steps if not self.stopper.stopped else start):
      batch = sharding.global_batch(next(self.iterator), self.s.mesh)
      state, metrics = self.train_fn(state, batch)
      self.throughput.steps += 1
      if pending is not None:
        interval.append(self._check_finite(jax.device_get(pending), step_index))
      pending, done = metrics, step_index + 1
      stop = signals.should_stop(self.ckpt, done)
      # With early stopping every evaluation may end the run: the steps before it are logged.
      if (done % t.log_every == 0 or done == t.steps or stop
          or (self.stopper.on and self._eval_due(done))):
        interval.append(self._check_finite(jax.device_get(pending), done))
        pending = None
        self._log(done, interval, bar)
        interval = []
      if stop:
        if self.stopper.on:  # the counter saved must include this step's evaluation, if due
          self._evaluate_due(state, done)
        self.save(state, done)
        self.ckpt.wait()
        self.preempted_at = done
        break
      if bar is not None:
        bar.update(1)
      if self._periodic(state, done):
        break
    if bar is not None:
      bar.close()
    return state

  def _periodic(self, state, done: int) -> bool:
    """Evaluate and checkpoint when due; True when early stopping ends the run at `done`."""
    t = self.s.exp.train
    best = self._evaluate_due(state, done)
    # An early stop, and a new best that checkpoint retention is asked to keep, are saved.
    if ((done % t.checkpoint_every == 0 and done != t.steps) or self.stopper.stopped
        or (best and t.keep_best)):
      self.save(state, done)
    return self.stopper.stopped

  def _evaluate_due(self, state, done: int) -> bool:
    """The periodic evaluation of step `done` if due; True when early stopping's new best."""
    if not self._eval_due(done):
      return False
    self.last_eval = (done, *self.evaluate_with_sums(state))
    reporting.write_eval(self.writer, self.s.task, done, self.last_eval[1])
    self.throughput.reset()  # evaluation time is not training throughput
    return self.stopper.observe(self.s.task, self.last_eval[1], done)

  def _eval_due(self, done: int) -> bool:
    t = self.s.exp.train
    return done % t.eval_every == 0 and done != t.steps

  def _check_finite(self, metrics: dict, step: int) -> dict:
    """Count consecutive non-finite steps; past the limit, stop naming the step."""
    if metrics["nonfinite"]:
      self.consecutive_nonfinite += 1
      limit = self.s.exp.train.max_nonfinite
      if self.consecutive_nonfinite > limit:
        kept = self.ckpt.all_steps()
        raise TrainingError(
            f"{self.consecutive_nonfinite} consecutive non-finite steps (limit "
            f"config.train.max_nonfinite={limit}), the last at step {step}; params were not "
            f"updated by them; last good checkpoint: step {kept[-1] if kept else 'none'}")
    else:
      self.consecutive_nonfinite = 0
    return metrics

  def _log(self, done: int, interval: list[dict], bar) -> None:
    record = _summarise(interval) | self.throughput.report()
    self.writer.write(done, "train", record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                      **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))


def _summarise(interval: list[dict]) -> dict:
  """Mean of the finite steps' metrics; non-finite ones are counted, never averaged in."""
  finite = [m for m in interval if m["nonfinite"] == 0 and np.isfinite(m["loss"])]
  record = {"nonfinite_steps": len(interval) - len(finite), "lr": float(interval[-1]["lr"])}
  for key in (k for k in steplib.TRAIN_MEANS if k in interval[-1]):
    record[key] = float(np.mean([m[key] for m in finite])) if finite else float("nan")
  return record


def _progress(t, start):
  """A progress bar on process 0 (None when config.train.progress is off)."""
  if not t.progress or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # only with a progress bar
  return tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)


def eval_sums(mesh, eval_fn, state, batches) -> dict:
  """The eval step's sums added over fixed batches (in float64 on the host)."""
  total = None
  for batch in batches:
    out = jax.device_get(eval_fn(state, sharding.global_batch(batch, mesh)))
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), out)
    total = out if total is None else jax.tree.map(np.add, total, out)
  return total


def evaluate(s: setup.Setup, eval_fn, state, batches) -> tuple[dict, dict]:
  """(the task's report and config.prune's sparsity, the sums) over fixed batches."""
  sums = eval_sums(s.mesh, eval_fn, state, batches)
  sparsity = finetune.prune.sparsity(s.exp.prune, state.params)
  return tasks.report_with_moe(s.task, sums) | sparsity, sums


class _Throughput:
  """Tokens/s and model FLOP utilisation over the steps since the last report."""

  def __init__(self, s: setup.Setup):
    exp = s.exp
    # A task that does not count its tokens and FLOPs (CountsFlops) logs examples as tokens
    # and no MFU.
    counts = tasks.supports(s.task, tasks.CountsFlops)
    self.tokens_per_step = exp.train.batch_size * (s.task.tokens_per_example() if counts else 1)
    params = init.param_shapes(s.init_variables) if s.trainable is not None else None
    self.flops_per_step = exp.train.batch_size * s.task.train_flops_per_example(
        params, s.trainable) if counts else None
    device = jax.devices()[0]
    self.peak = flops.device_peak(device.device_kind, exp.model.dtype)
    if self.peak is None:  # no datasheet (CPUs): a matmul measured on this host (once a process)
      self.peak = flops.measured_matmul_peak(exp.model.dtype) * len(jax.local_devices())
    self.peak *= jax.process_count()
    self.reset()

  def reset(self):
    self.start, self.steps = time.perf_counter(), 0

  def report(self) -> dict:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    rate = {"tokens_per_s": self.tokens_per_step * self.steps / seconds}
    if self.flops_per_step is not None:
      rate["mfu"] = self.flops_per_step * self.steps / seconds / self.peak
    self.reset()
    return rate


def _write_outputs(s: setup.Setup, workdir: str, state, metrics_path: str, final: dict,
                   sums: dict, end: int) -> None:
  """The loss plot, the task's report and its end-of-run files (samples, plots, translations)."""
  # Outputs run on one device of process 0 (a few KB to a few MB of params); every process
  # takes part in gathering them.
  params = distributed.to_host(finetune.merge(state.params, state.frozen))
  if jax.process_index() == 0:
    reporting.plot_loss(metrics_path, os.path.join(workdir, "plots", "loss.png"), s.exp.name)
    finetune.record_sparsity(workdir, s.exp, params)  # params.json: what pruning reached
    if tasks.supports(s.task, tasks.WritesFiles):
      s.task.write_report(workdir, final, sums, f"step_{end}")
      s.task.finish(tasks.Outputs(workdir, s.model, params, s.data, final))
