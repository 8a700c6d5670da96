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
    # Gemma (Hugging Face GemmaForCausalLM): Llama's layout with RMSNorm times (1 + weight),
    # embeddings scaled by sqrt(d_model), a GeGLU (tanh-GELU gated) MLP, tied embeddings.
    "gemma": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_offset=1.0,
                  norm_position="pre", mlp="geglu", use_bias=False, tie_embeddings=True,
                  causal=True, final_norm=True, embed_norm=False, type_vocab_size=0,
                  rope_theta=10000.0, embed_scale=True),
    # Qwen2 / Qwen2.5: Llama with biases on q, k and v only, a large RoPE base.
    "qwen2": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
                  mlp="swiglu", use_bias=False, qkv_bias=True, o_bias=False, mlp_bias=False,
                  qk_norm=False, tie_embeddings=False, causal=True, final_norm=True,
                  embed_norm=False, type_vocab_size=0, rope_theta=1000000.0),
    # Qwen3: Llama with an RMSNorm over each query and key head before RoPE, no biases.
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
                  mlp="swiglu", use_bias=False, qkv_bias=False, o_bias=False, mlp_bias=False,
                  qk_norm=True, tie_embeddings=False, causal=True, final_norm=True,
                  embed_norm=False, type_vocab_size=0, rope_theta=1000000.0),
    # Mistral (7B v0.1): Llama whose every layer attends within a 4096-token sliding window.
    "mistral": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-5, norm_position="pre",
                    mlp="swiglu", use_bias=False, tie_embeddings=False, causal=True,
                    final_norm=True, embed_norm=False, type_vocab_size=0, rope_theta=10000.0,
                    sliding_window=4096, layer_pattern=""),
    # Mixtral (MixtralForCausalLM): Mistral whose every MLP routes each token to 2 of 8 SwiGLU
    # experts (top-2 renormalised); no window from v0.1's 8x7B on.
    "mixtral": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-5, norm_position="pre",
                    mlp="swiglu", use_bias=False, tie_embeddings=False, causal=True,
                    final_norm=True, embed_norm=False, type_vocab_size=0, rope_theta=1000000.0,
                    sliding_window=0, layer_pattern="", n_experts=8, experts_per_token=2,
                    norm_topk_prob=True, n_shared_experts=0, shared_d_ff=0,
                    shared_expert_gate=False),
    # Qwen2-MoE (Qwen2MoeForCausalLM, Qwen1.5-MoE-A2.7B): Qwen2 with 60 experts, top-4 not
    # renormalised, plus a shared expert (4x an expert's width) behind a sigmoid gate.
    "qwen2_moe": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
                      mlp="swiglu", use_bias=False, qkv_bias=True, o_bias=False, mlp_bias=False,
                      qk_norm=False, tie_embeddings=False, causal=True, final_norm=True,
                      embed_norm=False, type_vocab_size=0, rope_theta=1000000.0, n_experts=60,
                      experts_per_token=4, norm_topk_prob=False, n_shared_experts=4,
                      shared_expert_gate=True),
    # Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 with 128 experts, top-8 renormalised, no shared
    # expert.
    "qwen3_moe": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
                      mlp="swiglu", use_bias=False, qkv_bias=False, o_bias=False,
                      mlp_bias=False, qk_norm=True, tie_embeddings=False, causal=True,
                      final_norm=True, embed_norm=False, type_vocab_size=0,
                      rope_theta=1000000.0, n_experts=128, experts_per_token=8,
                      norm_topk_prob=True, n_shared_experts=0, shared_expert_gate=False),
    # Gemma 2 (Gemma2ForCausalLM): Gemma with a norm on each sublayer's output too, soft-capped
    # attention scores (50) and logits (30), local (4096-token window) and global layers
    # alternating.
    "gemma2": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_offset=1.0,
                   norm_position="pre", mlp="geglu", use_bias=False, tie_embeddings=True,
                   causal=True, final_norm=True, embed_norm=False, type_vocab_size=0,
                   rope_theta=10000.0, embed_scale=True, post_norms=True, attn_softcap=50.0,
                   final_softcap=30.0, sliding_window=4096, layer_pattern="LG"),
    # Gemma 3 (Gemma3ForCausalLM, text): Gemma 2 without soft-capping, with q/k norms, five
    # local layers (1024-token window, RoPE base 10k) per global one (base 1M).
    "gemma3": dict(pos_emb="rope", norm="rmsnorm", norm_eps=1e-6, norm_offset=1.0,
                   norm_position="pre", mlp="geglu", use_bias=False, tie_embeddings=True,
                   causal=True, final_norm=True, embed_norm=False, type_vocab_size=0,
                   rope_theta=1000000.0, rope_local_theta=10000.0, embed_scale=True,
                   post_norms=True, qk_norm=True, sliding_window=1024, layer_pattern="LLLLLG"),
    # BERT: bidirectional, post-LayerNorm, exact GELU, token types, normalised embeddings.
    "bert": dict(pos_emb="learned", norm="layernorm", norm_eps=1e-12, norm_position="post",
                 mlp="gelu", use_bias=True, tie_embeddings=True, causal=False,
                 final_norm=False, embed_norm=True, type_vocab_size=2),
    # Marian (Hugging Face MarianMTModel, opus-mt): an encoder-decoder with fixed sinusoidal
    # positions, post-LayerNorm, SiLU MLPs, embeddings scaled by sqrt(d), a logits bias.
    "marian": dict(arch="encoder_decoder", pos_emb="sinusoidal", norm="layernorm", norm_eps=1e-5,
                   norm_position="post", mlp="silu", use_bias=True, tie_embeddings=True,
                   final_norm=False, embed_norm=False, type_vocab_size=0, embed_scale=True,
                   final_logits_bias=True),
    # BART (Hugging Face BartForConditionalGeneration): Marian's layout with learned positions
    # per stack, a LayerNorm of the summed embeddings, exact GELU, unscaled embeddings.
    "bart": dict(arch="encoder_decoder", pos_emb="learned", norm="layernorm", norm_eps=1e-5,
                 norm_position="post", mlp="gelu", use_bias=True, tie_embeddings=True,
                 final_norm=False, embed_norm=True, type_vocab_size=0, embed_scale=False,
                 final_logits_bias=True),
    # flax's examples/wmt layout: a pre-LayerNorm encoder-decoder (final norms on both stacks),
    # sinusoidal positions, scaled embeddings, ReLU MLPs.
    "wmt": dict(arch="encoder_decoder", pos_emb="sinusoidal", norm="layernorm", norm_eps=1e-6,
                norm_position="pre", mlp="relu", use_bias=True, tie_embeddings=True,
                final_norm=True, embed_norm=False, type_vocab_size=0, embed_scale=True,
                final_logits_bias=False),
    # ResNet v1.5 (torchvision, timm, HF microsoft/resnet-*): depths and widths per stage.
    "resnet18": dict(arch="resnet", resnet_block="basic", resnet_depths="2,2,2,2",
                     resnet_widths="64,128,256,512", stem="imagenet", stem_width=64),
    "resnet34": dict(arch="resnet", resnet_block="basic", resnet_depths="3,4,6,3",
                     resnet_widths="64,128,256,512", stem="imagenet", stem_width=64),
    "resnet50": dict(arch="resnet", resnet_block="bottleneck", resnet_depths="3,4,6,3",
                     resnet_widths="256,512,1024,2048", stem="imagenet", stem_width=64),
    "resnet101": dict(arch="resnet", resnet_block="bottleneck", resnet_depths="3,4,23,3",
                      resnet_widths="256,512,1024,2048", stem="imagenet", stem_width=64),
    "resnet152": dict(arch="resnet", resnet_block="bottleneck", resnet_depths="3,8,36,3",
                      resnet_widths="256,512,1024,2048", stem="imagenet", stem_width=64),
    # A LeNet-style CNN for 28-32 px images: 3x3 convs, each followed by a 2x2 max-pool.
    "cnn": dict(arch="cnn", cnn_widths="32,64", cnn_hidden=128),
    # A generator and a discriminator (models/gan.py), shaped by the gan task's config.task.
    "gan": dict(arch="gan"),
    # A recurrent network (models/rnn.py): embedding, LSTM layers, an untied dense head; no
    # positions (the recurrence orders the tokens).
    "rnn": dict(arch="rnn", rnn_cell="lstm", rnn_layers=2, rnn_hidden=256, bidirectional=False,
                pos_emb="none", tie_embeddings=False, use_bias=True),
}

