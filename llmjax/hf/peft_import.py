"""PEFT import: a PEFT LoRA adapter -> an llmjax model's parameters (and the Peft it needs)."""

from __future__ import annotations

import math
import os
import re

import numpy as np
from flax import linen as nn
from safetensors import safe_open

from llmjax.errors import capped
from llmjax.hf import api, files, mapping
from llmjax.hf.peft_layout import (CONFIG, PREFIX, WEIGHTS, AdapterError, Site, arch_tables,
                                   lora_sites)
from llmjax.models import heads
from llmjax.models.peft import Peft
from llmjax.models.transformer import Transformer


def read_config(adapter_dir: str) -> dict:
  return files.read_json(os.path.join(adapter_dir, CONFIG), AdapterError,
                         f"{adapter_dir} has no {CONFIG}: not a PEFT adapter directory")


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
  if config.get("target_parameters"):  # a fused gate_up LoRA has no exact separate wg, wi one
    raise AdapterError(f"{where}: target_parameters={config['target_parameters']} (LoRA on MoE "
                       "experts or routers) cannot be read into llmjax; supported: LoRA on "
                       "target_modules (llmjax writes such adapters, hf.save_adapter)")
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


def _parts(site: Site, A, B, ratio: float, rank: int):
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


def _import_site(site: Site, A, B, ratio: float, rank: int, where: str):
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
  _, _, tensors = arch_tables(model)
  scanned, peft = model.cfg.scan_layers, model.peft
  abstract = api.abstract_flat(model)
  used, factors = set(), {}
  for site in lora_sites(tensors, abstract, scanned):
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
  problems = mapping.tree_problems(_shapes(api.abstract_flat(model)), _shapes(flat),
                                   "the parameters")
  if problems:
    raise AdapterError(f"{adapter_dir}: the base parameters do not fit the model: "
                       + capped(problems, sep="; "))
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
  _, base, tensors = arch_tables(model)
  targets, rank = [], 1
  for site in lora_sites(tensors, api.abstract_flat(base), base.cfg.scan_layers, every=True):
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
    candidates = [heads.MaskedLM(cfg, peft), heads.PreTraining(cfg, peft),
                  heads.Encoder(cfg, True, peft),
                  heads.Encoder(cfg, False, peft)]
  else:
    candidates = [Transformer(cfg, peft)]
  want = {p: tuple(s) for p, s in shapes.items()}
  for model in candidates:
    if _shapes(api.abstract_flat(model)) == want:
      return model
  return None
