"""Gemma 1/2/3 (`GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`: text) as data on
the one Transformer. Gemma is Llama's decoder with RMSNorm times (1 + weight), embeddings scaled
by sqrt(hidden_size) and a GeGLU MLP, so its table is Llama's. Gemma 2 adds a norm on each
sublayer's output, soft-capped attention scores and logits, query_pre_attn_scalar and
alternating local/global layers; Gemma 3 drops the caps and adds q/k norms and a RoPE base of its
own for local layers.
"""

from __future__ import annotations

import types

from llmjax.hf import llama, qwen
from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_GATED, Architecture, gated_activation, require
from llmjax.models.transformer import Transformer

def _rope(c, rope: dict, family: str) -> dict:
  """ModelConfig rope fields of one HF rope_parameters entry (Llama's reading of it)."""
  return llama.rope_fields(types.SimpleNamespace(
      rope_parameters=rope, max_position_embeddings=c.max_position_embeddings), family)


def common_from_hf(c, family: str, activation: str, rope: dict) -> dict:
  """The fields every Gemma generation shares (causal; attention_bias on q, k, v and o)."""
  require(not getattr(c, "use_bidirectional_attention", None),
          f"{family} use_bidirectional_attention=true is not supported; supported: false")
  heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
  head_dim = c.head_dim or c.hidden_size // heads
  return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
              n_heads=heads, n_kv_heads=0 if kv == heads else kv,
              head_dim=0 if head_dim * heads == c.hidden_size else head_dim,
              d_ff=c.intermediate_size, max_len=c.max_position_embeddings,
              **_rope(c, rope, family), norm_eps=c.rms_norm_eps, norm_offset=1.0,
              mlp=gated_activation(activation, family), embed_scale=True, dropout=c.attention_dropout,
              use_bias=False, qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias),
              mlp_bias=False, qk_norm=False, sliding_window=0, layer_pattern="",
              tie_embeddings=c.tie_word_embeddings)


def common_to_hf(cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
              intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
              rope_parameters=llama.rope_parameters(cfg),
              rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
              attention_bias=(cfg.use_bias or cfg.qkv_bias) and (cfg.use_bias or cfg.o_bias),
              tie_word_embeddings=cfg.tie_embeddings)


def _gemma_from_hf(c) -> dict:
  return common_from_hf(c, "gemma", c.hidden_act, c.rope_parameters)


def _gemma_to_hf(cfg) -> dict:
  return dict(common_to_hf(cfg), hidden_act=HF_GATED.get(cfg.mlp, cfg.mlp))


# --- Gemma 2 and 3 -------------------------------------------------------------------------------

def _pattern_to_hf(cfg) -> dict:
  # transformers' Gemma 2/3 always build a sliding mask, so a model without local layers still
  # names a window (which no layer reads).
  return dict(sliding_window=cfg.sliding_window or cfg.max_len,
              layer_types=["sliding_attention" if local else "full_attention"
                           for local in cfg.local_layers()])


def _gemma2_from_hf(c) -> dict:
  head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
  return dict(common_from_hf(c, "gemma2", c.hidden_activation, c.rope_parameters),
              **qwen.window_fields(c, "gemma2"),
              post_norms=True, attn_softcap=float(c.attn_logit_softcapping or 0.0),
              final_softcap=float(c.final_logit_softcapping or 0.0),
              query_pre_attn_scalar=_scalar(c.query_pre_attn_scalar, head_dim))


def _scalar(value, head_dim: int) -> int:
  """query_pre_attn_scalar; 0 when it is the head dim (what llmjax does without it)."""
  return 0 if value == head_dim else int(value)


def _gemma2_to_hf(cfg) -> dict:
  return dict(common_to_hf(cfg), **_pattern_to_hf(cfg),
              hidden_activation=HF_GATED.get(cfg.mlp, cfg.mlp),
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.final_softcap or None,
              query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head)


