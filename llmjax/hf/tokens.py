"""Tokenizers and special token ids from a local Hugging Face directory (offline)."""

from __future__ import annotations

import json
import os

from llmjax.hf.errors import HFError


def load_tokenizer(path: str):
  """transformers' AutoTokenizer from `path` only: no download, no remote code."""
  from transformers import AutoTokenizer  # heavy: only when an HF tokenizer is used
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except (OSError, ValueError, TypeError) as e:
    raise HFError(f"no usable tokenizer in {path}: {' '.join(str(e).split())[:300]}") from e


class TextTokenizer:
  """A transformers tokenizer behind llmjax's `encode(text)` / `decode(ids)` interface."""

  def __init__(self, tokenizer):
    self.hf = tokenizer
    self.vocab_size = len(tokenizer)
    self.name = f"hf:{getattr(tokenizer, 'name_or_path', '')}"

  def encode(self, text: str) -> list[int]:
    return list(self.hf.encode(text))  # with the special tokens the model was trained with

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def special_id(self, role: str) -> int | None:
    """pad, unk, cls (or bos), sep (or eos), mask: the tokenizer's own ids, None if it has none."""
    names = {"pad": ("pad_token_id",), "unk": ("unk_token_id",),
             "cls": ("cls_token_id", "bos_token_id"), "sep": ("sep_token_id", "eos_token_id"),
             "mask": ("mask_token_id",)}[role]
    ids = [getattr(self.hf, n, None) for n in names]
    return next((int(i) for i in ids if i is not None), None)

  def decode(self, ids) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def generation_defaults(path: str) -> dict:
  """{'eos_token_ids': [...], 'pad_token_id': int | None, 'decoder_start_token_id': int | None}
  from (generation_)config.json (the decoder's first input: encoder-decoders only)."""
  found: dict = {}
  for name in ("config.json", "generation_config.json"):  # the latter wins, as in transformers
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        found.update({k: v for k, v in json.load(f).items()
                      if k in ("eos_token_id", "pad_token_id", "decoder_start_token_id")
                      and v is not None})
  eos = found.get("eos_token_id")
  return {"eos_token_ids": [] if eos is None else list(eos) if isinstance(eos, list) else [eos],
          "pad_token_id": found.get("pad_token_id"),
          "decoder_start_token_id": found.get("decoder_start_token_id")}
