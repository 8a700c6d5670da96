"""load / save / load_params: Hugging Face directories <-> (llmjax model, params).

Models with state besides their parameters (a ResNet's BatchNorm statistics, "batch_stats") load
with `with_model_state=True` as (model, params, model_state) and save with `model_state=`;
`model.apply({"params": params, **model_state}, ...)` runs them. Loading one without asking for
its state is an error rather than a model whose statistics are silently fresh.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from llmjax import distributed
from llmjax.config import ModelConfig
from llmjax.errors import capped
from llmjax.hf import (bart, bert, experts, files, gemma, gpt2, llama, mapping, marian,
                       mistral, moe, qwen, resnet)
from llmjax.hf.arch import IMAGE_FIELDS, RUNTIME_FIELDS, Architecture, canonical
from llmjax.hf.errors import HFError, UnsupportedModelError, WeightsMismatchError
from llmjax.models import presets, quant_tree
from llmjax.parallel import sharding

# Order matters when saving: the first architecture that expresses a model exactly is used.
ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    gpt2.ARCH, llama.ARCH, bert.ARCH, marian.ARCH, bart.ARCH, resnet.ARCH, gemma.GEMMA,
    gemma.GEMMA2, gemma.GEMMA3, mistral.ARCH, qwen.QWEN2, qwen.QWEN3, moe.MIXTRAL,
    moe.QWEN2_MOE, moe.QWEN3_MOE)}


# HF config classes default to their original vocabulary's ids (GPT-2: 50256); ours are unknown.
_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _hf_config(path: str, architecture: str | None):
  """(Architecture, HF class name, transformers config object) of a directory."""
  import transformers  # configs only: no modelling code, no remote code
  raw = files.read_config(path)
  model_type = raw.get("model_type")
  if model_type not in ARCHITECTURES:
    raise UnsupportedModelError(f"{path}/config.json: model_type {model_type!r} is not supported;"
                                f" supported: {', '.join(ARCHITECTURES)}")
  arch = ARCHITECTURES[model_type]
  name = architecture or (raw.get("architectures") or [next(iter(arch.classes))])[0]
  if name not in arch.classes:
    raise UnsupportedModelError(f"{path}: architecture {name!r} is not supported; supported for "
                                f"{model_type}: {', '.join(arch.classes)}")
  from huggingface_hub.errors import StrictDataclassError  # what strict HF configs raise
  try:
    return arch, name, getattr(transformers, arch.config_class).from_dict(raw)
  except (TypeError, ValueError, StrictDataclassError) as e:  # HF validates some fields itself
    raise UnsupportedModelError(f"{path}/config.json: {' '.join(str(e).split())[:300]}") from e


def model_config(path: str, *, dtype: str = "float32", scan_layers: bool = False,
                 architecture: str | None = None) -> ModelConfig:
  """The llmjax ModelConfig of a HF directory (e.g. to build an experiment's model section)."""
  arch, _, hf = _hf_config(path, architecture)
  return _config(arch, hf, dtype, scan_layers)


def decided_model_fields(path: str) -> dict:
  """The ModelConfig fields a HF directory's config decides, with their values (a ResNet's
  says nothing of d_model; a Transformer's nothing of image fields)."""
  arch, _, hf = _hf_config(path, None)
  cfg = dataclasses.asdict(_config(arch, hf, "float32", False))
  fields = arch.config_fields or [f.name for f in dataclasses.fields(ModelConfig)
                                  if f.name not in RUNTIME_FIELDS + IMAGE_FIELDS]
  return {name: cfg[name] for name in fields}


def _config(arch: Architecture, hf, dtype: str, scan_layers: bool) -> ModelConfig:
  if dtype not in ("float32", "bfloat16", "float16"):
    raise HFError(f"dtype={dtype!r}: allowed float32, bfloat16, float16")
  base = ModelConfig(**presets.get(arch.preset))
  cfg = dataclasses.replace(base, **arch.from_hf(hf), dtype=dtype, param_dtype=dtype,
                            scan_layers=scan_layers)
  if scan_layers and len(set(cfg.moe_layers())) > 1:  # one scanned body: every layer alike
    raise HFError(f"scan_layers=True needs every layer alike, but this {arch.model_type} mixes "
                  f"dense and sparse MLP layers (dense: {cfg.mlp_only_layers or 'by step'}, "
                  f"decoder_sparse_step={cfg.decoder_sparse_step}); load with scan_layers=False")
  return cfg


def build(path: str, *, dtype: str = "float32", scan_layers: bool = False,
          architecture: str | None = None) -> nn.Module:
  """The llmjax model (Transformer or a BERT head) a HF directory describes, without weights."""
  return _build(path, dtype, scan_layers, architecture)[1]


def _build(path, dtype, scan_layers, architecture) -> tuple[Architecture, nn.Module]:
  arch, name, hf = _hf_config(path, architecture)
  return arch, arch.classes[name](_config(arch, hf, dtype, scan_layers), hf)


def abstract_variables(model: nn.Module) -> dict:
  """Every collection's shapes ("params", and "batch_stats" for a ResNet) with their
  logical-axis boxes, allocating nothing. Image models trace their own example input."""
  example = getattr(model, "example_input", None)
  inputs = example() if example else jnp.zeros((1, min(8, model.cfg.max_len)), jnp.int32)
  args = inputs if isinstance(inputs, tuple) else (inputs,)  # an encoder-decoder takes two
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, deterministic=True))


