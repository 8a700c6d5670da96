"""Llama (`LlamaForCausalLM`) and what the Llama-shaped decoders share (hf/qwen.py, mistral.py):
grouped-query attention, RoPE with transformers' scalings (default, linear, dynamic, yarn,
llama3), RMSNorm, SwiGLU, tied or untied, projection biases by switch, q/k norms, windows.

Llama's attention_bias puts a bias on q, k, v and o, its mlp_bias on the MLP: both -> use_bias,
one of them -> qkv_bias + o_bias or mlp_bias.
"""

from __future__ import annotations

import math

from llmjax.config import ModelConfig
from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_GATED, Architecture, gated_activation, require
from llmjax.models.transformer import Transformer

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _yarn_attention_factor(rope: dict, factor: float) -> float:
  """An explicit attention_factor, or DeepSeek's mscale ratio; 0 (derived from factor) else."""
  if rope.get("attention_factor") is not None:
    return float(rope["attention_factor"])
  mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
  if mscale and mscale_all_dim and factor > 1:
    scale = lambda s: 0.1 * s * math.log(factor) + 1.0  # noqa: E731
    return float(scale(mscale) / scale(mscale_all_dim))
  return 0.0


def rope_fields(c, family: str) -> dict:
  """ModelConfig's rope_* fields from a v5 config's rope_parameters; refuses what llmjax lacks."""
  rope = dict(getattr(c, "rope_parameters", None) or {})
  kind = rope.get("rope_type", "default")
  require(kind in ROPE_TYPES, f"{family} rope_parameters.rope_type {kind!r} is not supported; "
          f"supported: {', '.join(ROPE_TYPES)}")
  partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None))
  require(partial in (None, 1, 1.0), f"{family} partial_rotary_factor={partial} is not "
          "supported; supported: 1.0 (rotary over the whole head)")
  out = dict(rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
             rope_scaling="none" if kind == "default" else kind)
  if kind == "default":
    return out
  original = int(rope.get("original_max_position_embeddings") or c.max_position_embeddings)
  factor = rope.get("factor")
  if factor is None and kind == "yarn":  # transformers' default: the context's growth
    factor = c.max_position_embeddings / original
  out.update(rope_factor=float(factor))
  if kind == "llama3":
    out.update(rope_original_max_len=original,
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]))
  if kind == "yarn":
    out.update(rope_original_max_len=original,
               rope_beta_fast=float(rope.get("beta_fast") or 32.0),
               rope_beta_slow=float(rope.get("beta_slow") or 1.0),
               rope_attention_factor=_yarn_attention_factor(rope, float(factor)),
               rope_truncate=bool(rope.get("truncate", True)))
  return out


def rope_parameters(cfg: ModelConfig) -> dict:
  """transformers' rope_parameters of `cfg` (the inverse of rope_fields)."""
  out = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
         "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "none":
    return out
  out["factor"] = cfg.rope_factor
  original = cfg.rope_original_max_len or cfg.max_len
  if cfg.rope_scaling == "llama3":
    out.update(original_max_position_embeddings=original,
               low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor)
  if cfg.rope_scaling == "yarn":
    out.update(original_max_position_embeddings=original, beta_fast=cfg.rope_beta_fast,
               beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
    if cfg.rope_attention_factor:
      out["attention_factor"] = cfg.rope_attention_factor
  return out


def decoder_fields(c, family: str) -> dict:
  """The fields every Llama-shaped decoder's config decides (features off unless set after)."""
  heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
  return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
              n_heads=heads, n_kv_heads=0 if kv == heads else kv,
              head_dim=0 if head_dim * heads == c.hidden_size else head_dim,
              d_ff=c.intermediate_size, max_len=c.max_position_embeddings,
              mlp=gated_activation(c.hidden_act, family), norm_eps=c.rms_norm_eps,
              dropout=c.attention_dropout,
              tie_embeddings=c.tie_word_embeddings, use_bias=False, qkv_bias=False,
              o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=0, layer_pattern="",
              **rope_fields(c, family))


def decoder_hf(cfg: ModelConfig) -> dict:
  """The HF config fields every Llama-shaped decoder writes."""
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
              intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
              rope_parameters=rope_parameters(cfg), rms_norm_eps=cfg.norm_eps,
              attention_dropout=cfg.dropout,
              hidden_act=HF_GATED.get(cfg.mlp, cfg.mlp),
              tie_word_embeddings=cfg.tie_embeddings)


def from_hf(c) -> dict:
  attention, mlp = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
  biases = (dict(use_bias=True) if attention and mlp else
            dict(qkv_bias=attention, o_bias=attention, mlp_bias=mlp))
  return {**decoder_fields(c, "llama"), **biases}


