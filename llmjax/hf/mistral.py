"""Mistral (`MistralForCausalLM`): a Llama-shaped decoder (hf/llama.py's tensor table) without
biases whose every layer attends within `sliding_window` (null: none, as from Mistral v0.2 on).
"""

from __future__ import annotations

from llmjax.hf import llama


def from_hf(c) -> dict:
  window = getattr(c, "sliding_window", None) or 0
  return {**llama.decoder_fields(c, "mistral"), "sliding_window": int(window)}


def to_hf(cfg) -> dict:
  return dict(llama.decoder_hf(cfg), sliding_window=cfg.sliding_window or None)


ARCH = llama.causal_lm("mistral", "MistralConfig", "MistralForCausalLM", "mistral", from_hf,
                       to_hf)