# The Transformer fields a recurrent network does not read, at the values an RNN config must
# hold them (ModelConfig's defaults): config_checks refuses any other value, so a setting is
# never silently ignored, and `:smoke` puts back what it shrinks for Transformers.
RNN_IGNORED = dict(n_layers=4, n_heads=4, n_kv_heads=0, head_dim=0, d_ff=1024, causal=True,
                   scan_layers=False, remat="none", n_decoder_layers=0, type_vocab_size=0)


def _image_smoke(model) -> dict:
  """Image models: block type, stem and stage count kept, a few channels."""
  stages = len(model["resnet_depths"].split(","))
  return dict(resnet_depths=",".join(["1"] * stages),
              resnet_widths=",".join(str(8 * 2**i) for i in range(stages)), stem_width=8,
              cnn_widths="8,16", cnn_hidden=32)


def _rnn_smoke(model) -> dict:
  """Recurrent networks: cell and direction kept, one layer of 64 units (the scan's compile is
  most of a smoke run); the Transformer sizes `:smoke` set are put back (an RNN config must
  leave them alone)."""
  del model
  return dict(RNN_IGNORED, rnn_hidden=64, rnn_layers=1)


# What `:smoke` changes besides the Transformer sizes, by config.model.arch.
SMOKE = {"resnet": _image_smoke, "cnn": _image_smoke, "rnn": _rnn_smoke}


def smoke_overrides(model) -> dict:
  """The fields `:smoke` sets in a model section (a mapping of ModelConfig fields) of its arch."""
  shrink = SMOKE.get(model["arch"])
  return shrink(model) if shrink else {}


def get(name: str) -> dict:
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
  return dict(PRESETS[name])
