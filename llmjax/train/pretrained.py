"""`config.train.init_from`: start training from existing weights, with new heads where asked.

The weights come from one llmjax.weights source (`workdir:PATH[@STEP]`, `export:DIR`, `hf:DIR`,
`peft:ADAPTER_DIR`: a PEFT adapter's base read as `hf:`, its LoRA factors laid over the run's
LoRA parameters). A run started from `workdir:PATH` records the step it started from
(`workdir:PATH@STEP` in config.json and in its checkpoints' base identity), and a fine-tuning run
rebuilds its frozen base from that step on resume, eval and export.

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
import re
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import checkpoint, finetune, weights
from llmjax.config import Experiment, ModelConfig
from llmjax.checkpoint import CheckpointError
from llmjax.errors import ConfigError, UserError, capped
from llmjax.finetune.spec import METHOD_PARAMS
from llmjax.hf.arch import RUNTIME_FIELDS
from llmjax.hf.mapping import flatten, unflatten
from llmjax.models import quant_tree
from llmjax.train import init
from llmjax.weights.base import scanned

# How a run computes, not what it computes: the experiment decides these, never the checkpoint.
# quant: a quantized export loads into a model of the same storage, a float one into QLoRA's base
_NOT_SHAPE = set(RUNTIME_FIELDS) | {"dropout", "quant", "quant_compute"}


INIT_FROM = "config.train.init_from"


def source(spec: str, key: str = INIT_FROM) -> weights.WeightsSource:
  """The weights `spec` (the value of config `key`) names."""
  return weights.parse(spec, key)


def resolve_model(exp: Experiment, pin: bool = False) -> Experiment:
  """`exp` with the model shape of its init_from checkpoint, where the experiment left defaults;
  with `pin` (a run starting now), its init_from also names the exact weights it starts from
  (`workdir:PATH@STEP`), so that the run keeps finding them when their run trains on.

  A shape field the experiment sets to something other than the checkpoint's is a conflict,
  named with both values.
  """
  spec = exp.train.init_from
  if not spec:
    return exp
  weights_from = source(spec)
  weights_from.check_finetune(exp)
  fields, default = weights_from.model_fields(), ModelConfig()
  _check_storage(exp, spec, fields.get("quant") or "")
  taken, conflicts = {}, []
  for field in dataclasses.fields(ModelConfig):
    name = field.name
    if name in _NOT_SHAPE or name not in fields:
      continue
    ours, theirs = getattr(exp.model, name), fields[name]
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
  train = exp.train
  if pin:
    train = dataclasses.replace(train, init_from=weights_from.pinned().spec)
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, **taken), train=train)


def _check_storage(exp: Experiment, spec: str, theirs: str) -> None:
  """init_from's kernels are stored as the run's model stores its base (config.model.quant):
  float weights for a float model or QLoRA's base_quant, the same quantization otherwise."""
  ours, base_quant = exp.model.quant, exp.finetune.base_quant
  if theirs and base_quant:
    raise ConfigError(f"config.finetune.base_quant={base_quant!r} quantizes a float base, but "
                      f"config.train.init_from={spec!r} is quantized already (quant={theirs!r}); "
                      f"set config.model.quant={theirs!r} instead of base_quant to train over "
                      "its stored kernels, or start from the float weights")
  if theirs != ours and not base_quant:
    stored = lambda q: f"quantized ({q!r})" if q else "as floats"
    fix = (f"set config.model.quant={theirs!r} (and a method that freezes the kernels)" if theirs
           else f"set config.finetune.base_quant={ours!r} to quantize them (QLoRA)")
    raise ConfigError(f"config.train.init_from={spec!r} stores its kernels {stored(theirs)}, "
                      f"config.model.quant={ours!r} {stored(ours)}; {fix}")


