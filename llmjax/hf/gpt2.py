"""GPT-2 (`GPT2LMHeadModel`): Conv1D weights are [in, out]; c_attn holds q, k, v side by side."""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_ACTIVATION, Architecture, activation, require
from llmjax.models.transformer import Transformer


def from_hf(c) -> dict:
  require(not c.add_cross_attention, "GPT-2 with add_cross_attention is not supported")
  # A scale that differs by layer would give each block of a stack its own constant.
  require(not c.scale_attn_by_inverse_layer_idx, "GPT-2 scale_attn_by_inverse_layer_idx=true is "
          "not supported (a per-layer score scale); supported: false")
  return dict(vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
              # unscaled scores (scale_attn_weights=false) are scores scaled by 1 ** -0.5
              query_pre_attn_scalar=0 if c.scale_attn_weights else 1,
              d_ff=c.n_inner or 4 * c.n_embd, max_len=c.n_positions,
              norm_eps=c.layer_norm_epsilon, mlp=activation(c.activation_function, "gpt2"),
              dropout=c.resid_pdrop, tie_embeddings=c.tie_word_embeddings)


def to_hf(cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
              n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
              layer_norm_epsilon=cfg.norm_eps,
              activation_function=HF_ACTIVATION.get(cfg.mlp, cfg.mlp),
              resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
              scale_attn_weights=cfg.query_pre_attn_scalar != 1,
              tie_word_embeddings=cfg.tie_embeddings)


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
  out = [m.same("transformer.wte.weight", "embed/embedding", (v, d)),
         m.same("transformer.wpe.weight", "pos_embed/embedding", (cfg.max_len, d)),
         *m.layernorm("transformer.ln_f", "final_norm", d)]
  for i in range(cfg.n_layers):
    hf, jx = f"transformer.h.{i}", f"layer_{i}"
    qkv = tuple(f"{jx}/attn/{x}" for x in "qkv")
    out += [m.fused(f"{hf}.attn.c_attn.weight", tuple(p + "/kernel" for p in qkv),
                    (d, 3 * n * h), (d, n, h)),
            m.fused(f"{hf}.attn.c_attn.bias", tuple(p + "/bias" for p in qkv), (3 * n * h,),
                    (n, h)),
            m.reshaped(f"{hf}.attn.c_proj.weight", f"{jx}/attn/o/kernel", (n * h, d), (n, h, d)),
            m.same(f"{hf}.attn.c_proj.bias", f"{jx}/attn/o/bias", (d,)),
            m.same(f"{hf}.mlp.c_fc.weight", f"{jx}/mlp/wi/kernel", (d, f)),
            m.same(f"{hf}.mlp.c_fc.bias", f"{jx}/mlp/wi/bias", (f,)),
            m.same(f"{hf}.mlp.c_proj.weight", f"{jx}/mlp/wo/kernel", (f, d)),
            m.same(f"{hf}.mlp.c_proj.bias", f"{jx}/mlp/wo/bias", (d,)),
            *m.layernorm(f"{hf}.ln_1", f"{jx}/norm1", d),
            *m.layernorm(f"{hf}.ln_2", f"{jx}/norm2", d)]
  if not cfg.tie_embeddings:
    out.append(m.linear("lm_head.weight", "lm_head/kernel", v, d))
  return out


def ignored(model) -> tuple[str, ...]:
  # Old checkpoints store the causal-mask buffers; tied heads are sometimes saved as well.
  return (r"\.attn\.(masked_)?bias$",) + ((r"^lm_head\.weight$",)
                                          if model.cfg.tie_embeddings else ())


ARCH = Architecture(
    model_type="gpt2", config_class="GPT2Config", prefix="transformer.", preset="gpt2",
    classes={"GPT2LMHeadModel": lambda cfg, _: Transformer(cfg),
             "GPT2Model": lambda cfg, _: Transformer(cfg)},
    from_hf=from_hf, to_hf=to_hf,
    class_of=lambda model: "GPT2LMHeadModel" if type(model) is Transformer else None,
    tensors=tensors, ignored=ignored)