def to_hf(cfg) -> dict:
  qkv, o = cfg.use_bias or cfg.qkv_bias, cfg.use_bias or cfg.o_bias
  return dict(decoder_hf(cfg), attention_bias=qkv and o, mlp_bias=cfg.use_bias or cfg.mlp_bias)


def _biases(cfg: ModelConfig, hf: str, jx: str) -> list[m.Tensor]:
  """q/k/v biases [heads*h] <-> [heads, h]; o and MLP biases are stored as they are."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff
  out = []
  if cfg.use_bias or cfg.qkv_bias:
    out += [m.reshaped(f"{hf}.self_attn.q_proj.bias", f"{jx}/attn/q/bias", (n * h,), (n, h)),
            m.reshaped(f"{hf}.self_attn.k_proj.bias", f"{jx}/attn/k/bias", (k * h,), (k, h)),
            m.reshaped(f"{hf}.self_attn.v_proj.bias", f"{jx}/attn/v/bias", (k * h,), (k, h))]
  if cfg.use_bias or cfg.o_bias:
    out.append(m.same(f"{hf}.self_attn.o_proj.bias", f"{jx}/attn/o/bias", (d,)))
  if cfg.use_bias or cfg.mlp_bias:
    out += [m.same(f"{hf}.mlp.gate_proj.bias", f"{jx}/mlp/wg/bias", (f,)),
            m.same(f"{hf}.mlp.up_proj.bias", f"{jx}/mlp/wi/bias", (f,)),
            m.same(f"{hf}.mlp.down_proj.bias", f"{jx}/mlp/wo/bias", (d,))]
  return out


def _block(cfg: ModelConfig, i: int) -> list[m.Tensor]:
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff
  hf, jx = f"model.layers.{i}", f"layer_{i}"
  out = [m.linear_to_heads(f"{hf}.self_attn.q_proj.weight", f"{jx}/attn/q/kernel", d, n, h),
         m.linear_to_heads(f"{hf}.self_attn.k_proj.weight", f"{jx}/attn/k/kernel", d, k, h),
         m.linear_to_heads(f"{hf}.self_attn.v_proj.weight", f"{jx}/attn/v/kernel", d, k, h),
         m.linear_from_heads(f"{hf}.self_attn.o_proj.weight", f"{jx}/attn/o/kernel", n, h, d),
         m.linear(f"{hf}.mlp.gate_proj.weight", f"{jx}/mlp/wg/kernel", f, d),
         m.linear(f"{hf}.mlp.up_proj.weight", f"{jx}/mlp/wi/kernel", f, d),
         m.linear(f"{hf}.mlp.down_proj.weight", f"{jx}/mlp/wo/kernel", d, f),
         *m.layernorm(f"{hf}.input_layernorm", f"{jx}/norm1", d, bias=False),
         *m.layernorm(f"{hf}.post_attention_layernorm", f"{jx}/norm2", d, bias=False)]
  if cfg.qk_norm:  # one scale over the head dim, shared by every head (Qwen3)
    out += [*m.layernorm(f"{hf}.self_attn.q_norm", f"{jx}/attn/q_norm", h, bias=False),
            *m.layernorm(f"{hf}.self_attn.k_norm", f"{jx}/attn/k_norm", h, bias=False)]
  return out + _biases(cfg, hf, jx)


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  d, v = cfg.d_model, cfg.vocab_size
  out = [m.same("model.embed_tokens.weight", "embed/embedding", (v, d)),
         *m.layernorm("model.norm", "final_norm", d, bias=False)]
  for i in range(cfg.n_layers):
    out += _block(cfg, i)
  if not cfg.tie_embeddings:
    out.append(m.linear("lm_head.weight", "lm_head/kernel", v, d))
  return out


def ignored(model) -> tuple[str, ...]:
  return (r"\.rotary_emb\.inv_freq$",) + ((r"^lm_head\.weight$",)
                                          if model.cfg.tie_embeddings else ())


def causal_lm(model_type: str, config_class: str, cls: str, preset: str, from_hf,
              to_hf) -> Architecture:
  """The Architecture of a Llama-shaped `cls` (a Transformer, this module's tensor table)."""
  return Architecture(
      model_type=model_type, config_class=config_class, prefix="model.", preset=preset,
      classes={cls: lambda cfg, _: Transformer(cfg)}, from_hf=from_hf, to_hf=to_hf,
      class_of=lambda model: cls if type(model) is Transformer else None,
      tensors=tensors, ignored=ignored)


ARCH = causal_lm("llama", "LlamaConfig", "LlamaForCausalLM", "llama", from_hf, to_hf)
