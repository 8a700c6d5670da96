"""Tokenizers and special token ids from a local Hugging Face directory (offline)."""

from __future__ import annotations

import json
import os

from llmjax.hf.errors import HFError


def load_tokenizer(path: str):
  """transformers' AutoTokenizer from `path` only: no download, no remote code."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  except (OSError, ValueError, TypeError) as e:
    raise HFError(f"no usable tokenizer in {path}: {' '.join(str(e).split())[:300]}") from e


def generation_defaults(path: str) -> dict:
  """{'eos_token_ids': [...], 'pad_token_id': int | None} from generation_config.json / config.json."""
  found: dict = {}
  for name in ("config.json", "generation_config.json"):  # the latter wins, as in transformers
    file = os.path.join(path, name)
    if os.path.isfile(file):
      with open(file) as f:
        found.update({k: v for k, v in json.load(f).items()
                      if k in ("eos_token_id", "pad_token_id") and v is not None})
  eos = found.get("eos_token_id")
  return {"eos_token_ids": [] if eos is None else list(eos) if isinstance(eos, list) else [eos],
          "pad_token_id": found.get("pad_token_id")}