def _kept_abstract(model: nn.Module) -> dict:
  """abstract_variables(model), traced once per model (models equal field by field share it): a
  load, a save and the checks around them ask for one model's shapes several times, and each
  trace costs about what the model's init does. abstract_variables itself traces afresh
  (quant_tree.layouts reads the modules a trace runs)."""
  try:
    return dict(_abstract_of(model))
  except TypeError:  # a model with an unhashable field: traced every time
    return abstract_variables(model)


@functools.lru_cache(maxsize=8)
def _abstract_of(model: nn.Module) -> dict:
  return abstract_variables(model)


def quantized_model(model: nn.Module, spec: str):
  """(the model storing its kernels as `spec` (config.model.quant) says, {module path: Layout});
  ConfigError naming the layer and sizes where a group does not divide a kernel's input."""
  qmodel = model.clone(cfg=dataclasses.replace(model.cfg, quant=spec))
  return qmodel, quant_tree.layouts(lambda: abstract_variables(qmodel))


def abstract_params(model: nn.Module):
  """Parameter shapes with their logical-axis boxes, allocating nothing."""
  return _kept_abstract(model)["params"]


def _state_names(abstract: dict) -> list[str]:
  return sorted(set(abstract) - {"params"})


def load(path: str, dtype: str = "float32", *, architecture: str | None = None,
         scan_layers: bool = False, mesh: Mesh | None = None, rules="dp",
         with_model_state: bool = False):
  """(model, params) from a HF directory; with `mesh`, each parameter goes straight to its shards.

  `rules` is a preset name of llmjax.parallel.sharding.RULES or a logical->mesh rules tuple.
  `with_model_state`: (model, params, model_state), model_state the collections besides params
  ({"batch_stats": ...} for a ResNet, {} for the others; float32 whatever `dtype`). A model that
  has such state must be loaded with it: HFError otherwise.
  """
  arch, model = _build(path, dtype, scan_layers, architecture)
  boxed = _kept_abstract(model)
  state = _state_names(boxed)
  if state and not with_model_state:
    raise HFError(f"{path}: this {type(model).__name__} keeps {', '.join(state)} (BatchNorm "
                  "statistics) besides its parameters; load it with hf.load(path, "
                  "with_model_state=True) -> (model, params, model_state)")
  shardings = None
  if mesh is not None:
    rules = sharding.rules_for(rules) if isinstance(rules, str) else rules
    with nn.logical_axis_rules(rules):
      shardings = sharding.logical_shardings(boxed, mesh, rules)
  variables = _read(path, arch, model, nn.unbox(boxed), shardings)
  params = variables.pop("params")
  return (model, params, variables) if with_model_state else (model, params)


def load_params(path: str, abstract, shardings=None, *, architecture: str | None = None):
  """HF weights placed into a given abstract params tree (e.g. a training state's), one by one.

  Scanned or unrolled layers follow `abstract`; dtypes are `abstract`'s. Raises
  WeightsMismatchError naming every path whose presence or shape differs from the checkpoint's.
  """
  flat = mapping.flatten(abstract)
  scanned = any("layers" in p.split("/") for p in flat)
  arch, model = _build(path, "float32", scanned, architecture)
  problems = mapping.tree_problems(_shapes(flat), _shapes(abstract_flat(model)), "the checkpoint")
  if problems:
    raise WeightsMismatchError(f"hf:{path} does not match the model's parameters: "
                               + capped(problems, sep="; "))
  return _read(path, arch, model, {"params": abstract},
               None if shardings is None else {"params": shardings})["params"]


def load_model_state(path: str, abstract_state: dict, shardings: dict | None = None, *,
                     architecture: str | None = None) -> dict:
  """HF tensors that are not parameters (a ResNet's BatchNorm statistics) placed into a given
  abstract {collection: tree} (e.g. a training state's model_state), as load_params does."""
  arch, model = _build(path, "float32", False, architecture)
  want = {c: _shapes(mapping.flatten(t)) for c, t in nn.unbox(_kept_abstract(model)).items()
          if c != "params"}
  have = {c: _shapes(mapping.flatten(t)) for c, t in abstract_state.items()}
  problems = [f"collection {c} is not in the checkpoint" for c in sorted(set(have) - set(want))]
  problems += [f"collection {c} is missing" for c in sorted(set(want) - set(have))]
  for c in sorted(set(want) & set(have)):
    problems += mapping.tree_problems(have[c], want[c], "the checkpoint")
  if problems:
    raise WeightsMismatchError(f"hf:{path} does not match the model's state: "
                               + capped(problems, sep="; "))
  return _read(path, arch, model, abstract_state, shardings)


