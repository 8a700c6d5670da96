"""`config.train.init_from`: start training from existing weights, with new heads where asked.

`peft:ADAPTER_DIR` (a Hugging Face PEFT LoRA adapter) loads the adapter's base
(`base_model_name_or_path`) as `hf:` does, then its LoRA factors into the run's LoRA parameters.

Every parameter the model and the checkpoint share is loaded; parameters matching
`config.train.init_new` (a regex, full match on `a/b/c` paths) keep their fresh initialisation and
are listed; any other parameter the checkpoint lacks, or has in another shape, is an error naming
it: never a silent fresh init. Checkpoint parameters the model has no place for (the MLM head of
an encoder being fine-tuned as a classifier) are listed and left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys

import jax

from llmjax import checkpoint
from llmjax.config import Experiment, ModelConfig
from llmjax.checkpoint import CheckpointError
from llmjax.errors import ConfigError, UserError, capped
from llmjax.hf.arch import RUNTIME_FIELDS
from llmjax.hf.mapping import flatten, unflatten

# How a run computes, not what it computes: the experiment decides these, never the checkpoint.
_NOT_SHAPE = set(RUNTIME_FIELDS) | {"dropout"}


INIT_FROM = "config.train.init_from"


def _split(spec: str, key: str = INIT_FROM) -> tuple[str, str]:
  kind, _, path = spec.partition(":")
  if not path:
    raise UserError(f"{key}={spec!r} has no path after '{kind}:'")
  if kind not in ("hf", "export", "workdir", "peft"):
    raise UserError(f"{key}={spec!r}: allowed hf:PATH, export:PATH, workdir:PATH, "
                    "peft:ADAPTER_DIR")
  return kind, path


def weights_source(spec: str, key: str = INIT_FROM) -> tuple[str, str]:
  """(kind, path) of the weights `spec` (the value of config `key`) names: a PEFT adapter's
  base is read as hf:."""
  kind, path = _split(spec, key)
  if kind == "peft":
    from llmjax.hf import peft as hfpeft
    try:
      return "hf", hfpeft.base_path(path)
    except UserError as e:
      raise UserError(f"{key}={spec!r}: {e}") from e
  return kind, path


def source_model_config(spec: str, key: str = INIT_FROM) -> dict:
  """The ModelConfig fields of the checkpoint `spec` names (for a HF directory, those its
  architecture decides: a ResNet's config says nothing of d_model)."""
  kind, path = weights_source(spec, key)
  if kind == "hf":
    from llmjax import hf
    return hf.decided_model_fields(path)
  file = os.path.join(path, "model_config.json" if kind == "export" else "config.json")
  if not os.path.isfile(file):
    what = "an llmjax export (no model_config.json)" if kind == "export" else \
        "an llmjax run directory (no config.json)"
    raise UserError(f"{key}={spec!r}: {path} is not {what}")
  with open(file) as f:
    fields = json.load(f)
  return fields if kind == "export" else fields["model"]


def _check_adapter_settings(exp: Experiment) -> None:
  """A peft: adapter's method, r, alpha and rslora must be the run's config.finetune's."""
  from llmjax.hf import peft as hfpeft
  spec, f = exp.train.init_from, exp.finetune
  where = f"config.train.init_from={spec!r}"
  if f.method != "lora":
    raise ConfigError(f"{where} loads LoRA factors: it needs config.finetune.method='lora', "
                      f"not {f.method!r}")
  path = _split(spec)[1]
  settings = hfpeft.lora_settings(hfpeft.read_config(path),
                                  os.path.join(path, hfpeft.CONFIG))
  for theirs, ours in (("r", "lora_rank"), ("lora_alpha", "lora_alpha"),
                       ("use_rslora", "rslora")):
    if settings[theirs] != getattr(f, ours):
      raise ConfigError(f"{where}: the adapter has {theirs}={settings[theirs]!r} but "
                        f"config.finetune.{ours}={getattr(f, ours)!r}; they must be equal")


def resolve_model(exp: Experiment) -> Experiment:
  """`exp` with the model shape of its init_from checkpoint, where the experiment left defaults.

  A shape field the experiment sets to something other than the checkpoint's is a conflict,
  named with both values.
  """
  spec = exp.train.init_from
  if not spec:
    return exp
  if spec.startswith("peft:"):
    _check_adapter_settings(exp)
  source, default = source_model_config(spec), ModelConfig()
  taken, conflicts = {}, []
  for field in dataclasses.fields(ModelConfig):
    name = field.name
    if name in _NOT_SHAPE or name not in source:
      continue
    ours, theirs = getattr(exp.model, name), source[name]
    if ours == theirs:
      continue
    if ours == getattr(default, name):
      taken[name] = theirs
    else:
      conflicts.append(f"config.model.{name}={ours!r} but the checkpoint has {theirs!r}")
  if conflicts:
    raise ConfigError(f"config.train.init_from={spec!r} conflicts with the experiment: "
                      + capped(conflicts, sep="; "))
  if taken:
    print(f"init_from {spec}: model shape from the checkpoint: "
          + ", ".join(f"{k}={v!r}" for k, v in sorted(taken.items())), file=sys.stderr)
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, **taken))


