"""An offline teacher (config.distill.top_k = k): the teacher's k largest logits at every
position of every training and validation row, computed once, stored in the workdir with orbax
(`teacher_topk/`) and read with the data as two more columns of each row.

Training then holds no teacher at all: a big teacher is paid for once instead of every step, and
its logits are the same every epoch. Only tasks whose rows fix the model's inputs can use it
(`Predicts.fixed_inputs`; not masked-LM's per-step corruption or augmented images). Storage is
rows x positions x k x 8 bytes (float32 values, int32 ids). A later run in the same workdir
(a resume) reads the store back when its manifest (teacher, k, row counts, a hash of the rows)
matches, and recomputes it otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from llmjax import distributed
from llmjax.objectives import distill as objective
from llmjax.parallel import sharding
from llmjax.tasks.distill import TOPK_IDS, TOPK_VALUES
from llmjax.train import stored_columns, teacher as teacher_lib

STORE = "teacher_topk"
MANIFEST = stored_columns.MANIFEST


def attach(s, workdir: str):
  """`s.data` with the teacher's top-k columns on the train and validation rows."""
  exp, data = s.exp, s.data
  splits = {"train": data.train, "val": data.val}
  manifest = _manifest(exp, splits)
  directory = os.path.abspath(os.path.join(workdir, STORE))
  columns = _read(directory, manifest)
  if columns is None:
    variables = teacher_lib.load(exp, s.teacher)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      columns = {name: compute(s.teacher, variables, rows, exp.distill.top_k, s.mesh,
                               exp.train.batch_size) for name, rows in splits.items()}
    if jax.process_index() == 0:
      _write(directory, columns, manifest)
  with_columns = {name: {**rows, **columns[name]} for name, rows in splits.items()}
  return dataclasses.replace(data, train=with_columns["train"], val=with_columns["val"])


def compute(teacher, variables, rows: dict, k: int, mesh, batch_size: int) -> dict:
  """{TOPK_VALUES: [N, ..., k] float32, TOPK_IDS: [N, ..., k] int32} of the teacher on `rows`."""
  @jax.jit
  def top_k(variables, batch):
    logits = teacher.task.predict(teacher.model, variables, batch, rng=None, train=False).logits
    values, ids = objective.top_k(logits.astype(np.float32), k)
    return values, ids

  count = len(next(iter(rows.values())))
  values, ids = [], []
  for start in range(0, count, batch_size):
    chunk = {key: x[start:start + batch_size] for key, x in rows.items()}
    real = len(next(iter(chunk.values())))
    chunk = {key: _pad_rows(x, batch_size) for key, x in chunk.items()}
    local = {key: x[sharding.process_rows(mesh, batch_size)] for key, x in chunk.items()}
    out = top_k(variables, sharding.global_batch(local, mesh))
    v, i = distributed.to_host(out)
    values.append(np.asarray(v)[:real])
    ids.append(np.asarray(i)[:real])
  return {TOPK_VALUES: np.concatenate(values), TOPK_IDS: np.concatenate(ids).astype(np.int32)}


def example_columns(teacher, k: int, batch: dict) -> dict:
  """`batch` (abstract) with the abstract top-k columns an offline teacher adds to its rows."""
  logits = jax.eval_shape(lambda v, b: teacher.task.predict(teacher.model, v, b, rng=None,
                                                            train=False).logits,
                          teacher.abstract, batch)
  shape = logits.shape[:-1] + (k,)
  return {**batch, TOPK_VALUES: jax.ShapeDtypeStruct(shape, np.float32),
          TOPK_IDS: jax.ShapeDtypeStruct(shape, np.int32)}


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) \
      if len(x) < size else x


def _manifest(exp, splits: dict) -> dict:
  return {"teacher": exp.distill.teacher, "top_k": exp.distill.top_k,
          **stored_columns.rows_fingerprint(splits)}


def _read(directory: str, manifest: dict) -> dict | None:
  if not stored_columns.matches(directory, manifest, "another teacher, k or data"):
    return None
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.map(np.asarray, checkpointer.restore(os.path.join(directory, "arrays")))


def _write(directory: str, columns: dict, manifest: dict) -> None:
  """The arrays, then the manifest: a store without its manifest is never read."""
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "arrays"), columns)
  with open(os.path.join(directory, MANIFEST + ".tmp"), "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(os.path.join(directory, MANIFEST + ".tmp"), os.path.join(directory, MANIFEST))
  size = sum(x.nbytes for split in columns.values() for x in split.values())
  print(f"offline teacher: top-{manifest['top_k']} logits of {manifest['rows']} rows stored in "
        f"{directory} ({size / 2**20:.1f} MiB)", file=sys.stderr)
