"""The training loop, top to bottom: config -> mesh and rules -> abstract init -> shardings ->
state (fresh or restored) -> data iterator (fresh or restored) -> jitted step -> metrics,
checkpoints, plots and samples.

Everything that can reject the input (mesh, shapes, data) runs before the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from flax import linen as nn

from llmjax import checkpoint, flops, generate
from llmjax.config import Experiment
from llmjax.data import text
from llmjax.errors import ConfigError, TrainingError
from llmjax.models.transformer import Transformer
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding
from llmjax.train import init, optim, preemption, pretrained, reporting, step


@dataclasses.dataclass
class Setup:
  """What the loop needs, assembled and validated before anything is written."""
  exp: Experiment
  mesh: jax.sharding.Mesh
  rules: tuple
  model: Transformer
  corpus: text.Corpus
  tx: object
  schedule: object
  abstract_state: object
  state_shardings: object


def prepare(exp: Experiment) -> Setup:
  """Validate against the devices and data; build model, optimiser and abstract state."""
  mesh = meshlib.make_mesh(exp.mesh)
  rules = sharding.rules_for(exp.mesh.rules)
  sharding.check_divisible(exp.model, mesh, exp.mesh.rules)
  per_step = meshlib.batch_parallelism(mesh) * exp.optim.accum_steps
  if exp.train.batch_size % per_step:
    raise ConfigError(f"config.train.batch_size={exp.train.batch_size} must be divisible by the "
                      f"data-parallel size (mesh data*fsdp={meshlib.batch_parallelism(mesh)}) x "
                      f"config.optim.accum_steps={exp.optim.accum_steps}")
  corpus = text.load_corpus(exp.data)
  if corpus.tokenizer.vocab_size > exp.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size={exp.model.vocab_size} is smaller than the "
                      f"tokenizer's vocabulary ({corpus.tokenizer.vocab_size})")
  model = Transformer(exp.model)
  tx = optim.make_optimizer(exp.optim, exp.train.steps)
  schedule = optim.learning_rate_schedule(exp.optim, exp.train.steps)
  abstract_state, state_shardings = init.state_shardings(model, tx, exp.data.seq_len, mesh, rules)
  return Setup(exp, mesh, rules, model, corpus, tx, schedule, abstract_state, state_shardings)


def compile_steps(s: Setup):
  """The jitted train and eval steps, with explicit shardings; the train state is donated."""
  return step.jit_steps(s.model, s.tx, s.schedule, s.exp.optim.accum_steps, s.mesh,
                        s.state_shardings)


def _data_iterator(s: Setup, data_state: dict | None):
  iterator = text.batch_iterator(
      s.corpus.train, s.exp.train.batch_size // jax.process_count(), seed=s.exp.data.seed,
      shuffle=True, num_epochs=None, process_index=jax.process_index(),
      process_count=jax.process_count())
  if data_state:
    iterator.set_state(data_state["grain"].encode())
  return iterator


def _process_slices(global_batches: list[dict]) -> list[dict]:
  """This process's rows of each global batch (every process holds the same global list)."""
  count, index = jax.process_count(), jax.process_index()
  def rows(x):
    per_process = x.shape[0] // count
    return x[index * per_process:(index + 1) * per_process]
  return [jax.tree.map(rows, batch) for batch in global_batches]


def _data_state(iterator) -> dict:
  state = iterator.get_state()
  return {"grain": state.decode() if isinstance(state, bytes) else json.dumps(state)}


def evaluate(s: Setup, eval_fn, state, batches) -> dict:
  """Validation loss, perplexity and (byte tokenizer) bits per byte over fixed batches."""
  loss_sum, tokens = 0.0, 0.0
  for batch in batches:
    out = jax.device_get(eval_fn(state, sharding.global_batch(batch, s.mesh)))
    loss_sum, tokens = loss_sum + float(out["loss_sum"]), tokens + float(out["tokens"])
  loss = loss_sum / max(tokens, 1.0)
  metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
  if s.corpus.tokenizer.name == "byte":
    metrics["bits_per_byte"] = loss / math.log(2)
  return metrics


class _Throughput:
  """Tokens/s and model FLOP utilisation over the steps since the last report."""

  def __init__(self, s: Setup):
    exp = s.exp
    self.tokens_per_step = exp.train.batch_size * exp.data.seq_len
    self.flops_per_step = flops.train_flops_per_step(exp.model, exp.train.batch_size,
                                                     exp.data.seq_len)
    device = jax.devices()[0]
    self.peak = flops.device_peak(device.device_kind, exp.model.dtype)
    if self.peak is None:  # no datasheet (CPUs): compare against a matmul measured right now
      self.peak = flops.measured_matmul_peak(exp.model.dtype) * len(jax.local_devices())
    self.peak *= jax.process_count()
    self.reset()

  def reset(self):
    self.start, self.steps = time.perf_counter(), 0

  def report(self) -> dict:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    rate = {"tokens_per_s": self.tokens_per_step * self.steps / seconds,
            "mfu": self.flops_per_step * self.steps / seconds / self.peak}
    self.reset()
    return rate


