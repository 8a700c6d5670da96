"""Mixtral (`MixtralForCausalLM`), Qwen2-MoE (`Qwen2MoeForCausalLM`) and Qwen3-MoE
(`Qwen3MoeForCausalLM`): the Llama-shaped decoders (hf/llama.py's attention and norms) whose MLPs
are mixtures of experts (models/moe.py).

Mixtral: every layer sparse, experts as wide as intermediate_size, top-k renormalised, a sliding
window on every layer or none. Qwen2-MoE: q/k/v biases, a shared expert of
shared_expert_intermediate_size behind a sigmoid gate, no renormalisation unless norm_topk_prob,
dense layers (intermediate_size) by decoder_sparse_step and mlp_only_layers, windows by layer.
Qwen3-MoE: Qwen3's q/k norms, no shared expert, the same layer pattern, one window for all.

Router jitter, the auxiliary-loss weights and the capacity factor are how llmjax trains, not what
the model computes (arch.RUNTIME_FIELDS): loading keeps the run's own, saving writes none of them.
transformers 5 keeps the experts fused (hf/experts.py); the tensor table below names that layout
and files in the per-expert one are read and written through it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.config import ModelConfig
from llmjax.hf import llama, mistral, qwen
from llmjax.hf import mapping as m
from llmjax.hf.arch import DENSE_MOE, require

def _dense_layers(c, n_layers: int) -> str:
  """mlp_only_layers as llmjax writes it: the listed layers that exist, ascending."""
  listed = sorted({int(i) for i in (getattr(c, "mlp_only_layers", None) or [])})
  return ",".join(str(i) for i in listed if 0 <= i < n_layers)


def _routing(c, family: str, n_experts: int) -> dict:
  k = c.num_experts_per_tok
  require(n_experts == 0 or 1 <= k <= n_experts, f"{family} num_experts_per_tok={k} must be in "
          f"[1, {n_experts}] (the number of experts)")
  return dict(n_experts=n_experts, experts_per_token=k if n_experts else 2)


def mixtral_from_hf(c) -> dict:
  require(c.num_local_experts >= 1, f"mixtral num_local_experts={c.num_local_experts} is not "
          "supported; supported: >= 1")
  return {**mistral.from_hf(c), **DENSE_MOE, **_routing(c, "mixtral", c.num_local_experts),
          "norm_topk_prob": True}


def mixtral_to_hf(cfg: ModelConfig) -> dict:
  return dict(mistral.to_hf(cfg), intermediate_size=cfg.expert_d_ff,
              num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token)


def _qwen_moe_fields(c, family: str) -> dict:
  n = c.num_experts or 0
  return dict(DENSE_MOE, **_routing(c, family, n), moe_d_ff=c.moe_intermediate_size if n else 0,
              decoder_sparse_step=int(c.decoder_sparse_step or 1) if n else 1,
              mlp_only_layers=_dense_layers(c, c.num_hidden_layers) if n else "",
              norm_topk_prob=bool(c.norm_topk_prob))


def _qwen_moe_hf(cfg: ModelConfig) -> dict:
  """The sparse layers as the config writes them (a step and a dense list)."""
  listed = sorted({int(t) for t in cfg.mlp_only_layers.split(",") if t.strip()})
  return dict(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
              moe_intermediate_size=cfg.expert_d_ff,
              decoder_sparse_step=max(cfg.decoder_sparse_step, 1), mlp_only_layers=listed,
              norm_topk_prob=cfg.norm_topk_prob)


def qwen2_moe_from_hf(c) -> dict:
  out = {**llama.decoder_fields(c, "qwen2_moe"), **qwen.window_fields(c, "qwen2_moe"),
         "qkv_bias": bool(getattr(c, "qkv_bias", True)), **_qwen_moe_fields(c, "qwen2_moe")}
  shared = c.shared_expert_intermediate_size or 0
  require(shared > 0 or not out["n_experts"], f"qwen2_moe shared_expert_intermediate_size="
          f"{shared} is not supported; supported: > 0 (Qwen2-MoE's shared expert)")
  if out["n_experts"]:
    out.update(n_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
  return out


def qwen2_moe_to_hf(cfg: ModelConfig) -> dict:
  return dict(llama.decoder_hf(cfg), **qwen.window_hf(cfg), **_qwen_moe_hf(cfg),
              qkv_bias=cfg.use_bias or cfg.qkv_bias,
              shared_expert_intermediate_size=cfg.shared_width)


def qwen3_moe_from_hf(c) -> dict:
  window = getattr(c, "sliding_window", None) or 0  # Qwen3-MoE: one window for every layer
  bias = bool(c.attention_bias)
  return {**llama.decoder_fields(c, "qwen3_moe"), "sliding_window": int(window), "qk_norm": True,
          "qkv_bias": bias, "o_bias": bias, **_qwen_moe_fields(c, "qwen3_moe")}


def qwen3_moe_to_hf(cfg: ModelConfig) -> dict:
  return dict(llama.decoder_hf(cfg), **_qwen_moe_hf(cfg),
              use_sliding_window=bool(cfg.sliding_window),
              sliding_window=cfg.sliding_window or None,
              attention_bias=(cfg.use_bias or cfg.qkv_bias) and (cfg.use_bias or cfg.o_bias))


def _sparse_block(cfg: ModelConfig, i: int) -> list[m.Tensor]:
  """Router, fused experts and the shared expert of sparse layer `i` (transformers 5 names)."""
  d, e, f = cfg.d_model, cfg.n_experts, cfg.expert_d_ff
  hf, jx = f"model.layers.{i}.mlp", f"layer_{i}/mlp"
  out = [m.linear(f"{hf}.gate.weight", f"{jx}/router/kernel", e, d),
         m.Tensor(f"{hf}.experts.gate_up_proj", (f"{jx}/experts/wg", f"{jx}/experts/wi"),
                  (e, 2 * f, d), _split_gate_up, _join_gate_up),
         m.Tensor(f"{hf}.experts.down_proj", (f"{jx}/experts/wo",), (e, d, f),
                  lambda w: (w.transpose(0, 2, 1),), lambda k: k.transpose(0, 2, 1))]
  g = cfg.shared_width
  if g:
    out += [m.linear(f"{hf}.shared_expert.gate_proj.weight", f"{jx}/shared/wg/kernel", g, d),
            m.linear(f"{hf}.shared_expert.up_proj.weight", f"{jx}/shared/wi/kernel", g, d),
            m.linear(f"{hf}.shared_expert.down_proj.weight", f"{jx}/shared/wo/kernel", d, g)]
  if g and cfg.shared_expert_gate:
    out.append(m.linear(f"{hf}.shared_expert_gate.weight", f"{jx}/shared_gate/kernel", 1, d))
  return out


def _split_gate_up(w_E2FD):
  """[E, 2F, D] (gate rows, then up rows) -> wg [E, D, F], wi [E, D, F]."""
  gate, up = np.split(w_E2FD, 2, axis=1)
  return gate.transpose(0, 2, 1), up.transpose(0, 2, 1)


def _join_gate_up(wg_EDF, wi_EDF):
  return np.concatenate([wg_EDF.transpose(0, 2, 1), wi_EDF.transpose(0, 2, 1)], axis=1)


def tensors(model) -> list[m.Tensor]:
  """hf/llama.py's table with each sparse layer's MLP replaced by its router and experts."""
  cfg, out = model.cfg, llama.tensors(model)
  for i, sparse in enumerate(cfg.moe_layers()):
    if sparse:
      prefix = f"model.layers.{i}.mlp."
      out = [t for t in out if not t.hf_key.startswith(prefix)] + _sparse_block(cfg, i)
  return out


def _arch(model_type, config_class, cls, from_hf, to_hf, scheme):
  base = llama.causal_lm(model_type, config_class, cls, model_type, from_hf, to_hf)
  return dataclasses.replace(base, tensors=tensors, experts_scheme=scheme)


MIXTRAL = _arch("mixtral", "MixtralConfig", "MixtralForCausalLM", mixtral_from_hf, mixtral_to_hf,
                "mixtral")
QWEN2_MOE = _arch("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", qwen2_moe_from_hf,
                  qwen2_moe_to_hf, "qwen")
QWEN3_MOE = _arch("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", qwen3_moe_from_hf,
                  qwen3_moe_to_hf, "qwen")
