"""What a fine-tuning run adds to the loop: the trainable set, the optimizer wrappers (AdaLoRA's
budget, config.prune's masks), the first values of a tuned prompt, and `params.json`."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import flops, treepaths
from llmjax.config import Experiment
from llmjax.errors import ConfigError
from llmjax.finetune import adalora, partition, prune, spec

PARAMS_FILE = "params.json"


def plan(exp: Experiment, param_shapes: dict) -> frozenset[str] | None:
  """The trainable parameter paths, or None when every parameter trains (plain training)."""
  f = exp.finetune
  everything = f.method == "full" and not f.frozen
  trainable = None if everything else spec.trainable_paths(exp, param_shapes)
  _check_stored_integers(exp, param_shapes, trainable)
  prune.check(exp.prune, param_shapes, trainable)  # pruning reaches trained parameters only
  if everything:
    return None
  frozen = len(param_shapes) - len(trainable)
  print(f"finetune {f.method}: {len(trainable)} parameter arrays train, {frozen} frozen",
        file=sys.stderr)
  return trainable


def _check_stored_integers(exp: Experiment, param_shapes: dict, trainable) -> None:
  """A quantized model's stored kernels (config.model.quant) are integers: they cannot train."""
  trains = [p for p, x in sorted(param_shapes.items()) if (trainable is None or p in trainable)
            and not jnp.issubdtype(x.dtype, jnp.inexact)]
  if trains:
    raise ConfigError(
        f"config.model.quant={exp.model.quant!r} stores {trains[0]} as {param_shapes[trains[0]].dtype}, "
        f"which cannot train, and config.finetune.method={exp.finetune.method!r} trains it "
        f"({len(trains)} such parameters); keep them frozen with lora, adalora, adapter, prompt, "
        "prefix or bitfit (QLoRA), or train the float model")


def optimizer(exp: Experiment, tx, trainable):
  """The run's optimizer: `tx`, wrapped with AdaLoRA's rank budget for method="adalora", and
  outermost with config.prune's masks (applied after every other transformation)."""
  if exp.finetune.method == "adalora":
    tx = adalora.with_budget(tx, exp.finetune, exp.train.steps)
  return prune.with_pruning(tx, exp.prune) if exp.prune.on else tx


def initialise_added(exp: Experiment, state, data):
  """A fresh state with the tuned prompt initialised as config.finetune.prompt_init asks."""
  f = exp.finetune
  if f.method != "prompt" or f.prompt_init == "random":
    return state
  prompt_path = next(p for p, _ in partition.items(state.params) if p.split("/")[-1] == "prompt")
  table_path = prompt_path[:-len("prompt")] + "embed/embedding"
  table_VD = dict(partition.items(partition.merge(state.params, state.frozen)))[table_path]
  ids_P = _prompt_ids(exp, data, table_VD.shape[0])
  prompt_PD = jnp.take(table_VD, jnp.asarray(ids_P), axis=0)
  flat = dict(partition.items(state.params))
  flat[prompt_path] = jax.device_put(prompt_PD.astype(flat[prompt_path].dtype),
                                     flat[prompt_path].sharding)
  return state.replace(params=partition.nest(flat))


def _prompt_ids(exp: Experiment, data, vocab_size: int) -> np.ndarray:
  """P token ids whose embeddings start the prompt: random tokens, or the label words repeated
  (Lester et al. 2021 found both far better than a random init)."""
  length = exp.finetune.prompt_length
  if exp.finetune.prompt_init == "vocab":
    return np.random.default_rng(exp.train.seed).integers(0, vocab_size, length)
  names = (data.info or {}).get("label_names")
  if not names:
    raise ConfigError("config.finetune.prompt_init='labels' needs a task with label names "
                      f"(config.task.name={exp.task.name!r} has none)")
  words = data.tokenizer.encode_batch([" " + n for n in names], add_special_tokens=False)
  return np.resize(np.concatenate(words).astype(np.int64), length)


def params_report(exp: Experiment, state, base: dict | None) -> dict:
  """params.json: how many parameters train, how many are frozen, the optimizer state's size."""
  trainable, frozen = partition.count(state.params), partition.count(state.frozen)
  report = {"total": trainable + frozen, "trainable": trainable, "frozen": frozen,
            "optimizer_state_bytes": partition.nbytes(state.opt_state),
            "method": exp.finetune.method}
  if exp.model.n_experts:  # a token reaches k of the E experts: the count FLOPs see
    shapes = dict(treepaths.items(state.params)) | dict(treepaths.items(state.frozen))
    report["active"] = flops.active_params(exp.model, shapes)
    print(f"params: {report['active']:,} active per token of {report['total']:,} (mixture of "
          f"experts, {exp.model.experts_per_token} of {exp.model.n_experts})", file=sys.stderr)
  if base is not None:
    report["base"] = base
  print(f"params: {report['total']:,} total, {trainable:,} trainable "
        f"({100 * trainable / max(report['total'], 1):.2f}%), {frozen:,} frozen; optimizer "
        f"state {report['optimizer_state_bytes']:,} bytes", file=sys.stderr)
  return report


def sparsity_record(exp: Experiment, params) -> dict:
  """params.json's "sparsity": {"overall": zeros over every pruned weight, "layers": per path}."""
  metrics = prune.sparsity(exp.prune, params)
  return {"overall": metrics.pop(prune.SPARSITY),
          "layers": {k.split("/", 1)[1]: v for k, v in metrics.items()}}


def record_sparsity(workdir: str, exp: Experiment, params) -> None:
  """params.json with the sparsity the run reached (a pruned run's end; nothing otherwise)."""
  if not exp.prune.on:
    return
  path = os.path.join(workdir, PARAMS_FILE)
  with open(path) as f:
    report = json.load(f)
  report["sparsity"] = sparsity_record(exp, params)
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)
