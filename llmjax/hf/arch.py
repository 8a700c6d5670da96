"""What each supported Hugging Face architecture is, as data: configs both ways, tensor tables."""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.hf.errors import UnsupportedModelError
from llmjax.hf.mapping import Tensor
from llmjax.models import rope

# HF activation names <-> ModelConfig.mlp (Llama's "silu" gate is our "swiglu").
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "swish": "silu", "silu": "silu",
               # transformers' other spellings of the same two GELUs
               "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_python": "gelu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "swish"}
# The gate activation of a gated MLP (Llama's, Gemma's: act(gate_proj x) * up_proj x) <->
# ModelConfig.mlp; gelu_new is the same tanh approximation as gelu_pytorch_tanh.
GATED_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
HF_GATED = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

# Fields HF configs do not carry: how llmjax runs a model, not what the model computes.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl",
                  "attention_block", "init_std",
                  # how a mixture of experts trains: jitter, dispatch, auxiliary-loss weights
                  "router_jitter", "moe_capacity_factor", "moe_aux_loss_weight",
                  "moe_z_loss_weight")
# Fields only image models read: a Transformer's HF config decides none of them.
IMAGE_FIELDS = ("resnet_block", "resnet_depths", "resnet_widths", "stem", "stem_width",
                "zero_init_residual", "bn_momentum", "bn_eps", "cnn_widths", "cnn_hidden",
                "resnet_downsample_first", "resnet_stride_1x1")


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
  # HF config fields the module decides besides its ModelConfig (label count, input channels).
  module_fields: Callable[[nn.Module], dict] = lambda model: (
      {"num_labels": model.num_labels} if hasattr(model, "num_labels") else {})
  # The ModelConfig fields an HF config decides, compared when saving; () all but RUNTIME_FIELDS
  # and IMAGE_FIELDS (the Transformer architectures).
  config_fields: tuple[str, ...] = ()
  # {HF key: the key whose tensor it repeats} (the BART family's shared embedding): each such copy
  # a file holds must equal its source on load; `written_copies` are the ones save writes.
  copies: Callable[[nn.Module], dict[str, str]] = lambda model: {}
  written_copies: Callable[[nn.Module], dict[str, str]] = lambda model: {}
  # How files name the experts when not fused (hf/experts.py: "mixtral", "qwen"); None: no MoE.
  experts_scheme: str | None = None


def require(ok: bool, message: str) -> None:
  if not ok:
    raise UnsupportedModelError(message)


def gated_activation(name: str, family: str) -> str:
  require(name in GATED_ACTIVATIONS, f"{family} hidden activation {name!r} is not supported; "
          f"supported: {', '.join(GATED_ACTIVATIONS)}")
  return GATED_ACTIVATIONS[name]


def activation(name: str, model_type: str) -> str:
  require(name in ACTIVATIONS, f"{model_type} activation {name!r} is not supported; supported: "
          f"{', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# The MoE fields of a model without experts (what saving compares them as).
DENSE_MOE = dict(n_experts=0, moe_d_ff=0, decoder_sparse_step=1, mlp_only_layers="",
                 n_shared_experts=0, shared_d_ff=0, shared_expert_gate=False)


def canonical_moe(cfg: ModelConfig) -> dict:
  """The MoE fields of `cfg` written one way (what saving compares): dense layers as a list, the
  expert width in moe_d_ff when some layer is dense (else d_ff, which nothing else reads), the
  shared experts as one of their total width."""
  if not cfg.n_experts:
    return dict(DENSE_MOE, experts_per_token=2, norm_topk_prob=True)
  dense = [i for i, s in enumerate(cfg.moe_layers()) if not s]
  width = cfg.expert_d_ff
  out = dict(mlp_only_layers=",".join(map(str, dense)), decoder_sparse_step=1,
             d_ff=cfg.d_ff if dense else width, moe_d_ff=width if dense else 0,
             n_shared_experts=1 if cfg.shared_width else 0, shared_d_ff=cfg.shared_width,
             shared_expert_gate=bool(cfg.shared_width) and cfg.shared_expert_gate)
  return out


_ROPE_KEPT = {"none": (), "linear": ("rope_factor",), "dynamic": ("rope_factor",),
              "llama3": ("rope_factor", "rope_original_max_len", "rope_low_freq_factor",
                         "rope_high_freq_factor"),
              "yarn": ("rope_factor", "rope_original_max_len", "rope_beta_fast", "rope_beta_slow",
                       "rope_attention_factor", "rope_truncate")}


def canonical(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with every way of writing the same model made one (what saving compares): biases as
  per-projection switches, rope fields its scaling does not read at their defaults (and yarn's
  derived attention factor and the original context written out), the window as one letter per
  layer. use_bias=True and all three switches are one model here: HF configs have no adapters."""
  qkv, o, mlp = (cfg.use_bias or cfg.qkv_bias, cfg.use_bias or cfg.o_bias,
                 cfg.use_bias or cfg.mlp_bias)
  fields = dict(use_bias=qkv and o and mlp, qkv_bias=qkv, o_bias=o, mlp_bias=mlp)
  defaults, kept = ModelConfig(), _ROPE_KEPT.get(cfg.rope_scaling, ())
  fields.update({name: getattr(defaults, name) for keep in _ROPE_KEPT.values() for name in keep
                 if name not in kept})
  if "rope_original_max_len" in kept:
    fields["rope_original_max_len"] = cfg.rope_original_max_len or cfg.max_len
  if cfg.rope_scaling == "yarn":
    fields["rope_attention_factor"] = rope.yarn_attention_factor(cfg)
  local = cfg.local_layers()
  fields.update(sliding_window=cfg.sliding_window if any(local) else 0,
                layer_pattern="".join("L" if x else "G" for x in local) if any(local) else "")
  return dataclasses.replace(cfg, **fields, **canonical_moe(cfg))
