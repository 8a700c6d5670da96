"""Multi-task learning (`config.tasks`): several tasks on one backbone (docs/multitask.md).

Parameters: what every task's model holds at the same path and shape is the shared backbone and
stays where a single-task model keeps it (`embed`, `layer_0`, ...), so single-task checkpoints
load into it; the rest of task k's parameters live under `heads/<k>/...`. Task k's model sees
the backbone merged with its own head.

Data: the training rows are a mixture: a table of (task, row) pairs, fixed by the data and the
seed, in which each task holds its weight's share of the positions (largest remainder), long
enough that every task's rows all appear; the ordinary checkpointable iterator shuffles it, so
batches mix tasks at the weights' frequencies and resume exactly. Every row carries `task_id`;
keys a task's rows lack are zeros.

Loss: each task's own loss over its own rows (`SharesBatch.only_rows`), as a mean over the global
batch, combined as sum_k loss_weight_k * mean_k (weight 1 per step; exact over devices, which
is why accumulation is refused in config_tasks). Every task's model runs on the whole batch:
K tasks cost K forward/backward passes per row. Evaluation runs each task on its own rows and
reports `val/<k>` (the task's own report) and `val` (the combined loss, ranking checkpoints).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import treepaths
from llmjax.config import Experiment
from llmjax.config_tasks import TaskEntry
from llmjax.errors import ConfigError
from llmjax.models import moe
from llmjax.tasks.base import (CountsFlops, Data, DecodedReport, LossTerms, Outputs, SharesBatch,
                               Task, WritesFiles, declared, loss_with_moe, report_with_moe,
                               supports)
from llmjax.tasks.registry import TASKS

TASK_ID = "task_id"
HEADS = "heads"
_MAX_TABLE = 2**26  # positions of one mixture epoch (8 bytes each)


@dataclasses.dataclass(frozen=True, eq=False)
class MultiModel:
  """The tasks' models by head name; each is applied to its view of the parameters."""
  models: dict


@dataclasses.dataclass(frozen=True)
class MultiData(Data):
  parts: dict = dataclasses.field(default_factory=dict)  # head -> the task's own Data


def sub_experiment(exp: Experiment, entry: TaskEntry) -> Experiment:
  """The experiment one task sees: its own data and task sections, the rest shared."""
  return dataclasses.replace(exp, task=entry.task, data=entry.data, tasks=())


# --- the parameter tree --------------------------------------------------------------------------


def _shape(leaf) -> tuple:
  return tuple(np.shape(getattr(leaf, "value", leaf)))  # boxed (nn.Partitioned) or not


def combine(params_by_head: dict[str, dict]) -> dict:
  """Each task's model parameters -> one tree: the backbone every model shares (same path and
  shape in all), and `heads/<k>/...` for the rest of model k."""
  flat = {head: dict(treepaths.items(p)) for head, p in params_by_head.items()}
  first = next(iter(flat.values()))
  for head, f in flat.items():
    if any(path.split("/")[0] == HEADS for path in f):
      raise ConfigError(f"config.tasks.{head}: the task's model has a top-level '{HEADS}' "
                        "parameter, the name multi-task heads live under")
  shared = {path for path, leaf in first.items()
            if all(path in f and _shape(f[path]) == _shape(leaf) for f in flat.values())}
  out = {path: leaf for path, leaf in first.items() if path in shared}
  for head, f in flat.items():
    out.update({f"{HEADS}/{head}/{path}": leaf for path, leaf in f.items() if path not in shared})
  return treepaths.nest(out)


def params_for(params: dict, head: str) -> dict:
  """Task `head`'s model parameters: the backbone merged with heads/<head>/."""
  flat = dict(treepaths.items({k: v for k, v in params.items() if k != HEADS}))
  flat.update(treepaths.items(params.get(HEADS, {}).get(head, {})))
  return treepaths.nest(flat)


# --- the mixture ---------------------------------------------------------------------------------


