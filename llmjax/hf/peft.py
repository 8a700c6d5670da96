"""Hugging Face PEFT adapters <-> llmjax: LoRA / AdaLoRA factors, and tuned prompts.

  save_adapter(model, params, peft, dir)   LoRA / AdaLoRA -> adapter_config.json + safetensors
  save_prompt(model, params, dir)          a decoder's tuned prompt -> PROMPT_TUNING
  load_adapter(dir, model, base_params)    a PEFT LoRA adapter -> the model's full params
  load(dir) -> (model, params)             the adapter over its base_model_name_or_path

A LoRA pair factorises its projection's kernel, so its PEFT names and orientation come from the
architecture's own tensor table (llmjax/hf/<arch>.py), never from a second map: the table's
`to_hf`, run on an array of kernel indices, shows which HF weight axis is the input, where each
input and output entry lands, and (GPT-2's fused c_attn) which part of the HF module each output
row belongs to. PEFT's `lora_A.weight` is then [R, in] and `lora_B.weight` [out, R] with
delta = scale * B A (transposed into a Conv1D's [in, out] by PEFT itself: fan_in_fan_out).

- Fused c_attn: the targeted parts' LoRAs become one of rank (parts x r), A stacked, B block
  structured (zero rows for untargeted parts); read back, a rank-r c_attn LoRA becomes q, k, v
  LoRAs sharing A. Exact both ways.
- A module whose rank differs from config r (fused, AdaLoRA) gets rank_pattern / alpha_pattern
  entries chosen so that PEFT's alpha/r (or alpha/sqrt(r)) equals llmjax's scale; on import,
  PEFT's per-module scale over llmjax's is folded into b.
- AdaLoRA exports as plain LoRA: e folded into A, only the nonzero-e triplets kept; a module with
  none left keeps rank 1 with zero factors (so target_modules stays the run's).
- modules_to_save (trained heads: BERT's classifier, a fresh pooler) are saved whole, under PEFT's
  names `base_model.model.<HF key>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from flax import linen as nn
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax.errors import UserError
from llmjax.hf import api, mapping
from llmjax.hf.mapping import Tensor
from llmjax.models import heads
from llmjax.models.peft import Peft
from llmjax.models.transformer import Transformer

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
TASK_TYPES = {"GPT2LMHeadModel": "CAUSAL_LM", "LlamaForCausalLM": "CAUSAL_LM",
              "BertForSequenceClassification": "SEQ_CLS", "BertModel": "FEATURE_EXTRACTION",
              "BertForMaskedLM": None}


class AdapterError(UserError):
  """A PEFT adapter directory that does not fit the model it is loaded into (or cannot be read)."""


# --- layouts: where a kernel's entries land in its HF weight -------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  conv1d: bool  # HF weight is [in, out] (GPT-2 Conv1D) rather than torch Linear's [out, in]
  in_index: np.ndarray  # HF input index -> flat llmjax input index (C order over the in dims)
  out_part: np.ndarray  # HF output index -> which of the Tensor's paths it belongs to
  out_index: np.ndarray  # HF output index -> flat output index within that part


_LAYOUTS: dict = {}


def _layout(t: Tensor, shapes: tuple[tuple[int, ...], ...]) -> _Layout:
  """Trace t.to_hf on kernel indices (once per transform and shape: layers share one)."""
  cache_key = (t.to_hf.__code__, t.hf_shape, shapes)
  if cache_key not in _LAYOUTS:
    _LAYOUTS[cache_key] = _trace(t, shapes)
  return _LAYOUTS[cache_key]


def _trace(t: Tensor, shapes) -> _Layout:
  if len(t.hf_shape) != 2 or len(set(shapes)) != 1:
    raise AssertionError(f"{t.hf_key}: LoRA needs a 2-d HF weight over equal parts")
  shape, size = shapes[0], math.prod(shapes[0])
  dtype = np.int32 if len(shapes) * size < 2 ** 31 else np.int64
  traced = np.asarray(t.to_hf(*[np.arange(k * size, (k + 1) * size, dtype=dtype).reshape(shape)
                                for k in range(len(shapes))]))
  # Each kernel dim varies along one HF axis (read off the first row and column, verified for
  # every entry below); the input dims lead the kernel, so dim 0's axis is the input axis.
  first = {axis: np.unravel_index(line % size, shape)
           for axis, line in ((1, traced[0]), (0, traced[:, 0]))}
  along = [1 if np.ptp(first[1][j]) else 0 if np.ptp(first[0][j]) else None
           for j in range(len(shape))]
  in_axis = next(a for a in along if a is not None)
  split = next((j for j, a in enumerate(along) if a == 1 - in_axis), len(shape))
  if any(a == in_axis for a in along[split:]):
    raise AssertionError(f"{t.hf_key}: kernel dims {shape} are not [*in, *out] in the HF weight")
  out_size = math.prod(shape[split:])
  ins, outs = (traced[:, 0], traced[0]) if in_axis == 0 else (traced[0], traced[:, 0])
  layout = _Layout(conv1d=in_axis == 0, in_index=(ins % size) // out_size,
                   out_part=outs // size, out_index=outs % size % out_size)
  hf_in = layout.in_index * out_size
  hf_out = layout.out_part * size + layout.out_index
  expected = hf_in[:, None] + hf_out[None] if in_axis == 0 else hf_out[:, None] + hf_in[None]
  if not (expected == traced).all():
    raise AssertionError(f"{t.hf_key}: its transform mixes input and output axes")
  return layout


@dataclasses.dataclass(frozen=True)
class _Site:
  """One HF module carrying LoRA: its Tensor, llmjax module paths (unscanned), which have LoRA."""
  module: str
  tensor: Tensor
  parts: tuple[str, ...]
  lora: tuple[bool, ...]
  layout: _Layout


def _unscanned(flat: dict, path: str, scanned: bool):
  dest, layer = mapping.target(path, scanned)
  if dest not in flat:
    return None
  return flat[dest] if layer is None else flat[dest][layer]


def _sites(tensors: list[Tensor], flat: dict, scanned: bool, every: bool = False) -> list[_Site]:
  """The HF modules with LoRA on some part (`every`: all projections, as if each had LoRA);
  `flat` holds arrays or ShapeDtypeStructs."""
  out = []
  for t in tensors:
    if not all(p.endswith("/kernel") for p in t.paths):
      continue
    parts = tuple(p[:-len("/kernel")] for p in t.paths)
    lora = tuple(every or mapping.target(p + "/lora/a", scanned)[0] in flat for p in parts)
    if any(lora):
      shapes = []
      for p in t.paths:
        dest, layer = mapping.target(p, scanned)
        shapes.append(tuple(flat[dest].shape)[0 if layer is None else 1:])
      out.append(_Site(t.hf_key[:-len(".weight")], t, parts, lora, _layout(t, tuple(shapes))))
  return out


def _modules(tensors: list[Tensor]) -> set[str]:
  return {t.hf_key.rsplit(".", 1)[0] for t in tensors}


def _short_names(chosen: set[str], universe: set[str]) -> list[str]:
  """The shortest dotted suffixes that select exactly `chosen` among `universe` (as PEFT matches
  target_modules: `name == s or name.endswith('.' + s)`, and pattern keys: regex `(.*\\.)?(s)$`)."""
  names = set()
  for module in sorted(chosen):
    parts = module.split(".")
    for k in range(1, len(parts) + 1):
      s = ".".join(parts[-k:])
      hits = {u for u in universe if u == s or u.endswith("." + s)
              or re.match(rf"(.*\.)?({s})$", u)}
      if hits <= chosen:
        break
    names.add(s)
  return sorted(names)


def _arch_tables(model: nn.Module):
  base = model.clone(peft=Peft())
  arch = api._arch_of(base)  # UnsupportedModelError names why, for models HF cannot express
  return arch, base, arch.tensors(base)


# --- export ------------------------------------------------------------------------------------


def _factors(flat, module: str, scanned: bool):
  """(a [in, r], b [r, out]) of one unscanned module with e folded in and zero-e triplets gone."""
  a = np.asarray(_unscanned(flat, module + "/lora/a", scanned), np.float32)
  b = np.asarray(_unscanned(flat, module + "/lora/b", scanned), np.float32)
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
  e = _unscanned(flat, module + "/lora/e", scanned)
  if e is not None:
    e = np.asarray(e, np.float32)
    keep = np.flatnonzero(e)
    a, b = a[:, keep] * e[keep], b[keep]
  return a, b


def _export_site(site: _Site, flat, scanned: bool) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (lora_A [R, in], lora_B [out, R]) of one HF module: targeted parts side by side."""
  lay = site.layout
  factors = [_factors(flat, p, scanned) if on else None for p, on in zip(site.parts, site.lora)]
  rank = sum(f[0].shape[1] for f in factors if f is not None)
  A = np.zeros((max(rank, 1), lay.in_index.size), np.float32)
  B = np.zeros((lay.out_index.size, max(rank, 1)), np.float32)
  start = 0
  for k, f in enumerate(factors):
    if f is None:
      continue
    a, b = f
    r = a.shape[1]
    A[start:start + r] = a[lay.in_index].T
    rows = np.flatnonzero(lay.out_part == k)
    B[rows, start:start + r] = b[:, lay.out_index[rows]].T
    start += r
  return A, B


