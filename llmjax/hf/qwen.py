"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) and Qwen3 (`Qwen3ForCausalLM`): Llama-shaped decoders
(hf/llama.py's tensor table) with Qwen2's q/k/v biases, Qwen3's q/k RMSNorms and optional
attention_bias (q, k, v and o), and sliding windows by layer: `layer_types` ("sliding_attention"
/ "full_attention" per layer; transformers derives it from use_sliding_window and
max_window_layers, the layers from max_window_layers on sliding) <-> layer_pattern.
"""

from __future__ import annotations

from llmjax.config import ModelConfig
from llmjax.hf import llama
from llmjax.hf.arch import require

_KINDS = {"full_attention": "G", "sliding_attention": "L"}


def window_fields(c, family: str) -> dict:
  """sliding_window and layer_pattern from layer_types (no sliding layer: no window)."""
  types = list(getattr(c, "layer_types", None) or [])
  unknown = sorted(set(types) - set(_KINDS))
  require(not unknown, f"{family} layer_types {unknown} are not supported; supported: "
          f"{', '.join(_KINDS)}")
  require(len(types) == c.num_hidden_layers, f"{family} layer_types has {len(types)} entries "
          f"for num_hidden_layers={c.num_hidden_layers}")
  window = getattr(c, "sliding_window", None) or 0
  if not window or "sliding_attention" not in types:
    return dict(sliding_window=0, layer_pattern="")
  pattern = "".join(_KINDS[t] for t in types)
  return dict(sliding_window=int(window), layer_pattern="" if set(pattern) == {"L"} else pattern)


def window_hf(cfg: ModelConfig) -> dict:
  """use_sliding_window, sliding_window, layer_types (and max_window_layers, the first local
  layer, which transformers reads only when layer_types is absent)."""
  local = cfg.local_layers()
  return dict(use_sliding_window=any(local), sliding_window=cfg.sliding_window or None,
              max_window_layers=local.index(True) if any(local) else cfg.n_layers,
              layer_types=["sliding_attention" if x else "full_attention" for x in local])


def qwen2_from_hf(c) -> dict:
  return {**llama.decoder_fields(c, "qwen2"), **window_fields(c, "qwen2"), "qkv_bias": True}


def qwen2_to_hf(cfg) -> dict:
  return dict(llama.decoder_hf(cfg), **window_hf(cfg))


def qwen3_from_hf(c) -> dict:
  bias = bool(c.attention_bias)
  return {**llama.decoder_fields(c, "qwen3"), **window_fields(c, "qwen3"), "qk_norm": True,
          "qkv_bias": bias, "o_bias": bias}


def qwen3_to_hf(cfg) -> dict:
  return dict(llama.decoder_hf(cfg), **window_hf(cfg),
              attention_bias=(cfg.use_bias or cfg.qkv_bias) and (cfg.use_bias or cfg.o_bias))


QWEN2 = llama.causal_lm("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "qwen2", qwen2_from_hf,
                        qwen2_to_hf)
QWEN3 = llama.causal_lm("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "qwen3", qwen3_from_hf,
                        qwen3_to_hf)