def check(spec: str, init_new: str, abstract_params) -> None:
  """Before anything is written: init_new matches, and the checkpoint has every other parameter
  in its shape (UserError naming them otherwise); a peft: adapter fits the model's LoRA."""
  flat = flatten(abstract_params)
  new = _matching(init_new, flat)
  if new:
    kind, path = weights_source(spec)
    wanted = {p: a for p, a in flat.items() if p not in new}
    _check(spec, wanted, _saved_shapes(kind, path, spec, _scanned(flat)), init_new)
  if spec.startswith("peft:"):
    from llmjax import hf
    _adapter_model(spec, hf.model_config(weights_source(spec)[1], scan_layers=_scanned(flat)), flat)


def _adapter_model(spec: str, cfg: ModelConfig, flat: dict, peft=None):
  """The HF-expressible module whose parameters are `flat`, checked against the adapter."""
  from llmjax.hf import peft as hfpeft
  model = hfpeft.model_like(cfg, {p: tuple(a.shape) for p, a in flat.items()})
  if model is None:
    raise UserError(f"config.train.init_from={spec!r}: the run's model has no Hugging Face "
                    "form (a PEFT adapter needs one: GPT-2, Llama, BERT heads)")
  model = model if peft is None else model.clone(peft=peft)
  try:
    return model, hfpeft.adapter_leaves(_split(spec)[1], model)
  except UserError as e:
    raise UserError(f"config.train.init_from={spec!r}: {e}") from e


def _with_adapter(exp: Experiment, params, shardings):
  """`params` with the peft: adapter's LoRA factors (and saved heads) in place, each put where
  its parameter lives."""
  from llmjax import finetune
  spec = exp.train.init_from
  flat, where = flatten(params), flatten(shardings)
  _, leaves = _adapter_model(spec, exp.model, flat, finetune.peft_for(exp))
  print(f"init_from {spec}: from the adapter: {len(leaves)} parameters "
        f"({sum('/lora/' in p for p in leaves)} LoRA factors)", file=sys.stderr)
  return unflatten({**flat, **{p: jax.device_put(x, where[p]) for p, x in leaves.items()}})


