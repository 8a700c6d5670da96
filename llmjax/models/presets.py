"""Architecture presets as data: a family is a set of ModelConfig field values, never a branch."""

from llmjax.errors import ConfigError

# Field values that make a family; sizes (d_model, n_layers, ...) are set by the experiment.
PRESETS: dict[str, dict] = {
    # GPT-2: learned positions, pre-LayerNorm, tanh-GELU MLP with biases, tied embeddings.
    "gpt2": dict(pos_emb="learned", norm="layernorm", norm_eps=1e-5, norm_position="pre",
                 mlp="gelu_tanh", use_bias=True, tie_embeddings=True, causal=True,
                 final_norm=True, embed_norm=False, type_vocab_size=0),
    # Llama: RoPE, pre-RMSNorm, SwiGLU without biases, grouped-query attention, untied head.
    "llama": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-5, norm_position="pre",
                  mlp="swiglu", use_bias=False, tie_embeddings=False, causal=True,
                  final_norm=True, embed_norm=False, type_vocab_size=0, rope_theta=10000.0),
    # BERT: bidirectional, post-LayerNorm, exact GELU, token types, normalised embeddings.
    "bert": dict(pos_emb="learned", norm="layernorm", norm_eps=1e-12, norm_position="post",
                 mlp="gelu", use_bias=True, tie_embeddings=True, causal=False,
                 final_norm=False, embed_norm=True, type_vocab_size=2),
}


def get(name: str) -> dict:
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
  return dict(PRESETS[name])
