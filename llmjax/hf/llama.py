"""Llama (`LlamaForCausalLM`): grouped-query attention, RoPE, RMSNorm, SwiGLU, tied or untied,
with or without projection biases (attention_bias and mlp_bias together: one use_bias here)."""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import Architecture, require
from llmjax.models.transformer import Transformer


def _rope_theta(c) -> float:
  rope = dict(getattr(c, "rope_parameters", None) or {})
  kind = rope.get("rope_type", "default")
  require(kind == "default", f"llama rope_type {kind!r} is not supported; supported: default")
  return float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _use_bias(c) -> bool:
  # llmjax has one use_bias for every projection, so HF's two flags must agree.
  attention, mlp = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
  require(attention == mlp, f"llama with attention_bias={attention} and mlp_bias={mlp} is not "
          "supported; supported: both true or both false")
  return attention


def from_hf(c) -> dict:
  require(c.hidden_act == "silu", f"llama hidden_act {c.hidden_act!r} is not supported; "
          "supported: silu")
  heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
  return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
              n_heads=heads, n_kv_heads=0 if kv == heads else kv,
              head_dim=0 if head_dim * heads == c.hidden_size else head_dim,
              d_ff=c.intermediate_size, max_len=c.max_position_embeddings,
              rope_theta=_rope_theta(c), norm_eps=c.rms_norm_eps, dropout=c.attention_dropout,
              use_bias=_use_bias(c), tie_embeddings=c.tie_word_embeddings)


def to_hf(cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
              intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              rms_norm_eps=cfg.norm_eps, attention_dropout=cfg.dropout,
              hidden_act="silu" if cfg.mlp == "swiglu" else cfg.mlp,
              attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias,
              tie_word_embeddings=cfg.tie_embeddings)


def _biases(hf: str, jx: str, d: int, n: int, k: int, h: int, f: int) -> list[m.Tensor]:
  """q/k/v biases [heads*h] <-> [heads, h]; o and MLP biases are stored as they are."""
  return [m.reshaped(f"{hf}.self_attn.q_proj.bias", f"{jx}/attn/q/bias", (n * h,), (n, h)),
          m.reshaped(f"{hf}.self_attn.k_proj.bias", f"{jx}/attn/k/bias", (k * h,), (k, h)),
          m.reshaped(f"{hf}.self_attn.v_proj.bias", f"{jx}/attn/v/bias", (k * h,), (k, h)),
          m.same(f"{hf}.self_attn.o_proj.bias", f"{jx}/attn/o/bias", (d,)),
          m.same(f"{hf}.mlp.gate_proj.bias", f"{jx}/mlp/wg/bias", (f,)),
          m.same(f"{hf}.mlp.up_proj.bias", f"{jx}/mlp/wi/bias", (f,)),
          m.same(f"{hf}.mlp.down_proj.bias", f"{jx}/mlp/wo/bias", (d,))]


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  f, v = cfg.d_ff, cfg.vocab_size
  out = [m.same("model.embed_tokens.weight", "embed/embedding", (v, d)),
         *m.layernorm("model.norm", "final_norm", d, bias=False)]
  for i in range(cfg.n_layers):
    hf, jx = f"model.layers.{i}", f"layer_{i}"
    out += [m.linear_to_heads(f"{hf}.self_attn.q_proj.weight", f"{jx}/attn/q/kernel", d, n, h),
            m.linear_to_heads(f"{hf}.self_attn.k_proj.weight", f"{jx}/attn/k/kernel", d, k, h),
            m.linear_to_heads(f"{hf}.self_attn.v_proj.weight", f"{jx}/attn/v/kernel", d, k, h),
            m.linear_from_heads(f"{hf}.self_attn.o_proj.weight", f"{jx}/attn/o/kernel", n, h, d),
            m.linear(f"{hf}.mlp.gate_proj.weight", f"{jx}/mlp/wg/kernel", f, d),
            m.linear(f"{hf}.mlp.up_proj.weight", f"{jx}/mlp/wi/kernel", f, d),
            m.linear(f"{hf}.mlp.down_proj.weight", f"{jx}/mlp/wo/kernel", d, f),
            *m.layernorm(f"{hf}.input_layernorm", f"{jx}/norm1", d, bias=False),
            *m.layernorm(f"{hf}.post_attention_layernorm", f"{jx}/norm2", d, bias=False)]
    if cfg.use_bias:
      out += _biases(hf, jx, d, n, k, h, f)
  if not cfg.tie_embeddings:
    out.append(m.linear("lm_head.weight", "lm_head/kernel", v, d))
  return out


def ignored(model) -> tuple[str, ...]:
  return (r"\.rotary_emb\.inv_freq$",) + ((r"^lm_head\.weight$",)
                                          if model.cfg.tie_embeddings else ())


ARCH = Architecture(
    model_type="llama", config_class="LlamaConfig", prefix="model.", preset="llama",
    classes={"LlamaForCausalLM": lambda cfg, _: Transformer(cfg)},
    from_hf=from_hf, to_hf=to_hf,
    class_of=lambda model: "LlamaForCausalLM" if type(model) is Transformer else None,
    tensors=tensors, ignored=ignored)
