"""`hf:DIR`: a local Hugging Face model directory (config.json + safetensors, tokenizer files),
read through llmjax.hf's architectures; its layout follows the model it is loaded into."""

from __future__ import annotations

import dataclasses
import os

import jax

from llmjax import hf
from llmjax.config import ModelConfig
from llmjax.hf import convert, mapping, tokens
from llmjax.weights.base import WeightsSource, is_dir, scanned


class HFSource(WeightsSource):
  kind, form = "hf", "hf:DIR"

  @classmethod
  def recognises(cls, path: str) -> bool:
    return is_dir(path, "config.json") and not os.path.isdir(os.path.join(path, "checkpoints"))

  def model_fields(self) -> dict:
    return hf.decided_model_fields(self.path)

  def model_config(self, **overrides) -> ModelConfig:
    return dataclasses.replace(hf.model_config(self.path), **overrides)

  def _params(self, scanned: bool):
    _, params, _ = hf.load(self.path, scan_layers=scanned, with_model_state=True)
    return mapping.flatten(params)

  def shapes(self, scanned: bool) -> dict[str, tuple]:
    return {p: tuple(a.shape) for p, a in self._params(scanned).items()}

  def load(self, abstract, shardings, *, partial: bool = False):
    if not partial:
      return hf.load_params(self.path, abstract, shardings)
    wanted = mapping.flatten(abstract)
    flat, where = self._params(scanned(wanted)), mapping.flatten(shardings)
    return mapping.unflatten({p: jax.device_put(flat[p].astype(a.dtype), where[p])
                              for p, a in wanted.items()})

  def load_model_state(self, abstract, shardings):
    return hf.load_model_state(self.path, abstract, shardings)

  def tokenizer_dir(self) -> str | None:
    return self.path

  def tokenizer(self):
    return tokens.TextTokenizer(tokens.load_tokenizer(self.path))

  def hf_dir(self) -> str | None:
    return os.path.abspath(self.path)

  def open(self, dtype: str = "float32", open_run=None):
    return convert.load_hf(self.path, dtype)