def write_samples(s: Setup, state, path: str) -> None:
  """Continue a few validation prompts and write prompt + continuation as text."""
  t = s.exp.train
  n_new = min(t.sample_tokens, s.exp.model.max_len // 2)
  prompt_len = min(64, s.exp.model.max_len - n_new)
  rows = s.corpus.val["tokens"][: t.sample_prompts, :prompt_len]
  params = jax.device_get(state.params)  # samples run on one device: a few KB to a few MB
  out = generate.sample(s.model, params, jax.numpy.asarray(rows), jax.random.PRNGKey(t.seed),
                        n_new=n_new, temperature=t.sample_temperature)
  decode = s.corpus.tokenizer.decode
  with open(path, "w") as f:
    for prompt, continuation in zip(rows, np.asarray(out)):
      f.write(f"=== prompt\n{decode(prompt)}\n=== continuation\n{decode(continuation)}\n\n")


def initial_state(s: Setup, ckpt: checkpoint.Checkpointer):
  """(state, data_state): the newest verified checkpoint, else a fresh init (maybe from weights)."""
  found = ckpt.restore_latest_good(s.abstract_state, s.state_shardings)
  if found is not None:
    _, (state, data_state, _) = found
    return state, data_state
  t = s.exp.train
  state = init.init_state(t.seed, s.model, s.tx, s.exp.data.seq_len, s.mesh, s.rules,
                          s.state_shardings)
  if t.init_from:
    params = pretrained.load_params(t.init_from, s.abstract_state.params,
                                    s.state_shardings.params)
    state = state.replace(params=params)
  return state, None


def run(exp: Experiment, workdir: str) -> dict:
  """Train (or resume) `exp` in `workdir`; returns the final validation metrics.

  SIGTERM/SIGINT finish the current step, save it and return {"step", "preempted": True}.
  """
  s = prepare(exp)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(exp.to_json())
  t = exp.train
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints,
                                 keep_best=t.keep_best, async_save=t.async_checkpoint)
  state, data_state = initial_state(s, ckpt)
  start = int(jax.device_get(state.step))
  writer = reporting.MetricWriter(workdir, is_main=is_main)
  if is_main:
    reporting.truncate_after(writer.path, start)
  loop = _Loop(s, ckpt, writer, _data_iterator(s, data_state))
  try:
    with (jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules),
          preemption.Listener() as signals):
      state = loop.train(state, start, signals)
      if loop.preempted_at is not None:
        return {"step": loop.preempted_at, "preempted": True}
      final = loop.evaluate(state)
      end = int(jax.device_get(state.step))
      writer.write(end, "val", final)
      if end not in ckpt.all_steps():
        loop.save(state, end, final["loss"])
  finally:  # pending async saves complete (or report their failure) on every exit path
    writer.close()
    ckpt.close()
  if is_main:
    reporting.plot_loss(writer.path, os.path.join(workdir, "plots", "loss.png"), exp.name)
    write_samples(s, state, os.path.join(workdir, "samples.txt"))
  return {"step": end, **final}


class _Loop:
  """The step loop and its periodic work; step n-1's metrics are read after step n is dispatched."""

  def __init__(self, s: Setup, ckpt, writer, iterator):
    self.s, self.ckpt, self.writer, self.iterator = s, ckpt, writer, iterator
    self.train_fn, self.eval_fn = compile_steps(s)
    self.val_batches = _process_slices(text.eval_batches(s.corpus.val, s.exp.train.batch_size,
                                                         s.exp.train.eval_batches))
    self.throughput = _Throughput(s)
    self.last_val_loss = None
    self.consecutive_nonfinite = 0
    self.preempted_at = None

  def evaluate(self, state) -> dict:
    metrics = evaluate(self.s, self.eval_fn, state, self.val_batches)
    self.last_val_loss = metrics["loss"]
    return metrics

  def save(self, state, step: int, metric=None) -> None:
    self.ckpt.save(step, state, _data_state(self.iterator), json.loads(self.s.exp.to_json()),
                   metric=self.last_val_loss if metric is None else metric)

  def train(self, state, start: int, signals):
    t = self.s.exp.train
    bar = _progress(t, start)
    pending, interval = None, []
    for step_index in range(start, t.steps):
      batch = sharding.global_batch(next(self.iterator), self.s.mesh)
      state, metrics = self.train_fn(state, batch)
      self.throughput.steps += 1
      if pending is not None:
        interval.append(self._check_finite(jax.device_get(pending), step_index))
      pending, done = metrics, step_index + 1
      stop = signals.should_stop(self.ckpt, done)
      if done % t.log_every == 0 or done == t.steps or stop:
        interval.append(self._check_finite(jax.device_get(pending), done))
        pending = None
        self._log(done, interval, bar)
        interval = []
      if stop:
        self.save(state, done)
        self.ckpt.wait()
        self.preempted_at = done
        break
      self._periodic(state, done)
      if bar is not None:
        bar.update(1)
    if bar is not None:
      bar.close()
    return state

  def _periodic(self, state, done: int) -> None:
    t = self.s.exp.train
    if done % t.eval_every == 0 and done != t.steps:
      self.writer.write(done, "val", self.evaluate(state))
      self.throughput.reset()  # evaluation time is not training throughput
    if done % t.checkpoint_every == 0 and done != t.steps:
      self.save(state, done)

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
                      mfu=f"{record['mfu']:.1%}")


def _summarise(interval: list[dict]) -> dict:
  """Mean of the finite steps' metrics; non-finite ones are counted, never averaged in."""
  finite = [m for m in interval if m["nonfinite"] == 0 and np.isfinite(m["loss"])]
  record = {"nonfinite_steps": len(interval) - len(finite), "lr": float(interval[-1]["lr"])}
  for key in ("loss", "grad_norm"):
    record[key] = float(np.mean([m[key] for m in finite])) if finite else float("nan")
  return record


def _progress(t, start):
  if not t.progress or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