def mixture_table(sizes: list[int], weights: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(task [M], row [M]) int32: one mixture epoch. Task k holds round(M * w_k / sum w) positions
  (largest remainder), M as small as lets every task with weight show all its rows; a task's rows
  repeat in seeded permutations to fill its share."""
  p = np.asarray(weights, np.float64) / float(np.sum(weights))
  live = [k for k in range(len(sizes)) if p[k] > 0]
  length = int(np.ceil(max(sizes[k] / p[k] for k in live) - 1e-9))
  if length > _MAX_TABLE:
    raise ConfigError(f"config.tasks: weights {list(weights)} over {sizes} training rows need a "
                      f"mixture of {length} rows to show every row (limit {_MAX_TABLE}); give the "
                      "small-weight tasks more weight")
  exact = length * p
  quota = np.floor(exact).astype(np.int64)
  for k in np.argsort(-(exact - quota), kind="stable")[:length - int(quota.sum())]:
    quota[k] += 1
  tasks, rows = [], []
  for k, (n, q) in enumerate(zip(sizes, quota)):
    rng = np.random.default_rng([seed % 2**32, k])
    repeats = -(-int(q) // n) if n else 0
    order = (np.concatenate([rng.permutation(n) for _ in range(repeats)])[:q] if repeats
             else np.zeros(0, np.int64))
    tasks.append(np.full(int(q), k, np.int32))
    rows.append(order.astype(np.int32))
  return np.concatenate(tasks), np.concatenate(rows)


class _Column:
  """One key of the mixture's rows, gathered from each task's arrays on demand (zeros where a
  task has no such key): what `text.batch_iterator` indexes like an array."""

  def __init__(self, key, parts: list[dict], task_N, row_N, shape, dtype):
    self.key, self.parts, self.task_N, self.row_N = key, parts, task_N, row_N
    self.shape, self.dtype = (len(task_N),) + shape, dtype

  def __len__(self) -> int:
    return len(self.task_N)

  def __getitem__(self, index):
    index = np.asarray(index)
    task_B, row_B = self.task_N[index], self.row_N[index]
    if self.key == TASK_ID:
      return task_B.astype(np.int32)
    out = np.zeros((len(index),) + self.shape[1:], self.dtype)
    for k, arrays in enumerate(self.parts):
      take = task_B == k
      if self.key in arrays and take.any():
        out[take] = arrays[self.key][row_B[take]]
    return out


def _row_keys(parts: dict[str, Data]) -> dict[str, tuple]:
  """key -> (shape after the row axis, dtype), the union over every task's rows."""
  keys = {}
  for head, data in parts.items():
    for split in ("train", "val", "test"):
      for key, array in (getattr(data, split) or {}).items():
        spec = (np.shape(array)[1:], np.asarray(array[:0]).dtype)
        if keys.setdefault(key, spec + (head,))[:2] != spec:
          raise ConfigError(f"config.tasks: {key!r} rows of {keys[key][2]} "
                            f"({keys[key][0]}, {keys[key][1]}) and of {head} {spec} differ; "
                            "the tasks' rows share one batch (set one config.data.seq_len)")
  return {key: spec[:2] for key, spec in keys.items()}


def _concatenated(parts: list[dict | None], keys: dict) -> dict | None:
  """Evaluation rows of every task, one after another, with task_id and zero-filled keys."""
  if all(p is None for p in parts):
    return None
  out = {key: [] for key in keys}
  ids = []
  for k, arrays in enumerate(parts):
    if arrays is None:
      continue
    n = len(next(iter(arrays.values())))
    for key, (shape, dtype) in keys.items():
      out[key].append(arrays[key] if key in arrays else np.zeros((n,) + shape, dtype))
    ids.append(np.full(n, k, np.int32))
  return {**{key: np.concatenate(v) for key, v in out.items()}, TASK_ID: np.concatenate(ids)}


def _shared_tokenizer(parts: dict[str, Data]):
  seen = {head: (d.tokenizer.name, d.tokenizer.vocab_size, d.artifacts.get("tokenizer.json"))
          for head, d in parts.items() if d.tokenizer is not None}
  if len(set(seen.values())) > 1:
    described = ", ".join(f"{h}: {n} ({v} ids)" for h, (n, v, _) in seen.items())
    raise ConfigError(f"config.tasks: the tasks' tokenizers differ ({described}); a shared "
                      "backbone reads one vocabulary: set config.data.tokenizer once (byte or "
                      "hf:PATH) and no task's own data.tokenizer")
  return next((d.tokenizer for d in parts.values() if d.tokenizer is not None), None)


def subdir(workdir: str | None, head: str) -> str | None:
  """Where task `head` keeps its files in a run's workdir (labels.json, samples.txt, plots)."""
  return os.path.join(workdir, "tasks", head) if workdir else None


# --- the task ------------------------------------------------------------------------------------


class MultiTask(DecodedReport, WritesFiles, CountsFlops, Task):
  """Several tasks on one backbone: a head, data, mixture weight and loss weight each. It has a
  capability when some task has it (decoded reports, files) or every task does (FLOPs); it is
  not exportable (one model per head) and cannot itself share a batch."""
  name = "multitask"

  def __init__(self, exp: Experiment, info: dict | None = None):
    super().__init__(exp, info)
    infos = self.info.get("tasks", {})
    self.entries = {e.head: e for e in exp.tasks}
    self.subs: dict[str, Task] = {}
    for e in exp.tasks:
      cls = TASKS[e.task.name]
      if SharesBatch not in declared(cls):
        able = ", ".join(n for n, c in TASKS.items() if SharesBatch in declared(c))
        raise ConfigError(f"config.tasks.{e.head}.task.name={e.task.name!r} cannot share a "
                          f"batch with other tasks yet (it does not declare SharesBatch); "
                          f"allowed: {able}")
      self.subs[e.head] = cls(sub_experiment(exp, e), infos.get(e.head))
    total = sum(e.weight for e in exp.tasks)
    self.mixture = {e.head: e.weight / total for e in exp.tasks}

  @property
  def capabilities(self):
    subs = [sub.capabilities for sub in self.subs.values()]
    some = frozenset().union(*subs) & {DecodedReport, WritesFiles}
    return some | (frozenset({CountsFlops}) if all(CountsFlops in c for c in subs) else frozenset())

  def with_info(self, info):
    return MultiTask(self.exp, info)

  def data(self, workdir):
    parts = {head: sub.data(subdir(workdir, head)) for head, sub in self.subs.items()}
    tokenizer = _shared_tokenizer(parts)
    keys = _row_keys(parts)
    trains = [parts[h].train for h in self.subs]
    task_N, row_N = mixture_table([len(next(iter(t.values()))) for t in trains],
                                  [self.entries[h].weight for h in self.subs],
                                  self.exp.data.seed)
    train = {key: _Column(key, trains, task_N, row_N, shape, dtype)
             for key, (shape, dtype) in keys.items()}
    train[TASK_ID] = _Column(TASK_ID, trains, task_N, row_N, (), np.int32)
    artifacts = {f"tasks/{h}/{name}": text_ for h, d in parts.items()
                 for name, text_ in d.artifacts.items()}
    info = {"tasks": {h: d.info for h, d in parts.items()}, "heads": list(self.subs),
            "mixture": self.mixture}
    if tokenizer is not None:
      info.update(tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size)
    return MultiData(
        train=train, val=_concatenated([parts[h].val for h in self.subs], keys),
        test=_concatenated([parts[h].test for h in self.subs], keys), tokenizer=tokenizer,
        info=info, artifacts=artifacts, parts=parts)

  def model(self):
    return MultiModel({head: sub.model() for head, sub in self.subs.items()})

  def example_batch(self, batch_size):
    batch = {}
    for head, sub in self.subs.items():
      for key, spec in sub.example_batch(batch_size).items():
        if batch.setdefault(key, spec) != spec:
          raise ConfigError(f"config.tasks.{head}: its {key!r} rows {spec} differ from another "
                            f"task's {batch[key]}; the tasks' rows share one batch")
    return {**batch, TASK_ID: jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def init(self, model, rngs, batch):
    params = {}
    batch = {k: v for k, v in batch.items() if k != TASK_ID}
    for head, sub in self.subs.items():
      variables = dict(sub.init(model.models[head], rngs, batch))
      if set(variables) - {"params"}:
        raise ConfigError(f"config.tasks.{head}: a model with mutable state "
                          f"({', '.join(sorted(set(variables) - {'params'}))}) cannot share its "
                          "backbone yet")
      params[head] = variables["params"]
    return {"params": combine(params)}

  def loss(self, model, variables, batch, *, rng, train):
    """sum_k loss_weight_k * (task k's loss sum over its rows / its count), weight 1; each
    task's own sums under sums["tasks"][k] for its report.

    Task k's loss is `loss_with_moe`'s: with sparse layers its model's load-balancing and
    z-losses join it in training (so they enter with its loss weight), and its sums carry the
    statistics. In training the top-level sums hold them combined as the loss is (sum_k
    loss_weight_k * task k's per-weight mean), which the train records log."""
    task_B = batch[TASK_ID]
    rows = {k: v for k, v in batch.items() if k != TASK_ID}
    total, per_task = jnp.zeros((), jnp.float32), {}
    combined = {}
    for k, (head, sub) in enumerate(self.subs.items()):
      keep_B = (task_B == k).astype(jnp.float32)
      key = None if rng is None else jax.random.fold_in(rng, k)
      terms = loss_with_moe(sub, model.models[head],
                            {"params": params_for(variables["params"], head)},
                            sub.only_rows(rows, keep_B), rng=key, train=train)
      share = self.entries[head].loss_weight / jnp.maximum(terms.weight, 1.0)
      total += share * terms.loss_sum
      per_task[head] = {"loss_sum": terms.loss_sum, "weight": terms.weight, **terms.sums}
      for name in moe.TRAIN_SUMS if train else ():
        if name in terms.sums:
          combined[name] = combined.get(name, 0.0) + share * terms.sums[name]
    return LossTerms(total, jnp.ones((), jnp.float32), {"tasks": per_task, **combined}, {})

  def eval_batches(self, arrays, batch_size, max_batches=None):
    """Each task's rows in batches of their own, at most `max_batches` per task."""
    batches = []
    for k, sub in enumerate(self.subs.values()):
      take = arrays[TASK_ID] == k
      if take.any():
        batches += sub.eval_batches({key: v[take] for key, v in arrays.items()}, batch_size,
                                    max_batches)
    return batches

  def report(self, sums):
    """{"loss": sum_k loss_weight_k * loss_k, "tasks": {k: task k's own report}} over the tasks
    whose rows were evaluated."""
    per_task = {head: report_with_moe(sub, sums["tasks"][head])
                for head, sub in self.subs.items() if float(sums["tasks"][head]["weight"]) > 0}
    loss = sum(self.entries[h].loss_weight * r["loss"] for h, r in per_task.items())
    return {"loss": float(loss), "tasks": per_task}

  def split_records(self, split, report):
    """`split` with the combined loss, and `split/<k>` with task k's report (plus what
    `decoded_report` added for it as `<k>/name`)."""
    records = {split: {"loss": report["loss"]}}
    for head, sub_report in report.get("tasks", {}).items():
      decoded = {k.split("/", 1)[1]: v for k, v in report.items()
                 if k.startswith(f"{head}/")}
      records[f"{split}/{head}"] = {**sub_report, **decoded}
    return records

  def decoded_keys(self):
    return tuple(f"{head}/{k}" for head, sub in self.subs.items()
                 if supports(sub, DecodedReport) for k in sub.decoded_keys())

  def decoded_report(self, model, get_params, data, split, limit=None):
    cache = []

    def params_of(head):
      if not cache:
        cache.append(get_params())
      return params_for(cache[0], head)
    out = {}
    for head, sub in self.subs.items():
      if not supports(sub, DecodedReport):
        continue
      found = sub.decoded_report(model.models[head], lambda h=head: params_of(h),
                                 data.parts[head], split, limit)
      out.update({f"{head}/{k}": v for k, v in found.items()})
    return out

  def write_decoded(self, workdir, step):
    written = []
    for head, sub in self.subs.items():
      if supports(sub, DecodedReport):
        written += sub.write_decoded(subdir(workdir, head), step)
    return written

  def headline(self, report):
    each = "; ".join(f"{h}: {self.subs[h].headline(r).removeprefix('final validation ')}"
                     for h, r in report["tasks"].items())
    return f"final validation loss {report['loss']:.4f} (loss_weight x each task's: {each})"

  def write_report(self, workdir, report, sums, tag):
    written = []
    for head, sub_report in report.get("tasks", {}).items():
      if not supports(self.subs[head], WritesFiles):
        continue
      written += self.subs[head].write_report(subdir(workdir, head), sub_report,
                                              sums["tasks"][head], f"{head} {tag}")
    return written

  def finish(self, outputs: Outputs):
    written = []
    for head, sub in self.subs.items():
      if not supports(sub, WritesFiles):
        continue
      where = subdir(outputs.workdir, head)
      os.makedirs(where, exist_ok=True)
      written += sub.finish(Outputs(where, outputs.model.models[head],
                                    params_for(outputs.params, head), outputs.data.parts[head],
                                    outputs.report.get("tasks", {}).get(head, {})))
    return written

  def tokens_per_example(self):
    return sum(p * self.subs[h].tokens_per_example() for h, p in self.mixture.items())

  def forward_flops_per_example(self):
    """Useful work: each row's own task's model (the step runs every task's on every row)."""
    parts = [self.subs[h].forward_flops_per_example().scaled(p) for h, p in self.mixture.items()]
    total = parts[0]
    for part in parts[1:]:
      total = total.plus(part)
    return total