def _saved_modules(model, tensors, paths) -> set[str]:
  """HF modules saved whole: those holding any of `paths` (unscanned naming), and a classifier,
  which PEFT's SEQ_CLS always wraps."""
  classifier = isinstance(model, heads.SequenceClassifier)
  return {t.hf_key.rsplit(".", 1)[0] for t in tensors
          if any(p in paths for p in t.paths) or (classifier and t.paths[0].startswith("classifier/"))}


def _scanned_names(paths, scanned: bool, n_layers: int) -> set[str]:
  """Parameter paths in the unscanned naming (a scanned `layers/x` stands for every layer)."""
  out = set()
  for p in paths:
    if scanned and re.search(r"(^|/)layers/", p):
      out |= {re.sub(r"(^|/)layers/", rf"\1layer_{i}/", p, count=1) for i in range(n_layers)}
    else:
      out.add(p)
  return out


def save_adapter(model: nn.Module, params, peft: Peft, out_dir: str, *,
                 base_model_path: str = "", modules_to_save=()) -> None:
  """Write `out_dir`/adapter_config.json + adapter_model.safetensors (a PEFT LoRA adapter).

  `params`: every parameter of `model` (built with `peft`); `modules_to_save`: llmjax parameter
  paths (trained heads) whose HF modules are saved whole.
  """
  arch, base, tensors = _arch_tables(model)
  flat, scanned = mapping.flatten(nn.unbox(params)), model.cfg.scan_layers
  sites = _sites(tensors, flat, scanned)
  saved = _saved_modules(model, tensors, _scanned_names(modules_to_save, scanned,
                                                        model.cfg.n_layers))
  _check_expressible(model, tensors, sites, saved)
  weights, ranks = {}, {}
  for site in sites:
    A, B = _export_site(site, flat, scanned)
    weights[f"{PREFIX}{site.module}.lora_A.weight"] = A
    weights[f"{PREFIX}{site.module}.lora_B.weight"] = B
    ranks[site.module] = A.shape[0]
  for t in tensors:
    if t.hf_key.rsplit(".", 1)[0] in saved:
      weights[PREFIX + t.hf_key] = mapping.collect([t], flat, scanned)[t.hf_key]
  all_modules = _modules(tensors)
  config = {"peft_type": "LORA", "task_type": TASK_TYPES.get(arch.class_of(base)),
            "base_model_name_or_path": base_model_path or None, **_ranks(peft, ranks),
            "target_modules": _short_names(set(ranks), all_modules),
            "fan_in_fan_out": sites[0].layout.conv1d, "bias": "none",
            "lora_dropout": peft.lora_dropout, "init_lora_weights": True, "use_dora": False,
            "modules_to_save": _short_names(saved, all_modules) or None, "inference_mode": True}
  _write(out_dir, weights, config)