def _gemma3_from_hf(c) -> dict:
  # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it (its
  # attention passes no softcap), so neither does llmjax.
  head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
  rope = c.rope_parameters
  local = dict(rope.get("sliding_attention") or {})
  kind = local.get("rope_type", "default")
  require(kind == "default", f"gemma3_text sliding_attention rope_type {kind!r} is not "
          "supported; supported: default")
  fields = common_from_hf(c, "gemma3_text", c.hidden_activation, rope["full_attention"])
  local_theta = float(local.get("rope_theta", 10000.0))
  if local_theta == fields["rope_theta"] and fields["rope_scaling"] == "none":
    local_theta = 0.0  # every layer rotates alike: what llmjax does without rope_local_theta
  return dict(fields, **qwen.window_fields(c, "gemma3_text"), rope_local_theta=local_theta,
              post_norms=True, qk_norm=True,
              final_softcap=float(c.final_logit_softcapping or 0.0),
              query_pre_attn_scalar=_scalar(c.query_pre_attn_scalar, head_dim))


def _gemma3_to_hf(cfg) -> dict:
  fields = dict(common_to_hf(cfg), **_pattern_to_hf(cfg),
                hidden_activation=HF_GATED.get(cfg.mlp, cfg.mlp),
                final_logit_softcapping=cfg.final_softcap or None,
                attn_logit_softcapping=None,
                query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head)
  fields["rope_parameters"] = {
      "full_attention": fields["rope_parameters"],
      "sliding_attention": {"rope_type": "default",
                            "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}
  return fields


def sandwich_tensors(model) -> list[m.Tensor]:
  """Gemma 2/3: Llama's table with four norms per layer. There HF's post_attention_layernorm
  normalises the attention's output (our post_norm1); pre_feedforward_layernorm is the MLP's
  input norm (norm2) and post_feedforward_layernorm its output's (post_norm2)."""
  d, out = model.cfg.d_model, []
  for t in llama.tensors(model):
    suffix = ".post_attention_layernorm.weight"
    if not t.hf_key.endswith(suffix):
      out.append(t)
      continue
    hf, jx = t.hf_key[:-len(suffix)], t.paths[0][:-len("/norm2/scale")]
    out += [m.same(f"{hf}.pre_feedforward_layernorm.weight", f"{jx}/norm2/scale", (d,)),
            m.same(f"{hf}.post_attention_layernorm.weight", f"{jx}/post_norm1/scale", (d,)),
            m.same(f"{hf}.post_feedforward_layernorm.weight", f"{jx}/post_norm2/scale", (d,))]
  return out


def _class_of(name: str):
  return lambda model: name if type(model) is Transformer else None


GEMMA = Architecture(
    model_type="gemma", config_class="GemmaConfig", prefix="model.", preset="gemma",
    classes={"GemmaForCausalLM": lambda cfg, _: Transformer(cfg)},
    from_hf=_gemma_from_hf, to_hf=_gemma_to_hf, class_of=_class_of("GemmaForCausalLM"),
    tensors=llama.tensors, ignored=llama.ignored)

GEMMA2 = Architecture(
    model_type="gemma2", config_class="Gemma2Config", prefix="model.", preset="gemma2",
    classes={"Gemma2ForCausalLM": lambda cfg, _: Transformer(cfg)},
    from_hf=_gemma2_from_hf, to_hf=_gemma2_to_hf, class_of=_class_of("Gemma2ForCausalLM"),
    tensors=sandwich_tensors, ignored=llama.ignored)

GEMMA3 = Architecture(
    model_type="gemma3_text", config_class="Gemma3TextConfig", prefix="model.", preset="gemma3",
    classes={"Gemma3ForCausalLM": lambda cfg, _: Transformer(cfg)},
    from_hf=_gemma3_from_hf, to_hf=_gemma3_to_hf, class_of=_class_of("Gemma3ForCausalLM"),
    tensors=sandwich_tensors, ignored=llama.ignored)
