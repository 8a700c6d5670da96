"""Building blocks shared by every model: dense layers, norms, MLPs, adapters, rotary embeddings.

Tensor-name letters: B batch, L length, S key length (or cache slots), D model width, F MLP width,
N query heads, K key/value heads, H head dim, V vocabulary, C classes, P prompt length,
T prompt + generated length (in encoder-decoders: the target length; S the source length).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.models import peft as peftlib
from llmjax.models import quant as quantlib
from llmjax.parallel import axes


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def init_normal(std: float, logical_axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), logical_axes)


class DenseGeneral(nn.Module):
  """x contracted over `axis` with a kernel [*in_dims, *features]; created at its real shape.

  flax's own DenseGeneral initialises a flattened 2-D kernel, which breaks logical sharding
  annotations (and scanned stacks) for multi-axis kernels.
  """
  features: tuple[int, ...]
  logical_axes: tuple[str, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = True
  std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  peft: peftlib.Peft = peftlib.NONE  # LoRA here when `peft.lora_targets` matches this path
  deterministic: bool = True  # LoRA dropout off
  quant: str = ""  # the kernel stored quantized (models/quant.py spec); "": float
  quant_compute: str = "dequant"  # dequant | int8 (int8 x int8 -> int32 dot)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    contract = tuple(a % x.ndim for a in self.axis)
    in_dims = tuple(x.shape[a] for a in contract)
    compute = dtype_of(self.dtype)
    if self.quant:
      y = self._quantized(x, contract, in_dims, compute)
    else:
      kernel = self.param("kernel", init_normal(self.std, self.logical_axes),
                          in_dims + self.features, dtype_of(self.param_dtype))
      y = jax.lax.dot_general(x.astype(compute), kernel.astype(compute),
                              ((contract, tuple(range(len(contract)))), ((), ())))
    if self.use_bias:
      bias_axes = self.logical_axes[len(in_dims):]
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                        self.features, dtype_of(self.param_dtype))
      y = y + bias.astype(compute).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    if self.peft.lora_on(self.path):
      in_axes, out_axes = self.logical_axes[:len(in_dims)], self.logical_axes[len(in_dims):]
      _check_rank(self.peft.lora_rank, in_dims, self.features, self.path)
      y = y + peftlib.LoraUpdate(self.peft, in_axes, out_axes, self.features,
                                 self.deterministic, self.dtype, self.param_dtype,
                                 name="lora")(x, contract)
    return y


  def _quantized(self, x, contract, in_dims, compute):
    """The projection with the kernel stored quantized (weights-only; LoRA stays float)."""
    spec = quantlib.parse(self.quant)
    quantlib.check_compute(spec, self.quant_compute, "/".join(self.path))
    stored = quantlib.kernel_params(self, spec, in_dims + self.features, len(in_dims),
                                    self.logical_axes)
    return quantlib.dot(x, stored, spec, contract, self.quant_compute, compute)


def _check_rank(rank: int, in_dims, out_dims, path) -> None:
  smaller = min(int(np.prod(in_dims)), int(np.prod(out_dims)))
  if not 0 < rank <= smaller:
    raise ConfigError(f"config.finetune.lora_rank={rank} must be in [1, {smaller}] for "
                      f"{'/'.join(path)} (kernel {list(in_dims) + list(out_dims)})")


def dense(cfg: ModelConfig, features, logical_axes: tuple[str, ...], name: str, *,
          axis=-1, std: float | None = None, peft: peftlib.Peft = peftlib.NONE, bias=None,
          deterministic: bool = True, quantized: bool = True) -> DenseGeneral:
  """A DenseGeneral configured from the model's dtypes, bias choice (`bias`, else use_bias),
  init scale and weight quantization (`quantized=False`: float whatever config.model.quant)."""
  return DenseGeneral(
      features=(features,) if isinstance(features, int) else tuple(features),
      logical_axes=logical_axes, axis=(axis,) if isinstance(axis, int) else tuple(axis),
      use_bias=cfg.use_bias if bias is None else bias,
      std=cfg.init_std if std is None else std, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, name=name, peft=peft, deterministic=deterministic,
      quant=cfg.quant if quantized else "", quant_compute=cfg.quant_compute)


class OffsetRMSNorm(nn.Module):
  """RMSNorm times (offset + scale), the scale starting at 0 (Gemma's `1 + weight`).

  As transformers computes it: normalised and scaled in float32, then cast to the compute dtype
  (flax's RMSNorm multiplies by the scale in the compute dtype)."""
  offset: float
  epsilon: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    factor = self.offset + scale.astype(jnp.float32)
    return (y * factor.reshape((1,) * (y.ndim - 1) + factor.shape)).astype(self.dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm or RMSNorm by config; flax reduces in float32 and returns the compute dtype."""
  if cfg.norm_offset:
    if cfg.norm != "rmsnorm":
      raise ConfigError(f"config.model.norm_offset={cfg.norm_offset} needs norm='rmsnorm', got "
                        f"{cfg.norm!r}")
    return OffsetRMSNorm(cfg.norm_offset, cfg.norm_eps, dtype_of(cfg.dtype),
                         dtype_of(cfg.param_dtype), name=name)
  common = dict(epsilon=cfg.norm_eps, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), name=name,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(**common)
  return nn.LayerNorm(**common, bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                        (axes.NORM,)))


ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,  # Marian's "swish"
    "swiglu": nn.silu,  # gate activation; the gate itself is the `wg` projection
    "geglu": lambda x: nn.gelu(x, approximate=True),  # Gemma's gate (gelu_pytorch_tanh)
}
GATED = ("swiglu", "geglu")  # act(x Wg) * (x Wi): three weight matrices


class Mlp(nn.Module):
  """Position-wise MLP: act(x Wi) Wo, or gated (SwiGLU, GeGLU) act(x Wg) * (x Wi) Wo."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.cfg
    act = ACTIVATIONS[cfg.mlp]
    hooks = dict(peft=self.peft, deterministic=self.deterministic,
                 bias=cfg.use_bias or cfg.mlp_bias)
    h_BLF = dense(cfg, cfg.d_ff, (axes.EMBED, axes.MLP), "wi", **hooks)(x_BLD)
    if cfg.mlp in GATED:
      h_BLF = act(dense(cfg, cfg.d_ff, (axes.EMBED, axes.MLP), "wg", **hooks)(x_BLD)) * h_BLF
    else:
      h_BLF = act(h_BLF)
    h_BLF = nn.with_logical_constraint(h_BLF, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return dense(cfg, cfg.d_model, (axes.MLP, axes.EMBED), "wo",
                 std=cfg.init_std / (2 * cfg.n_layers) ** 0.5, **hooks)(h_BLF)


class Adapter(nn.Module):
  """A bottleneck adapter on a sublayer's output: h + up(act(down(h))), up zero-initialised."""
  cfg: ModelConfig
  dim: int

  @nn.compact
  def __call__(self, h_BLD):
    cfg = self.cfg
    # an adapter trains: never quantized, even over a quantized base (QLoRA)
    z_BLA = dense(cfg, self.dim, (axes.EMBED, None), "down", quantized=False)(h_BLD)
    z_BLA = ACTIVATIONS[cfg.mlp if cfg.mlp != "swiglu" else "gelu"](z_BLA)
    return h_BLD + dense(cfg, cfg.d_model, (None, axes.EMBED), "up", std=0.0,
                         quantized=False)(z_BLA)


def rope(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float,
         inv_freq_H: jax.Array | None = None, scale: float = 1.0) -> jax.Array:
  """Rotary position embedding, rotate-half convention (the one Llama checkpoints use);
  `inv_freq_H` and `scale` from models/rope.py for scaled kinds (None: theta's own)."""
  half = x_BLNH.shape[-1] // 2
  if inv_freq_H is None:
    inv_freq_H = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x_BLNH.shape[-1])
  angle_BLH = positions_BL[..., None].astype(jnp.float32) * inv_freq_H[None, None]
  sin_BL1H = jnp.sin(angle_BLH)[:, :, None, :]
  cos_BL1H = jnp.cos(angle_BLH)[:, :, None, :]
  if scale != 1.0:  # yarn's attention factor, on cos and sin as transformers applies it
    sin_BL1H, cos_BL1H = sin_BL1H * scale, cos_BL1H * scale
  x1, x2 = x_BLNH[..., :half].astype(jnp.float32), x_BLNH[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos_BL1H - x2 * sin_BL1H, x2 * cos_BL1H + x1 * sin_BL1H], -1)
  return rotated.astype(x_BLNH.dtype)


def sinusoid_table(length: int, d: int) -> np.ndarray:
  """[length, d] fixed position embeddings, sines in the first half and cosines in the second
  (Marian's layout; the original Transformer interleaves them). Computed in float64 on the host,
  as Hugging Face does, so long positions keep their precision."""
  position_L1 = np.arange(length, dtype=np.float64)[:, None]
  inv_freq_H = 1.0 / 10000.0 ** (2.0 * np.arange(d // 2, dtype=np.float64) / d)
  angle_LH = position_L1 * inv_freq_H[None]
  return np.concatenate([np.sin(angle_LH), np.cos(angle_LH)], axis=1).astype(np.float32)
