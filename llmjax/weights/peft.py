"""`peft:ADAPTER_DIR`: a Hugging Face PEFT LoRA adapter over its base (`base_model_name_or_path`).

Everything but the adapter's own factors (model shape, base weights, tokenizer) is the base's, read
as `hf:` reads it; fine-tuning from it loads the factors into the run's LoRA parameters, which
must have the adapter's method, rank, alpha and rslora.
"""

from __future__ import annotations

import os
import sys

import jax

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError, UserError
from llmjax.finetune import peft_for
from llmjax.hf import convert, mapping, tokens
from llmjax.hf import peft as hfpeft
from llmjax.weights.base import WeightsSource, is_dir, scanned
from llmjax.weights.hf import HFSource


class PeftSource(WeightsSource):
  kind, form = "peft", "peft:ADAPTER_DIR"

  @classmethod
  def recognises(cls, path: str) -> bool:
    return is_dir(path, hfpeft.CONFIG)

  def base(self) -> HFSource:
    """The Hugging Face model the adapter was trained on, as an hf: source."""
    try:
      path = hfpeft.base_path(self.path)
    except UserError as e:
      raise self.error(str(e)) from e
    return HFSource(self.spec, path, self.key)

  def model_fields(self) -> dict:
    return self.base().model_fields()

  def model_config(self, **overrides) -> ModelConfig:
    return self.base().model_config(**overrides)

  def shapes(self, scanned: bool) -> dict[str, tuple]:
    return self.base().shapes(scanned)

  def load(self, abstract, shardings, *, partial: bool = False):
    return self.base().load(abstract, shardings, partial=partial)  # the factors come in overlay

  def load_model_state(self, abstract, shardings):
    return self.base().load_model_state(abstract, shardings)

  def tokenizer_dir(self) -> str | None:
    return self.base().tokenizer_dir()

  def tokenizer(self):
    return self.base().tokenizer()

  def hf_dir(self) -> str | None:
    return self.base().hf_dir()

  def check_finetune(self, exp) -> None:
    """The adapter's method, r, alpha and rslora must be the run's config.finetune's."""
    f = exp.finetune
    if f.method != "lora":
      raise ConfigError(f"{self.key}={self.spec!r} loads LoRA factors: it needs "
                        f"config.finetune.method='lora', not {f.method!r}")
    settings = hfpeft.lora_settings(hfpeft.read_config(self.path),
                                    os.path.join(self.path, hfpeft.CONFIG))
    for theirs, ours in (("r", "lora_rank"), ("lora_alpha", "lora_alpha"),
                         ("use_rslora", "rslora")):
      if settings[theirs] != getattr(f, ours):
        raise ConfigError(f"{self.key}={self.spec!r}: the adapter has {theirs}="
                          f"{settings[theirs]!r} but config.finetune.{ours}={getattr(f, ours)!r}; "
                          "they must be equal")

  def _adapter(self, cfg: ModelConfig, flat: dict, peft=None):
    """(the HF-expressible module whose parameters are `flat`, the adapter's leaves for it)."""
    model = hfpeft.model_like(cfg, {p: tuple(a.shape) for p, a in flat.items()})
    if model is None:
      raise self.error("the run's model has no Hugging Face form (a PEFT adapter needs one: "
                       "GPT-2, Llama, BERT heads)")
    model = model if peft is None else model.clone(peft=peft)
    try:
      return model, hfpeft.adapter_leaves(self.path, model)
    except UserError as e:
      raise self.error(str(e)) from e

  def check_params(self, flat_abstract: dict) -> None:
    cfg = self.base().model_config(scan_layers=scanned(flat_abstract))
    self._adapter(cfg, flat_abstract)

  def overlay(self, exp, params, shardings):
    flat, where = mapping.flatten(params), mapping.flatten(shardings)
    _, leaves = self._adapter(exp.model, flat, peft_for(exp))
    print(f"init_from {self.spec}: from the adapter: {len(leaves)} parameters "
          f"({sum('/lora/' in p for p in leaves)} LoRA factors)", file=sys.stderr)
    return mapping.unflatten({**flat, **{p: jax.device_put(x, where[p])
                                         for p, x in leaves.items()}})

  def open(self, dtype: str = "float32", open_run=None):
    base = self.base().path
    model, params = hfpeft.load(self.path, dtype=dtype)
    special = tokens.generation_defaults(base)
    return convert.Loaded(model, params, base, special["eos_token_ids"], special["pad_token_id"],
                          {}, special["decoder_start_token_id"])