def check(spec: str, init_new: str, abstract_params) -> None:
  """Before anything is written: init_new matches, and the checkpoint has every other parameter
  in its shape (UserError naming them otherwise); a peft: adapter fits the model's LoRA."""
  flat = flatten(abstract_params)
  new = _matching(init_new, flat)
  weights_from = source(spec)
  if new:
    wanted = {p: a for p, a in flat.items() if p not in new}
    _check(spec, wanted, weights_from.shapes(scanned(flat)), init_new)
  weights_from.check_params(flat)


def load_params(spec: str, init_new: str, fresh_params, shardings):
  """`fresh_params` with every parameter not matching `init_new` replaced by the checkpoint's
  (for peft:, its base's; the adapter comes on top in `initialised`)."""
  weights_from = source(spec)
  fresh = flatten(fresh_params)
  new = _matching(init_new, fresh)
  if not new:  # the whole tree comes from the checkpoint, placed straight into its shards
    return weights_from.load(fresh_params, shardings)
  wanted = {p: a for p, a in fresh.items() if p not in new}
  saved_shapes = weights_from.shapes(scanned(fresh))
  _check(spec, wanted, saved_shapes, init_new)
  loaded = weights_from.load(unflatten(wanted), _subset(shardings, wanted), partial=True)
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


def new_params(exp: Experiment) -> str:
  """Regex of the parameters a checkpoint need not have: `train.init_new`'s heads and what the
  fine-tuning method adds (LoRA factors, adapters, prompt, prefix)."""
  added = METHOD_PARAMS[exp.finetune.method] if exp.finetune.method in (
      "lora", "adalora", "adapter", "prompt", "prefix") else ""
  return "|".join(f"(?:{p})" for p in (exp.train.init_new, added) if p)


def initialised(exp: Experiment, init_variables, tx, mesh, rules, shardings, trainable):
  """A fresh TrainState: the seed's init, overlaid with `init_from`'s weights where asked, then
  split into trainable and frozen parameters (the optimizer state only for the first)."""
  t = exp.train
  state = init.init_state(t.seed, init_variables, tx, mesh, rules, shardings, trainable)
  if not t.init_from:
    return state
  weights_from = source(t.init_from)
  full = finetune.merge(state.params, state.frozen)
  where = finetune.merge(shardings.params, shardings.frozen)
  if exp.finetune.base_quant:  # QLoRA: the float base read, then stored quantized
    loaded = _quantized_base(exp, init_variables, full, where, mesh)
  else:
    loaded = load_params(t.init_from, new_params(exp), full, where)
  params, frozen = finetune.split(weights_from.overlay(exp, loaded, where), trainable)
  model_state = state.model_state
  if model_state:  # running statistics belong to the backbone: they come with it
    model_state = load_model_state(weights_from, model_state, shardings.model_state)
  # The optimizer state placed as the step expects it: tx.init leaves its scalars (counts)
  # uncommitted on one device, which made the first step compile once more on the second call.
  opt_state = jax.device_put(tx.init(params), shardings.opt_state)
  return state.replace(params=params, frozen=frozen, opt_state=opt_state, model_state=model_state)


def _layouts(init_variables) -> dict:
  """The quantized kernels of the run's model (a new function each time: jax caches the trace
  of one it has seen, and the layouts are read while tracing)."""
  key = jax.random.PRNGKey(0)
  return quant_tree.layouts(lambda: jax.eval_shape(lambda rngs: init_variables(rngs),
                                                    {"params": key, "dropout": key}))


def float_base(exp: Experiment, init_variables, abstract):
  """Abstract parameters as init_from must hold them: under base_quant (QLoRA) each stored
  kernel is the float kernel it is quantized from; otherwise `abstract` itself."""
  if not exp.finetune.base_quant:
    return abstract
  return quant_tree.as_float(abstract, _layouts(init_variables),
                             lambda shape: jax.ShapeDtypeStruct(shape, exp.model.param_dtype))


