"""A trained run's features on a split: the hidden states its output layer reads (what the models
sow as `HEAD_INPUT`), with the labels beside them, to cluster (llmjax.cluster, docs/clustering.md)
or to look at what the model learned."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import linen as nn

from llmjax import tasks
from llmjax.errors import UserError
from llmjax.eval import evaluate
from llmjax.parallel import sharding
from llmjax.train import rundir, state as statelib


def run_features(workdir: str, split: str = "test", step: int | None = None,
                 max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """(features [N, D] float32, labels [N] or None) at every position the task's loss counts:
  a classifier's rows and their labels; an LM's tokens (no labels). Eval mode, no dropout."""
  run = rundir.restore(workdir, step)
  task, data = tasks.setup(run.exp, workdir)
  if not tasks.supports(task, tasks.Predicts):
    raise UserError(f"{workdir}: the {task.name!r} task does not expose its hidden states "
                    "(it does not declare tasks.Predicts)")
  arrays = evaluate.split_arrays(data, split, workdir)
  if max_rows is not None:
    arrays = {k: v[:max_rows] for k, v in arrays.items()}
  devices = run.mesh.size
  batch_size = devices * math.ceil(run.exp.train.batch_size / devices)
  variables = statelib.loss_variables(run.state, run.state.params, run.state.model_state)
  predict = jax.jit(lambda v, batch: task.predict(run.model, v, batch, rng=None, train=False,
                                                  hidden=True))
  features, labels = [], []
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.rules_for("dp")):
    for batch in task.eval_batches(arrays, batch_size):
      prediction = predict(variables, batch)
      keep = np.asarray(prediction.mask) > 0
      features.append(np.asarray(prediction.hidden, np.float32)[keep])
      if np.shape(batch.get("labels")) == keep.shape:
        labels.append(np.asarray(batch["labels"])[keep])
  labelled = len(labels) == len(features)
  return np.concatenate(features), np.concatenate(labels) if labelled else None