def _shapes(flat: dict) -> dict[str, tuple]:
  return {p: tuple(a.shape) for p, a in flat.items()}


def abstract_flat(model: nn.Module) -> dict:
  """The model's parameter shapes as a flat {"a/b/c": ShapeDtypeStruct} (no arrays made)."""
  return mapping.flatten(nn.unbox(abstract_params(model)))


def _abstract_state_flat(model: nn.Module) -> dict[str, dict]:
  return {c: mapping.flatten(t) for c, t in nn.unbox(_kept_abstract(model)).items()
          if c != "params"}


def _aliases(arch: Architecture):
  """Names a tensor may have on disk: with or without the base prefix, old gamma/beta norms."""
  def aliases(key: str) -> list[str]:
    names = [key, key[len(arch.prefix):] if key.startswith(arch.prefix) else arch.prefix + key]
    legacy = [re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                     re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", n)) for n in names]
    return names + [n for n in legacy if n not in names]
  return aliases


def _read(path: str, arch: Architecture, model: nn.Module, abstract: dict, shardings):
  """{collection: tree} for the collections of `abstract` ({collection: abstract tree});
  every tensor of the file is checked, whichever collections are read."""
  index = files.WeightIndex(path)
  if arch.experts_scheme:  # per-expert tensors on disk, fused ones in the table
    index = experts.DiskView(index, arch.experts_scheme)
  tensors, scanned = arch.tensors(model), model.cfg.scan_layers
  available = {k: e.shape for k, e in index.entries.items()}
  found = mapping.resolve_keys(tensors, available, _aliases(arch), arch.ignored(model), path)
  _check_copies(path, arch, model, index, found)
  out = {}
  for collection, tree in abstract.items():
    mine, flat = mapping.of_collection(tensors, collection), mapping.flatten(tree)
    mapping.check_model_paths(mine, flat, scanned)
    placement = mapping.flatten(shardings[collection]) if shardings is not None else {}
    out[collection] = mapping.place(mine, lambda key: index.read(found[key]), flat, scanned,
                                    lambda dest, x, where=placement: _put(x, where.get(dest)))
  return out


def _check_copies(path: str, arch: Architecture, model: nn.Module, index: files.WeightIndex,
                  found: dict[str, str]) -> None:
  """Each copy of a tensor the file holds (ignored when resolving keys) equals the tensor llmjax
  reads: transformers would use a differing one as a parameter of its own."""
  aliases = _aliases(arch)
  for copy, source in arch.copies(model).items():
    key = next((k for k in aliases(copy) if k in index.entries), None)
    if key is not None and not np.array_equal(index.read(key), index.read(found[source])):
      raise UnsupportedModelError(
          f"{path}: {key} differs from {found[source]}; separate tables are not supported (this "
          f"{type(model).__name__} has one, transformers would use both)")


def _put(x, where):
  """Only this process's shards leave the host (the same file is read on every process)."""
  if where is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def arch_of(model: nn.Module) -> Architecture:
  """The architecture that can express `model` exactly, or UnsupportedModelError saying why not."""
  why = []
  for arch in ARCHITECTURES.values():
    name = arch.class_of(model)
    if name is None:
      continue
    mismatch = _mismatch(arch, model.cfg)
    if not mismatch:
      return arch
    why.append(f"as {name}: {mismatch}")
  raise UnsupportedModelError(f"no Hugging Face architecture expresses this {type(model).__name__}"
                              + (f" ({'; '.join(why)})" if why else ""))


def _mismatch(arch: Architecture, cfg: ModelConfig) -> str:
  """'' if cfg -> HF config -> cfg is lossless, else the fields HF cannot express."""
  import transformers  # heavy: only when a model meets Hugging Face
  try:
    hf = getattr(transformers, arch.config_class)(**arch.to_hf(cfg), **_NO_SPECIAL_TOKENS)
    back = _config(arch, hf, cfg.dtype, cfg.scan_layers)
  except UnsupportedModelError as e:
    return str(e)
  except (TypeError, ValueError) as e:  # the HF config class rejects a value outright
    return " ".join(str(e).split())[:200]
  def norm(c):
    return dataclasses.replace(canonical(c), n_kv_heads=c.kv_heads, head_dim=c.dim_per_head,
                               rope_theta=c.rope_theta if c.pos_emb == "rope" else 0.0,
                               n_decoder_layers=c.n_decoder_layers or c.n_layers,
                               n_decoder_heads=c.n_decoder_heads or c.n_heads,
                               d_ff_decoder=c.d_ff_decoder or c.d_ff,
                               query_pre_attn_scalar=c.query_pre_attn_scalar or c.dim_per_head)
  a, b = norm(cfg), norm(back)
  fields = arch.config_fields or [f.name for f in dataclasses.fields(ModelConfig)
                                  if f.name not in RUNTIME_FIELDS + IMAGE_FIELDS]
  diff = [name for name in fields if getattr(a, name) != getattr(b, name)]
  return ", ".join(f"needs {k}={getattr(b, k)!r}, model has {getattr(a, k)!r}" for k in diff)


def save(model: nn.Module, params, path: str, *, config_overrides: dict | None = None,
         model_state: dict | None = None) -> None:
  """Write `path`/config.json + model.safetensors that transformers' from_pretrained loads.

  `config_overrides` adds HF config fields llmjax does not track (bos/eos/pad token ids, labels).
  `model_state`: the collections besides params (a ResNet's {"batch_stats": ...}), required
  exactly when the model has them; torch's num_batches_tracked is written as 0.
  In a multi-process run every process calls it (the parameters are gathered) and process 0
  writes.
  """
  import transformers  # heavy: only when a model meets Hugging Face
  added = _peft_parameters(getattr(model, "peft", None))
  if added:
    raise UnsupportedModelError(
        f"the model has {'; '.join(added)}: a Hugging Face model directory has no place for them "
        "and would drop them; use `llmjax export --out=hf:PATH` (LoRA: a PEFT adapter, or the "
        "merged model with --merge; prompt tuning: PEFT prompt embeddings)")
  arch = arch_of(model)
  flat = mapping.flatten(distributed.to_host(nn.unbox(params)))
  problems = mapping.tree_problems(_shapes(abstract_flat(model)), _shapes(flat), "params")
  if problems:
    raise WeightsMismatchError("params do not match the model: " + capped(problems, sep="; "))
  state_flat = _state_to_host(model, model_state)
  fields = dict(arch.to_hf(model.cfg), architectures=[arch.class_of(model)],
                dtype=model.cfg.param_dtype, **_NO_SPECIAL_TOKENS)
  fields.update(arch.module_fields(model))
  fields.update(config_overrides or {})
  config = getattr(transformers, arch.config_class)(**fields).to_dict()
  if jax.process_index() != 0:
    return
  try:
    tensors = mapping.collect(arch.tensors(model), flat, model.cfg.scan_layers, state_flat)
    tensors.update({copy: tensors[source]
                    for copy, source in arch.written_copies(model).items()})
    if arch.experts_scheme:  # the per-expert layout transformers' save_pretrained writes
      tensors = experts.to_disk(tensors, arch.experts_scheme)
    files.write(path, tensors, config)
  except OSError as e:
    raise HFError(f"cannot write {path}: {e}") from e


def _state_to_host(model: nn.Module, model_state: dict | None) -> dict[str, dict]:
  """{collection: flat host arrays} of `model_state`, checked against the model's own state."""
  want = {c: _shapes(flat) for c, flat in _abstract_state_flat(model).items()}
  given = dict(model_state or {})
  if set(given) != set(want):
    raise HFError(f"this {type(model).__name__} has model state {sorted(want) or 'none'} but "
                  f"model_state= has {sorted(given) or 'none'}"
                  + ("; pass the model_state hf.load(..., with_model_state=True) or training "
                     "returned" if want else ""))
  out = {c: mapping.flatten(distributed.to_host(nn.unbox(t))) for c, t in given.items()}
  problems = [p for c in sorted(want) for p in mapping.tree_problems(
      want[c], _shapes(out[c]), f"model_state[{c!r}]")]
  if problems:
    raise WeightsMismatchError("model_state does not match the model: "
                               + capped(problems, sep="; "))
  return out


def _peft_parameters(peft) -> list[str]:
  """The fine-tuning parameters `peft` (a models.peft.Peft, or None) adds, by method."""
  if peft is None:
    return []
  added = [f"{name} ({field}={getattr(peft, field)})"
           for name, field in (("prompt tuning", "prompt_length"),
                               ("prefix tuning", "prefix_length"),
                               ("bottleneck adapters", "adapter_dim"))
           if getattr(peft, field) > 0]
  if peft.lora_rank > 0 and peft.lora_targets:
    added.append(f"{'AdaLoRA' if peft.adalora else 'LoRA'} factors (lora_rank={peft.lora_rank}, "
                 f"lora_targets={peft.lora_targets!r})")
  return added