def _quantized_base(exp: Experiment, init_variables, full, where, mesh):
  """`full` with init_from's float weights, its dense kernels quantized as base_quant says
  (read replicated, quantized under jit, placed into the run's shardings)."""
  found = _layouts(init_variables)
  replicated = NamedSharding(mesh, PartitionSpec())
  floats = quant_tree.as_float(full, found, lambda shape: jnp.zeros(shape, exp.model.param_dtype))
  float_where = quant_tree.as_float(where, found, lambda shape: replicated, shapes_of=full)
  loaded = load_params(exp.train.init_from, new_params(exp), floats, float_where)
  return jax.device_put(quant_tree.quantize_tree(loaded, found), where)


def load_model_state(weights_from: weights.WeightsSource, abstract, shardings):
  """The source's non-parameter collections (BatchNorm statistics), in the run's layout."""
  try:
    return weights_from.load_model_state(abstract, shardings)
  except UserError as e:
    raise weights_from.error(f"its model state (BatchNorm statistics): {e}") from e


def base_identity(exp: Experiment, frozen) -> dict:
  """Where the frozen parameters come from and a checksum of them: a resumed run must find the
  same base it was trained on."""
  return {"init_from": exp.train.init_from or f"seed:{exp.train.seed}",
          "sha256": _sha256(checkpoint.checksums(frozen))}


def _sha256(checksums: dict) -> str:
  return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def _pins(exact: str, loose: str) -> bool:
  """Whether init_from `exact` names exactly the weights `loose` names loosely (a run's step)."""
  try:
    return source(exact).pins(source(loose))
  except UserError:  # "seed:N", or no longer a valid spec: pins nothing
    return False


def as_recorded(exp: Experiment, data_state: dict | None) -> Experiment:
  """`exp` with the init_from its checkpoint recorded, where that names exactly what `exp` names
  loosely (`workdir:PATH@STEP` for `workdir:PATH`): a run resumed, evaluated or exported after
  its base trained on keeps the base it started from."""
  recorded = ((data_state or {}).get("base") or {}).get("init_from", "")
  spec = exp.train.init_from
  if not spec or not recorded or not _pins(recorded, spec):
    return exp
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, init_from=recorded))


def with_base(exp: Experiment, state, data_state: dict, init_variables, tx, mesh, rules,
              shardings, trainable):
  """A restored state (trained parameters only) with its frozen base rebuilt the way the run
  first built it, refused when it is not the base the checkpoint was trained on."""
  exp = as_recorded(exp, data_state)
  saved = data_state.get("base")
  frozen = initialised(exp, init_variables, tx, mesh, rules, shardings, trainable).frozen
  found = base_identity(exp, frozen)
  if not same_base(saved, found):
    raise CheckpointError(f"the frozen base weights differ from the ones the checkpoint was "
                          f"trained on (checkpoint: {saved['init_from']}, sha256 "
                          f"{saved['sha256'][:12]}; now: {found['init_from']}, sha256 "
                          f"{found['sha256'][:12]}); {_recovery(exp, saved, frozen)}")
  return state.replace(frozen=frozen)


def same_base(saved: dict | None, found: dict) -> bool:
  """Whether a checkpoint's base identity (None: it has no frozen base) is the one rebuilt now,
  named the same or exactly where the checkpoint named it loosely."""
  if saved is None or saved == found:
    return True
  return saved["sha256"] == found["sha256"] and _pins(found["init_from"], saved["init_from"])


def _recovery(exp: Experiment, saved: dict, frozen) -> str:
  """How to get back the base a checkpoint was trained on: the version of init_from (a step of
  its run) whose saved checksums give the recorded base, where one does."""
  spec = exp.train.init_from
  versions = source(spec).versions() if spec else []
  if not versions:
    return "they come from config.train.init_from, which must be unchanged"
  paths = set(flatten(frozen))
  for version in versions:
    sums = version.saved_checksums() or {}
    if paths <= set(sums) and _sha256({p: sums[p] for p in paths}) == saved["sha256"]:
      return (f"that base is {version.spec}: set config.train.init_from={version.spec!r} (for "
              "eval and export: in the run's config.json)")
  return (f"none of {spec}'s versions holds it now ({', '.join(v.spec for v in versions[:5])}"
          f"{', ...' if len(versions) > 5 else ''}); restore the one this run started from, or "
          "start the run over")