def load_params(spec: str, init_new: str, fresh_params, shardings):
  """`fresh_params` with every parameter not matching `init_new` replaced by the checkpoint's
  (for peft:, its base's; the adapter comes on top in `initialised`)."""
  kind, path = weights_source(spec)
  fresh = flatten(fresh_params)
  new = _matching(init_new, fresh)
  wanted = {p: a for p, a in fresh.items() if p not in new}
  saved_shapes = _saved_shapes(kind, path, spec, _scanned(fresh)) if new else None
  if not new:  # the whole tree comes from the checkpoint, placed straight into its shards
    return _load_all(kind, path, fresh_params, shardings)
  _check(spec, wanted, saved_shapes, init_new)
  loaded = _load_subset(kind, path, unflatten(wanted), _subset(shardings, wanted))
  ignored = sorted(set(saved_shapes) - set(fresh))
  print(f"init_from {spec}: loaded {len(wanted)} parameters; {len(new)} fresh (train.init_new="
        f"{init_new!r}): {capped(sorted(new))}"
        + (f"; not used from the checkpoint: {capped(ignored)}" if ignored else ""),
        file=sys.stderr)
  return unflatten({**fresh, **flatten(loaded)})


def _matching(init_new: str, flat: dict) -> set[str]:
  if not init_new:
    return set()
  try:
    pattern = re.compile(init_new)
  except re.error as e:
    raise ConfigError(f"config.train.init_new={init_new!r} is not a regex: {e}") from e
  new = {p for p in flat if pattern.fullmatch(p)}
  if not new:
    raise ConfigError(f"config.train.init_new={init_new!r} matches no parameter of the model; "
                      f"its parameters include: {capped(sorted(flat), 12)}")
  return new


def _check(spec: str, wanted: dict, saved: dict[str, tuple], init_new: str) -> None:
  missing = [f"{p} {list(a.shape)}" for p, a in sorted(wanted.items()) if p not in saved]
  shaped = [f"{p}: model {list(a.shape)}, checkpoint {list(saved[p])}"
            for p, a in sorted(wanted.items()) if p in saved and tuple(saved[p]) != a.shape]
  problems = ([f"missing in the checkpoint: {m}" for m in missing]
              + [f"shape of {s}" for s in shaped])
  if problems:
    raise UserError(f"config.train.init_from={spec!r}: " + checkpoint.describe(problems)
                    + f" (only parameters matching config.train.init_new={init_new!r} may be "
                    "new)")


def _subset(shardings, wanted: dict):
  flat = flatten(shardings)
  return unflatten({p: flat[p] for p in wanted})


def _workdir_checkpoints(path: str, spec: str, key: str = INIT_FROM) -> str:
  directory = os.path.join(path, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"{key}={spec!r}: no checkpoints/ in that workdir")
  return directory


def _scanned(flat: dict) -> bool:
  return any("layers" in p.split("/") for p in flat)


def _saved_shapes(kind, path, spec, scanned: bool) -> dict[str, tuple]:
  if kind == "workdir":
    return checkpoint.saved_param_shapes(_workdir_checkpoints(path, spec))
  if kind == "export":
    return checkpoint.exported_shapes(path)
  from llmjax import hf
  _, params, _ = hf.load(path, scan_layers=scanned, with_model_state=True)  # model's layout
  return {p: tuple(a.shape) for p, a in flatten(params).items()}


def _load_all(kind, path, abstract, shardings, key: str = INIT_FROM):
  if kind == "hf":
    from llmjax import hf
    return hf.load_params(path, abstract, shardings)
  if kind == "export":
    return checkpoint.load_exported(path, abstract, shardings)[1]
  return checkpoint.restore_params(_workdir_checkpoints(path, kind + ":" + path, key), abstract,
                                   shardings)


def load_all(spec: str, abstract, shardings, key: str = INIT_FROM):
  """Every parameter of `abstract` from the checkpoint `spec` names, verified, each placed
  straight into its sharding."""
  kind, path = weights_source(spec, key)
  return _load_all(kind, path, abstract, shardings, key)


def _load_subset(kind, path, abstract, shardings):
  """Only the parameters in `abstract` (a subtree of the checkpoint's), verified and placed."""
  if kind == "workdir":
    return checkpoint.restore_params(_workdir_checkpoints(path, kind + ":" + path), abstract,
                                     shardings, partial=True)
  if kind == "export":
    return checkpoint.load_exported(path, abstract, shardings, partial=True)[1]
  from llmjax import hf
  _, params, _ = hf.load(path, scan_layers=_scanned(flatten(abstract)), with_model_state=True)
  flat, where = flatten(params), flatten(shardings)
  return unflatten({p: jax.device_put(flat[p].astype(a.dtype), where[p])
                    for p, a in flatten(abstract).items()})


