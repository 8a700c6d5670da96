"""The reference model of a task that declares `References` (dpo), where its kind puts it:

  copy          the starting parameters, copied once into the train state's `teacher` field,
                sharded like the policy; never differentiated, donated or checkpointed (a resumed
                run builds its start again: the same seed and init_from give the same weights)
  adapters_off  nothing here: the task's loss runs the network without its added parameters
  precomputed   the reference's columns of every train and validation row, computed once from
                the starting parameters and stored in WORKDIR/reference_logps (npz + manifest);
                a later run in the workdir reads them back when its manifest matches
`for_evaluation` puts it in the same place for `llmjax eval` of a reopened run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from flax import linen as nn

from llmjax import distributed, finetune, tasks
from llmjax.errors import ConfigError
from llmjax.parallel import sharding
from llmjax.train import pretrained, stored_columns

STORE = "reference_logps"
MANIFEST = stored_columns.MANIFEST


def kind(task) -> str | None:
  """The task's reference kind, or None when it has no reference."""
  return task.reference_kind() if tasks.supports(task, tasks.References) else None


def check_vocabulary(exp, tokenizer) -> None:
  """The reference is the starting policy: the weights config.train.init_from names must have
  been trained on the ids the data's tokenizer gives (a ConfigError naming both otherwise)."""
  if not exp.train.init_from:
    return
  src = pretrained.source(exp.train.init_from)
  directory, name = src.tokenizer_dir(), src.tokenizer_name()
  if directory is not None and os.path.isfile(os.path.join(directory, "tokenizer.json")):
    with open(os.path.join(directory, "tokenizer.json")) as f:
      theirs, what = _vocab(f.read()), f"{directory}/tokenizer.json"
  elif name is not None:
    theirs, what = name, repr(name)
  else:
    return  # nothing recorded to compare with
  ours = _vocab(tokenizer.to_json()) if hasattr(tokenizer, "to_json") else tokenizer.name
  if theirs != ours:
    raise ConfigError(f"config.train.init_from={exp.train.init_from!r}: the reference model (the "
                      f"starting policy) was trained with the vocabulary of {what}, but "
                      f"config.data.tokenizer={exp.data.tokenizer!r} tokenizes the preference "
                      "data; they must be the same vocabulary")


def _vocab(tokenizer_json: str):
  return json.loads(tokenizer_json).get("model", {}).get("vocab")


def abstract(task, abstract_state, state_shardings):
  """(abstract state, shardings) with the copied reference's place in the teacher field."""
  if kind(task) != "copy":
    return abstract_state, state_shardings
  return (abstract_state.replace(teacher={"params": finetune.merge(abstract_state.params,
                                                                   abstract_state.frozen)}),
          state_shardings.replace(teacher={"params": finetune.merge(state_shardings.params,
                                                                    state_shardings.frozen)}))


def attach_state(s, state, start):
  """`state` with a copy of the starting parameters as its reference (copy kind only); `start`
  is the starting state or a function that builds it."""
  if kind(s.task) != "copy":
    return state
  start = start() if callable(start) else start
  params = finetune.merge(start.params, start.frozen)
  # New buffers: the policy's own are donated to the step and must not be the reference's.
  copied = jax.jit(lambda p: jax.tree.map(lambda x: x.copy(), p),
                   out_shardings=s.state_shardings.teacher["params"])(params)
  return state.replace(teacher={"params": copied})


def attach_data(s, workdir: str, start):
  """`s.data` with the precomputed reference's columns (precomputed kind only; else as is)."""
  if kind(s.task) != "precomputed":
    return s.data
  data = s.data
  splits = {"train": data.train, "val": data.val}
  manifest = _manifest(s.exp, splits)
  directory = os.path.abspath(os.path.join(workdir, STORE))
  columns = _read(directory, manifest)
  if columns is None:
    start = start() if callable(start) else start
    variables = {"params": finetune.merge(start.params, start.frozen), **start.model_state}
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      columns = {name: compute(s, variables, rows) for name, rows in splits.items()}
    if jax.process_index() == 0:
      _write(directory, columns, manifest)
  return dataclasses.replace(data, train={**data.train, **columns["train"]},
                             val={**data.val, **columns["val"]})


def for_evaluation(run, data, workdir: str):
  """(state, data) of a reopened run (`rundir.restore`) with its reference where the loss finds
  it: a `copy` run's starting parameters in the teacher field; a `precomputed` run's columns read
  back from WORKDIR/reference_logps, or, where that store is gone or no longer matches, its
  starting parameters in the teacher field (the same reference, computed in place)."""
  k = kind(run.task)
  if k == "precomputed":
    splits = {"train": data.train, "val": data.val}
    columns = _read(os.path.abspath(os.path.join(workdir, STORE)), _manifest(run.exp, splits))
    if columns is not None:
      return run.state, dataclasses.replace(data, train={**data.train, **columns["train"]},
                                            val={**data.val, **columns["val"]})
  elif k != "copy":
    return run.state, data
  start = run.started(data)
  return run.state.replace(teacher={"params": finetune.merge(start.params, start.frozen)}), data


def compute(s, variables, rows: dict) -> dict:
  """The task's reference columns of every row, in global batches of the run's size."""
  fn = jax.jit(lambda v, b: s.task.reference_columns(s.model, v, b))
  size = s.exp.train.batch_size
  count = len(next(iter(rows.values())))
  out: dict[str, list] = {}
  for start in range(0, count, size):
    chunk = {k: x[start:start + size] for k, x in rows.items()}
    real = len(next(iter(chunk.values())))
    chunk = {k: np.concatenate([x, np.zeros((size - real,) + x.shape[1:], x.dtype)])
             for k, x in chunk.items()}
    local = {k: x[sharding.process_rows(s.mesh, size)] for k, x in chunk.items()}
    for k, v in distributed.to_host(fn(variables, sharding.global_batch(local, s.mesh))).items():
      out.setdefault(k, []).append(np.asarray(v, np.float32)[:real])
  return {k: np.concatenate(v) for k, v in out.items()}


def _manifest(exp, splits: dict) -> dict:
  """What the stored columns depend on: the starting weights' source and seed, the loss type
  (ipo averages per token), and the rows."""
  return {"init_from": exp.train.init_from, "seed": exp.train.seed,
          "loss_type": exp.task.loss_type, "model": json.loads(exp.to_json())["model"],
          **stored_columns.rows_fingerprint(splits)}


def _read(directory: str, manifest: dict) -> dict | None:
  if not stored_columns.matches(directory, manifest, "other starting weights or data"):
    return None
  with np.load(os.path.join(directory, "columns.npz")) as z:
    columns: dict = {}
    for key in z.files:
      split, _, name = key.partition("/")
      columns.setdefault(split, {})[name] = z[key]
    return columns


def _write(directory: str, columns: dict, manifest: dict) -> None:
  """The columns, then the manifest: a store without its manifest is never read."""
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, MANIFEST)):
    os.remove(os.path.join(directory, MANIFEST))
  flat = {f"{split}/{k}": v for split, cols in columns.items() for k, v in cols.items()}
  with open(os.path.join(directory, "columns.npz.tmp"), "wb") as f:
    np.savez(f, **flat)
  os.replace(os.path.join(directory, "columns.npz.tmp"), os.path.join(directory, "columns.npz"))
  with open(os.path.join(directory, MANIFEST + ".tmp"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(os.path.join(directory, MANIFEST + ".tmp"), os.path.join(directory, MANIFEST))
  print(f"reference log-probabilities of {manifest['rows']} pairs stored in {directory}",
        file=sys.stderr)
