"""Tokenizers behind one interface: `name`, `vocab_size`, `encode`, `encode_batch`, `decode`."""

from __future__ import annotations

import pathlib

import numpy as np

from llmjax.errors import DataError


class ByteTokenizer:
  """UTF-8 bytes as tokens: no files, no unknown tokens, vocabulary 256."""
  name = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    # Sampled ids may split a multi-byte character; show it rather than fail.
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` read with the `tokenizers` library (no network)."""

  def __init__(self, path: str):
    import tokenizers  # Only needed for hf: specs; keeps byte-level runs import-light.
    file = pathlib.Path(path).expanduser() / "tokenizer.json"
    if not file.is_file():
      raise DataError(f"tokenizer path {path!r}: expected a directory with tokenizer.json "
                      f"({file} not found)")
    self.name = f"hf:{path}"
    self._tok = tokenizers.Tokenizer.from_file(str(file))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    # The Rust library tokenizes a batch on all cores; a corpus is thousands of documents.
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts)]

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids).tolist())


def get_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
  """'byte' or 'hf:PATH' (a local directory holding tokenizer.json) -> tokenizer."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("hf:") and len(spec) > 3:
    return HFTokenizer(spec[3:])
  raise DataError(f"unknown tokenizer {spec!r}; allowed: 'byte' or 'hf:PATH' "
                  "(a directory with tokenizer.json)")
