"""What each supported Hugging Face architecture is, as data: configs both ways, tensor tables."""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.hf.errors import UnsupportedModelError
from llmjax.hf.mapping import Tensor

# HF activation names <-> ModelConfig.mlp (Llama's "silu" gate is our "swiglu").
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# Fields HF configs do not carry: how llmjax runs a model, not what the model computes.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl",
                  "attention_block", "init_std")


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One HF model_type: its config class, classes we map, and the tensor table per model."""
  model_type: str
  config_class: str  # in transformers: configs only, never modelling code
  prefix: str  # HF base_model_prefix; checkpoints of the bare model omit it
  preset: str
  classes: dict[str, Callable[[ModelConfig, object], nn.Module]]  # HF class -> llmjax model
  from_hf: Callable[[object], dict]  # HF config -> ModelConfig fields (raises if unsupported)
  to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> HF config fields
  class_of: Callable[[nn.Module], str | None]  # the HF class a model exports as, or None
  tensors: Callable[[nn.Module], list[Tensor]]
  ignored: Callable[[nn.Module], tuple[str, ...]]  # regexes of HF keys known to be unused


def require(ok: bool, message: str) -> None:
  if not ok:
    raise UnsupportedModelError(message)


def activation(name: str, model_type: str) -> str:
  require(name in ACTIVATIONS, f"{model_type} activation {name!r} is not supported; supported: "
          f"{', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]