def _check_expressible(model, tensors, sites, saved) -> None:
  if not sites:
    raise AdapterError("the parameters hold no LoRA factors (no .../lora/a): nothing to export "
                       "as a PEFT LoRA adapter")
  if len({s.layout.conv1d for s in sites}) > 1:
    raise AdapterError("LoRA on both Conv1D and Linear modules cannot be one PEFT config "
                       "(fan_in_fan_out is global)")
  tied = {t.hf_key.rsplit(".", 1)[0] for t in tensors if t.paths[0].endswith("embed/embedding")
          and model.cfg.tie_embeddings and not isinstance(model, heads.SequenceClassifier)}
  if saved & tied:
    raise AdapterError(f"{sorted(saved & tied)[0]} trained with tied embeddings: PEFT's "
                       "modules_to_save copy would untie it from the output layer")
  clash = sorted(saved & {s.module for s in sites})
  if clash:
    raise AdapterError(f"{clash[0]} carries LoRA and is also trained whole; PEFT cannot save a "
                       "LoRA target in modules_to_save")


def _ranks(peft: Peft, ranks: dict[str, int]) -> dict:
  """r, lora_alpha, use_rslora, and patterns for modules of another rank whose alpha keeps
  PEFT's alpha/r (alpha/sqrt(r)) equal to llmjax's one scale."""
  scale, rslora = peft.lora_scale(), peft.rslora and not peft.adalora
  rank_pattern, alpha_pattern = {}, {}
  for rank in sorted(set(ranks.values()) - {peft.lora_rank}):
    for key in _short_names({m for m, x in ranks.items() if x == rank}, set(ranks)):
      rank_pattern[key] = rank
      alpha_pattern[key] = scale * (math.sqrt(rank) if rslora else rank)
  return {"r": peft.lora_rank, "lora_alpha": peft.lora_alpha, "use_rslora": rslora,
          "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def save_prompt(model: nn.Module, params, out_dir: str, *, base_model_path: str = "") -> None:
  """Write a PEFT PROMPT_TUNING adapter (`prompt_embeddings` [P, D]) of a decoder's tuned prompt.

  llmjax's prompt takes positions 0..P-1 and moves the tokens up by P, as PEFT's virtual tokens
  do in a decoder; an encoder's prompt differs from PEFT's (PEFT pools the first virtual token,
  and its virtual tokens attend to the text), so encoders are refused.
  """
  arch, base, _ = _arch_tables(model)
  flat = mapping.flatten(nn.unbox(params))
  if "prompt" not in flat:
    where = "encoder/prompt" in flat
    raise AdapterError("a BERT encoder's tuned prompt computes differently from PEFT's "
                       "PROMPT_TUNING (PEFT pools the first virtual token); exportable: decoders"
                       if where else "the parameters hold no tuned prompt (`prompt`)")
  prompt = np.asarray(flat["prompt"], np.float32)
  cfg = model.cfg
  config = {"peft_type": "PROMPT_TUNING", "task_type": TASK_TYPES.get(arch.class_of(base)),
            "base_model_name_or_path": base_model_path or None,
            "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
            "num_transformer_submodules": 1, "num_attention_heads": cfg.n_heads,
            "num_layers": cfg.n_layers, "prompt_tuning_init": "RANDOM", "inference_mode": True}
  _write(out_dir, {"prompt_embeddings": prompt}, config)


def _write(out_dir: str, weights: dict, config: dict) -> None:
  os.makedirs(out_dir, exist_ok=True)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
              os.path.join(out_dir, WEIGHTS + ".tmp"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG + ".tmp"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    for name in (WEIGHTS, CONFIG):
      os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
  except OSError as e:
    raise AdapterError(f"cannot write {out_dir}: {e}") from e


# --- import ------------------------------------------------------------------------------------


def read_config(adapter_dir: str) -> dict:
  path = os.path.join(adapter_dir, CONFIG)
  if not os.path.isfile(path):
    raise AdapterError(f"{adapter_dir} has no {CONFIG}: not a PEFT adapter directory")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise AdapterError(f"{path} is not readable JSON: {e}") from e


def base_path(adapter_dir: str, config: dict | None = None) -> str:
  """The adapter's base model directory: base_model_name_or_path, relative to the adapter dir."""
  config = read_config(adapter_dir) if config is None else config
  name = config.get("base_model_name_or_path")
  where = os.path.join(adapter_dir, CONFIG)
  if not name:
    raise AdapterError(f"{where}: base_model_name_or_path is not set; the base model is needed")
  path = name if os.path.isabs(name) else os.path.join(adapter_dir, name)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise AdapterError(f"{where}: base_model_name_or_path={name!r} is not a local Hugging Face "
                       f"model directory ({path} has no config.json)")
  return path


def _read_weights(adapter_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(adapter_dir, WEIGHTS)
  if not os.path.isfile(path):
    pickled = os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin"))
    raise AdapterError(f"{adapter_dir} has no {WEIGHTS}" + (
        " (only the pickled adapter_model.bin, which llmjax refuses: safetensors only)"
        if pickled else ""))
  try:
    with safe_open(path, framework="np") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
  except Exception as e:  # safetensors raises its own types for a corrupt header
    raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e


def lora_settings(config: dict, where: str) -> dict:
  """What llmjax supports of a PEFT LoRA config, checked: r, lora_alpha, use_rslora, patterns."""
  if config.get("peft_type") != "LORA":
    raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not LoRA; llmjax "
                       "reads LORA adapters (and writes PROMPT_TUNING)")
  for key, ok in (("use_dora", False), ("lora_bias", False), ("bias", "none")):
    if config.get(key, ok) not in (ok, None):
      raise AdapterError(f"{where}: {key}={config[key]!r} is not supported; supported: {ok!r}")
  return {"r": int(config["r"]), "lora_alpha": float(config["lora_alpha"]),
          "use_rslora": bool(config.get("use_rslora", False)),
          "rank_pattern": config.get("rank_pattern") or {},
          "alpha_pattern": config.get("alpha_pattern") or {}}


def _peft_scale(settings: dict, module: str) -> float:
  """PEFT's scaling of one module (its get_pattern_key: first pattern matching the name's end)."""
  def lookup(pattern: dict, default):
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
    return pattern[key] if key is not None else default
  r = lookup(settings["rank_pattern"], settings["r"])
  alpha = lookup(settings["alpha_pattern"], settings["lora_alpha"])
  return alpha / (math.sqrt(r) if settings["use_rslora"] else r)


def _parts(site: _Site, A, B, ratio: float, rank: int):
  """Per llmjax part of one HF module's LoRA: (a [in, R], b [R, out] with PEFT's scale over
  llmjax's folded in, the columns it uses): all R if R <= rank, else its nonzero ones (a fused
  c_attn written by llmjax: block-structured B)."""
  lay = site.layout
  a = np.zeros((lay.in_index.size, A.shape[0]), np.float32)
  a[lay.in_index] = A.T
  out = []
  for k in range(len(site.parts)):
    rows = np.flatnonzero(lay.out_part == k)
    b = np.zeros((A.shape[0], rows.size), np.float32)
    b[:, lay.out_index[rows]] = B[rows].T * ratio
    used = np.arange(A.shape[0]) if A.shape[0] <= rank else np.flatnonzero(np.abs(b).sum(1))
    out.append((a, b, used))
  return out


def _import_site(site: _Site, A, B, ratio: float, rank: int, where: str):
  """{llmjax module: (a [in, rank], b [rank, out], columns used)} of one HF module's LoRA."""
  out = {}
  for part, on, (a_full, b_full, used) in zip(site.parts, site.lora,
                                              _parts(site, A, B, ratio, rank)):
    if not on:
      if np.any(b_full):
        raise AdapterError(f"{where}: {site.module}'s LoRA changes {part}, which the model's "
                           "lora_targets do not cover (add it to config.finetune.lora_targets)")
      continue
    if used.size > rank:
      raise AdapterError(f"{where}: {site.module} has LoRA rank {used.size} for {part}; the "
                         f"model's lora_rank is {rank}")
    a = np.zeros((a_full.shape[0], rank), np.float32)
    b = np.zeros((rank, b_full.shape[1]), np.float32)
    a[:, :used.size], b[:used.size] = a_full[:, used], b_full[used]
    out[part] = (a, b, used.size)
  return out


def adapter_leaves(adapter_dir: str, model: nn.Module, base_flat: dict | None = None) -> dict:
  """{parameter path: numpy array} of what a PEFT LoRA adapter sets in `model` (built with the
  Peft its LoRA needs): every LoRA leaf, and the modules it saved whole (a scanned stack takes
  its other layers from `base_flat`). Raises AdapterError naming any key that does not fit."""
  where = os.path.join(adapter_dir, WEIGHTS)
  settings = lora_settings(read_config(adapter_dir), os.path.join(adapter_dir, CONFIG))
  weights = _read_weights(adapter_dir)
  _, _, tensors = _arch_tables(model)
  scanned, peft = model.cfg.scan_layers, model.peft
  abstract = api._abstract_flat(model)
  used, factors = set(), {}
  for site in _sites(tensors, abstract, scanned):
    keys = [f"{PREFIX}{site.module}.lora_{x}.weight" for x in "AB"]
    missing = [k for k in keys if k not in weights]
    if missing:
      covered = ", ".join(p for p, on in zip(site.parts, site.lora) if on)
      raise AdapterError(f"{where}: no {missing[0]}; the model has LoRA on {covered} "
                         "(config.finetune.lora_targets), the adapter does not")
    A, B = (weights[k].astype(np.float32) for k in keys)
    n_in, n_out = site.layout.in_index.size, site.layout.out_index.size
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != n_in or B.shape != (n_out, A.shape[0]):
      raise AdapterError(f"{where}: {site.module} lora_A {list(A.shape)} / lora_B "
                         f"{list(B.shape)}, expected [R, {n_in}] / [{n_out}, R]")
    used.update(keys)
    ratio = _peft_scale(settings, site.module) / peft.lora_scale()
    factors.update(_import_site(site, A, B, ratio, peft.lora_rank, where))
  leaves = _stack(factors, abstract, scanned, peft.adalora)
  leaves.update(_saved(weights, used, tensors, abstract, base_flat, scanned, where))
  return {p: x.astype(abstract[p].dtype) for p, x in leaves.items()}


def load_adapter(adapter_dir: str, model: nn.Module, base_params) -> dict:
  """`base_params` (the base's parameters; any LoRA leaves in it are replaced) with a PEFT LoRA
  adapter in place: the full params of `model`. Exact; an AdaLoRA model gets e = 1 on the
  triplets used."""
  flat = {p: x for p, x in mapping.flatten(nn.unbox(base_params)).items() if "/lora/" not in p}
  flat.update(adapter_leaves(adapter_dir, model, flat))
  problems = mapping.tree_problems(_shapes(api._abstract_flat(model)), _shapes(flat),
                                   "the parameters")
  if problems:
    raise AdapterError(f"{adapter_dir}: the base parameters do not fit the model: "
                       + "; ".join(problems))
  return mapping.unflatten(flat)


def _shapes(flat):
  return {p: tuple(x.shape) for p, x in flat.items()}


def _saved(weights, used, tensors, abstract, base_flat, scanned, where) -> dict:
  """modules_to_save tensors (`base_model.model.<HF key>`) as parameters; others are named."""
  by_key, out = {t.hf_key: t for t in tensors}, {}
  for key in sorted(set(weights) - used):
    t = by_key.get(key[len(PREFIX):] if key.startswith(PREFIX) else key)
    if t is None:
      kind = ("LoRA on a module the model has none on: config.finetune.lora_targets does not "
              "cover it, or llmjax has no LoRA there" if ".lora_" in key else
              "a tensor the model has no place for")
      raise AdapterError(f"{where}: unexpected {key} ({kind})")
    if tuple(weights[key].shape) != t.hf_shape:
      raise AdapterError(f"{where}: {key} has shape {list(weights[key].shape)}, expected "
                         f"{list(t.hf_shape)}")
    for path, value in zip(t.paths, t.to_jax(weights[key])):
      dest, layer = mapping.target(path, scanned)
      if layer is None:
        out[dest] = value
        continue
      if dest not in out:
        out[dest] = (np.array(base_flat[dest]) if base_flat and dest in base_flat
                     else np.zeros(abstract[dest].shape, abstract[dest].dtype))
      out[dest][layer] = value
  return out


def _stack(factors: dict, abstract: dict, scanned: bool, adalora: bool) -> dict:
  """{model path: array} of the lora leaves from per-module (a, b, used) in unscanned naming."""
  out: dict = {}
  for module, (a, b, n) in factors.items():
    e = (np.arange(a.shape[1]) < n).astype(np.float32)
    for leaf, value in (("a", a), ("b", b), ("e", e)):
      if leaf == "e" and not adalora:
        continue
      dest, layer = mapping.target(f"{module}/lora/{leaf}", scanned)
      shape = abstract[dest].shape[1:] if layer is not None else abstract[dest].shape
      value = value.reshape(shape)
      if layer is None:
        out[dest] = value
      else:
        out.setdefault(dest, np.zeros(abstract[dest].shape, np.float32))[layer] = value
  return out


def peft_for_adapter(adapter_dir: str, model: nn.Module) -> Peft:
  """The llmjax Peft that holds an adapter over `model` (a base built from its HF directory):
  LoRA on each part its factors change (every part of a module whose B is all zero), the rank
  the widest part needs, the adapter's alpha and rslora (module scales are folded into b)."""
  settings = lora_settings(read_config(adapter_dir), os.path.join(adapter_dir, CONFIG))
  weights = _read_weights(adapter_dir)
  _, base, tensors = _arch_tables(model)
  targets, rank = [], 1
  for site in _sites(tensors, api._abstract_flat(base), base.cfg.scan_layers, every=True):
    key = f"{PREFIX}{site.module}.lora_"
    if key + "A.weight" not in weights or key + "B.weight" not in weights:
      continue
    A, B = weights[key + "A.weight"], weights[key + "B.weight"]
    parts = _parts(site, A.astype(np.float32), B.astype(np.float32), 1.0, settings["r"])
    changed = [np.any(b) for _, b, _ in parts]
    for part, (_, _, used), on in zip(site.parts, parts, changed):
      if on or not any(changed):
        targets.append(part)
        rank = max(rank, used.size)
  if not targets:
    raise AdapterError(f"{os.path.join(adapter_dir, WEIGHTS)} has no lora_A/lora_B weights of a "
                       f"module of {type(base).__name__}")
  return Peft(lora_targets="|".join(re.escape(m) for m in sorted(targets)), lora_rank=rank,
              lora_alpha=settings["lora_alpha"], rslora=settings["use_rslora"])


def load(adapter_dir: str, *, base: str | None = None, dtype: str = "float32"):
  """(model, params) of a PEFT LoRA adapter over its base (base_model_name_or_path, or `base`)."""
  base = base or base_path(adapter_dir)
  model, params = api.load(base, dtype)
  peft = peft_for_adapter(adapter_dir, model)
  model = model.clone(peft=peft)
  return model, load_adapter(adapter_dir, model, params)


def model_like(cfg, shapes: dict[str, tuple]) -> nn.Module | None:
  """The Hugging Face-expressible llmjax module, with the LoRA its parameters hold, whose
  parameter tree is `shapes` ({path: shape}), or None. (LoRA scale: alpha = rank.)"""
  lora = sorted(p[:-len("/lora/a")] for p in shapes if p.endswith("/lora/a"))
  rank = shapes[lora[0] + "/lora/a"][-1] if lora else 0
  peft = Peft(lora_targets="|".join(re.escape(m) for m in lora), lora_rank=rank,
              lora_alpha=float(rank or 16), adalora=any(p.endswith("/lora/e") for p in shapes))
  if "classifier/kernel" in shapes:
    candidates = [heads.SequenceClassifier(cfg, shapes["classifier/kernel"][-1], peft)]
  elif any(p.startswith("encoder/") for p in shapes):
    candidates = [heads.MaskedLM(cfg, peft), heads.Encoder(cfg, True, peft),
                  heads.Encoder(cfg, False, peft)]
  else:
    candidates = [Transformer(cfg, peft)]
  want = {p: tuple(s) for p, s in shapes.items()}
  for model in candidates:
    if _shapes(api._abstract_flat(model)) == want:
      return model
  return None
