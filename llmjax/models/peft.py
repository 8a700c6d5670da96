"""The model side of parameter-efficient fine-tuning: what llmjax's own layers add when asked.

`Peft` is a static description (hashable, a module attribute) of the extra parameters; every
one of them lives in a new subtree next to the base's, whose paths and layouts never change:
- LoRA / AdaLoRA: `<projection>/lora/{a, b}` (+ `e` for AdaLoRA's singular values) on each
  `DenseGeneral` whose module path full-matches `lora_targets` ("layer_0/attn/q"; scanned:
  "layers/attn/q", with the layer axis in front like the kernel's).
- Bottleneck adapters: `<block>/adapter_attn/`, `<block>/adapter_mlp/` (layers.Adapter).
- Prefix tuning: `<block>/attn/prefix/{k, v}` ([P, K, H] keys and values, never rotated).
- Prompt tuning: `prompt` ([P, D] input vectors in front of the tokens; `encoder/prompt`).
The update sides (LoRA's B, AdaLoRA's E, the adapters' up-projections) start at zero, so a
fresh LoRA, AdaLoRA or adapter model computes exactly what its base does.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.parallel import axes


@dataclasses.dataclass(frozen=True)
class Peft:
  lora_targets: str = ""  # full-match regex over DenseGeneral module paths; "" means no LoRA
  lora_rank: int = 0
  lora_alpha: float = 16.0
  rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
  lora_dropout: float = 0.0
  adalora: bool = False  # the SVD form  B diag(e) A, e masked by the rank budget
  adapter_dim: int = 0  # 0: no adapters
  adapter_placement: str = "both"  # attn | mlp | both
  adapter_layers: tuple[int, ...] = ()  # () every block (indices need unscanned layers)
  prompt_length: int = 0
  prefix_length: int = 0

  def lora_scale(self) -> float:
    if self.adalora:  # PEFT's AdaLoRA: alpha / r of the initial rank, whatever stays unmasked
      return self.lora_alpha / self.lora_rank
    return self.lora_alpha / (self.lora_rank ** 0.5 if self.rslora else self.lora_rank)

  def lora_on(self, module_path: tuple[str, ...]) -> bool:
    return bool(self.lora_rank and self.lora_targets
                and re.fullmatch(self.lora_targets, "/".join(module_path)))

  def adapter_on(self, sublayer: str, layer_index: int | None) -> bool:
    if not self.adapter_dim or self.adapter_placement not in (sublayer, "both"):
      return False
    return not self.adapter_layers or layer_index in self.adapter_layers


NONE = Peft()


def _uniform_fan_in(fan_in: int):
  """PEFT's LoRA A init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in ** -0.5
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class LoraUpdate(nn.Module):
  """scale * (dropout(x) . a) . b  — the low-rank change of a DenseGeneral's output.

  a [*in, r] shards like the kernel's input axes, b [r, *out] like its output axes, the rank
  axis replicated; contracted in two steps so the [in, out] product never exists.
  """
  peft: Peft
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  features: tuple[int, ...]
  deterministic: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, contract: tuple[int, ...]):
    p, r = self.peft, self.peft.lora_rank
    in_dims = tuple(x.shape[a] for a in contract)
    fan_in = math.prod(in_dims)
    a_init = nn.initializers.normal(0.02) if p.adalora else _uniform_fan_in(fan_in)
    a = self.param("a", nn.with_logical_partitioning(a_init, self.in_axes + (None,)),
                   in_dims + (r,), jnp.dtype(self.param_dtype))
    b_init = nn.initializers.normal(0.02) if p.adalora else nn.initializers.zeros
    b = self.param("b", nn.with_logical_partitioning(b_init, (None,) + self.out_axes),
                   (r,) + self.features, jnp.dtype(self.param_dtype))
    compute = jnp.dtype(self.dtype)
    x = nn.Dropout(p.lora_dropout, deterministic=self.deterministic)(x)
    h = jax.lax.dot_general(x.astype(compute), a.astype(compute),
                            ((contract, tuple(range(len(contract)))), ((), ())))
    if p.adalora:  # zero-initialised singular values: the update starts at exactly zero
      e = self.param("e", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (r,),
                     jnp.dtype(self.param_dtype))
      h = h * e.astype(compute).reshape((1,) * (h.ndim - 1) + (r,))
    y = jax.lax.dot_general(h, b.astype(compute), (((h.ndim - 1,), (0,)), ((), ())))
    return y * jnp.asarray(p.lora_scale(), compute)


class Prefix(nn.Module):
  """P trained key and value vectors of one attention layer: ([P, K, H], [P, K, H])."""
  length: int
  kv_heads: int
  head_dim: int
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self):
    shape, logical = (self.length, self.kv_heads, self.head_dim), (None, axes.KV_HEADS, None)
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), logical)
    dtype = jnp.dtype(self.param_dtype)
    return self.param("k", init, shape, dtype), self.param("v", init, shape, dtype)


def with_prefix(prefix_k_PKH, prefix_v_PKH, k_BSKH, v_BSKH, mask_B1LS, causal: bool,
                length: int):
  """Keys/values with the prefix in front, and the mask over them: every query sees the whole
  prefix, and the tokens as before (causal and segments made explicit, since the key axis is no
  longer the query axis)."""
  batch = k_BSKH.shape[0]
  expand = lambda t: jnp.broadcast_to(t.astype(k_BSKH.dtype)[None], (batch,) + t.shape)
  k_BSKH = jnp.concatenate([expand(prefix_k_PKH), k_BSKH], axis=1)
  v_BSKH = jnp.concatenate([expand(prefix_v_PKH), v_BSKH], axis=1)
  size = k_BSKH.shape[1] - prefix_k_PKH.shape[0]
  tokens_B1LS = jnp.ones((batch, 1, length, size), bool) if mask_B1LS is None else mask_B1LS
  if causal:
    tokens_B1LS = tokens_B1LS & jnp.tril(jnp.ones((length, size), bool))[None, None]
  prefix_B1LP = jnp.ones((batch, 1, length, prefix_k_PKH.shape[0]), bool)
  return k_BSKH, v_BSKH, jnp.concatenate([prefix_B1LP, tokens_B1LS], axis=-1)
