"""PEFT export: an llmjax model's LoRA / AdaLoRA factors or tuned prompt -> a PEFT adapter."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from flax import linen as nn

from llmjax.hf import mapping, peft_experts
from llmjax.hf.files import save_safetensors
from llmjax.hf.mapping import Tensor
from llmjax.hf.peft_layout import (CONFIG, PREFIX, WEIGHTS, AdapterError, Site, arch_tables,
                                   lora_sites, unscanned)
from llmjax.models import heads
from llmjax.models.peft import Peft

TASK_TYPES = {"GPT2LMHeadModel": "CAUSAL_LM", "LlamaForCausalLM": "CAUSAL_LM",
              "MistralForCausalLM": "CAUSAL_LM", "Qwen2ForCausalLM": "CAUSAL_LM",
              "Qwen3ForCausalLM": "CAUSAL_LM", "GemmaForCausalLM": "CAUSAL_LM",
              "MixtralForCausalLM": "CAUSAL_LM", "Qwen2MoeForCausalLM": "CAUSAL_LM",
              "Qwen3MoeForCausalLM": "CAUSAL_LM",
              "Gemma2ForCausalLM": "CAUSAL_LM", "Gemma3ForCausalLM": "CAUSAL_LM",
              "BertForSequenceClassification": "SEQ_CLS", "BertModel": "FEATURE_EXTRACTION",
              "BertForMaskedLM": None, "BertForPreTraining": None}


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


def _factors(flat, module: str, scanned: bool):
  """(a [in, r], b [r, out]) of one unscanned module with e folded in and zero-e triplets gone."""
  a = np.asarray(unscanned(flat, module + "/lora/a", scanned), np.float32)
  b = np.asarray(unscanned(flat, module + "/lora/b", scanned), np.float32)
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1)
  e = unscanned(flat, module + "/lora/e", scanned)
  if e is not None:
    e = np.asarray(e, np.float32)
    keep = np.flatnonzero(e)
    a, b = a[:, keep] * e[keep], b[keep]
  return a, b


def _export_site(site: Site, flat, scanned: bool) -> tuple[np.ndarray, np.ndarray]:
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
  arch, base, tensors = arch_tables(model)
  flat, scanned = mapping.flatten(nn.unbox(params)), model.cfg.scan_layers
  sites = lora_sites(tensors, flat, scanned)
  experts = peft_experts.sites(tensors, flat, scanned) if arch.experts_scheme else []
  saved = _saved_modules(model, tensors, _scanned_names(modules_to_save, scanned,
                                                        model.cfg.n_layers))
  _check_expressible(model, tensors, sites, saved, bool(experts))
  weights, ranks, params = {}, {}, set()  # params: HF parameters PEFT targets as parameters
  for site in sites:
    A, B = _export_site(site, flat, scanned)
    weights[f"{PREFIX}{site.module}.lora_A.weight"] = A
    weights[f"{PREFIX}{site.module}.lora_B.weight"] = B
    router = arch.experts_scheme and site.module.endswith(peft_experts.ROUTER)
    ranks[site.module + ".weight" if router else site.module] = A.shape[0]
    if router:
      params.add(site.module + ".weight")
  where = peft_experts.weight_keys(experts)
  for site in experts:
    A, B = peft_experts.export(site, flat, scanned)
    weights[f"{PREFIX}{where[site.key]}.lora_A.weight"] = A
    weights[f"{PREFIX}{where[site.key]}.lora_B.weight"] = B
    ranks[site.key] = A.shape[0] // unscanned(flat, site.parts[0], scanned).shape[0]  # E*R / E
    params.add(site.key)
  for t in tensors:
    if t.hf_key.rsplit(".", 1)[0] in saved:
      weights[PREFIX + t.hf_key] = mapping.collect([t], flat, scanned)[t.hf_key]
  all_modules = _modules(tensors)
  config = {"peft_type": "LORA", "task_type": TASK_TYPES.get(arch.class_of(base)),
            "base_model_name_or_path": base_model_path or None, **_ranks(peft, ranks),
            "target_modules": _short_names(set(ranks) - params, all_modules),
            "fan_in_fan_out": bool(sites) and sites[0].layout.conv1d, "bias": "none",
            "lora_dropout": peft.lora_dropout, "init_lora_weights": True, "use_dora": False,
            "modules_to_save": _short_names(saved, all_modules) or None, "inference_mode": True}
  if params:
    config["target_parameters"] = _short_names(params, {t.hf_key for t in tensors})
  _write(out_dir, weights, config)


def _check_expressible(model, tensors, sites, saved, experts: bool = False) -> None:
  if not sites and not experts:
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
  arch, base, _ = arch_tables(model)
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
    save_safetensors({k: np.ascontiguousarray(v) for k, v in weights.items()},
                     os.path.join(out_dir, WEIGHTS + ".tmp"))
    with open(os.path.join(out_dir, CONFIG + ".tmp"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    for name in (WEIGHTS, CONFIG):
      os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
  except OSError as e:
    raise AdapterError(f"cannot write {out_dir}: {e}") from e
