"""`export:DIR`: an llmjax export (`llmjax export --out=DIR` or `llmjax convert --to=DIR`):
params/ (orbax) with checksums.json, model_config.json, model.json (the module wrapping the config,
special token ids, a file-less tokenizer's name) and tokenizer/ (HF tokenizer files)."""

from __future__ import annotations

import json
import os

from llmjax import checkpoint
from llmjax.hf import convert, tokens
from llmjax.weights.base import WeightsSource, is_dir, put


class ExportSource(WeightsSource):
  kind, form = "export", "export:DIR"

  @classmethod
  def recognises(cls, path: str) -> bool:
    return is_dir(path, "model_config.json")

  def model_fields(self) -> dict:
    return self.read_json("model_config.json", "an llmjax export")

  def shapes(self, scanned: bool) -> dict[str, tuple]:
    return checkpoint.exported_shapes(self.path)

  def load(self, abstract, shardings, *, partial: bool = False):
    return checkpoint.load_exported(self.path, abstract, shardings, partial=partial)[1]

  def load_model_state(self, abstract, shardings):
    return put(convert.read_model_state(self.path, abstract), shardings)

  def _description(self) -> dict:
    file = os.path.join(self.path, convert.MODEL_FILE)
    if not os.path.isfile(file):
      return {}
    with open(file) as f:
      return json.load(f)

  def tokenizer_dir(self) -> str | None:
    inside = os.path.join(self.path, convert.TOKENIZER_DIR)
    if os.path.isdir(inside):
      return inside
    return self.path if os.path.isfile(os.path.join(self.path, "tokenizer.json")) else None

  def tokenizer_name(self) -> str | None:
    return self._description().get(convert.TOKENIZER_NAME)

  def tokenizer(self):
    directory = self.tokenizer_dir()
    if directory is not None:  # HF tokenizer files, with the special tokens they add
      return tokens.TextTokenizer(tokens.load_tokenizer(directory))
    return super().tokenizer()

  def open(self, dtype: str = "float32", open_run=None):
    return convert.with_dtype(convert.load_export(self.path), dtype)