def new_params(exp: Experiment) -> str:
  """Regex of the parameters a checkpoint need not have: `train.init_new`'s heads and what the
  fine-tuning method adds (LoRA factors, adapters, prompt, prefix)."""
  from llmjax.finetune.spec import METHOD_PARAMS
  added = METHOD_PARAMS[exp.finetune.method] if exp.finetune.method in (
      "lora", "adalora", "adapter", "prompt", "prefix") else ""
  return "|".join(f"(?:{p})" for p in (exp.train.init_new, added) if p)


def initialised(exp: Experiment, init_variables, tx, mesh, rules, shardings, trainable):
  """A fresh TrainState: the seed's init, overlaid with `init_from`'s weights where asked, then
  split into trainable and frozen parameters (the optimizer state only for the first)."""
  from llmjax import finetune
  from llmjax.train import init
  t = exp.train
  state = init.init_state(t.seed, init_variables, tx, mesh, rules, shardings, trainable)
  if not t.init_from:
    return state
  full = finetune.merge(state.params, state.frozen)
  where = finetune.merge(shardings.params, shardings.frozen)
  loaded = load_params(t.init_from, new_params(exp), full, where)
  if t.init_from.startswith("peft:"):
    loaded = _with_adapter(exp, loaded, where)
  params, frozen = finetune.split(loaded, trainable)
  model_state = state.model_state
  if model_state:  # running statistics belong to the backbone: they come with it
    model_state = load_model_state(t.init_from, model_state, shardings.model_state)
  return state.replace(params=params, frozen=frozen, opt_state=tx.init(params),
                       model_state=model_state)


def load_model_state(spec: str, abstract, shardings, key: str = INIT_FROM):
  """The checkpoint's non-parameter collections (BatchNorm statistics), in the run's layout."""
  kind, path = weights_source(spec, key)
  try:
    if kind == "workdir":
      return checkpoint.restore_params(_workdir_checkpoints(path, spec, key), abstract,
                                       shardings, field="model_state")
    if kind == "export":
      from llmjax.hf import convert
      state = convert.read_model_state(path, abstract)
      return jax.tree.map(jax.device_put, state, shardings)
    from llmjax import hf
    return hf.load_model_state(path, abstract, shardings)
  except UserError as e:
    raise UserError(f"{key}={spec!r}: its model state (BatchNorm statistics): {e}") from e


def base_identity(exp: Experiment, frozen) -> dict:
  """Where the frozen parameters come from and a checksum of them: a resumed run must find the
  same base it was trained on."""
  payload = json.dumps(checkpoint.checksums(frozen), sort_keys=True).encode()
  return {"init_from": exp.train.init_from or f"seed:{exp.train.seed}",
          "sha256": hashlib.sha256(payload).hexdigest()}


def with_base(exp: Experiment, state, data_state: dict, init_variables, tx, mesh, rules,
              shardings, trainable):
  """A restored state (trained parameters only) with its frozen base rebuilt the way the run
  first built it, refused when it is not the base the checkpoint was trained on."""
  frozen = initialised(exp, init_variables, tx, mesh, rules, shardings, trainable).frozen
  check_base(data_state.get("base"), base_identity(exp, frozen))
  return state.replace(frozen=frozen)


def check_base(saved: dict | None, found: dict) -> None:
  """A resumed or reopened fine-tuning run must rebuild the base it was trained on."""
  if saved is not None and saved != found:
    raise CheckpointError(f"the frozen base weights differ from the ones the checkpoint was "
                          f"trained on (checkpoint: {saved}, now: {found}); they come from "
                          "config.train.init_from, which must be unchanged")
