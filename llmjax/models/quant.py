"""Weight quantization: int8 per channel, int4 in groups, nf4 (QLoRA); storage and pure math.

A quantized kernel of DenseGeneral (or of a convolution, models/quant_conv.py) is stored, as qwix
stores a QArray, as integer values plus a float32 `scale` (and, asymmetric, an integer `zero`) of
the kernel's rank, the kernel reconstructed as (q - zero) * scale with the scale broadcast
generically (an axis of the scale either 1, the kernel's size, or a divisor: one scale per
tile). Differences from qwix: 4-bit values are packed two per uint8 byte along one axis of the
kernel (a dense kernel's first, a convolution's output channels) because orbax/tensorstore store
no int4 or uint4 and XLA:CPU keeps a jnp.int4 array at one byte per value; and groups run over
the flattened contraction (an attention output kernel [N, H, D] in groups of 128 spans two heads
of 64), expressed per axis in the scale's shape.

Spec strings (config.model.quant): int8 (per output channel), int8:g64, int4:g128, int4:g32:asym,
nf4:g64, int4:g0 (g0: one scale per output channel, in any format) ("" = not quantized).
Symmetric int8 uses [-127, 127], int4 [-7, 7]; asymmetric the full range with a zero point; nf4
the 16 levels of QLoRA (Dettmers et al. 2023) times each block's absmax.
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax.errors import ConfigError

KINDS = ("int8", "int4", "nf4")
DEFAULT_GROUP = {"int8": 0, "int4": 128, "nf4": 64}  # 0: the whole contraction (per channel)
COMPUTE = ("dequant", "int8")  # dequantize then a float matmul | int8 x int8 -> int32 dot


def _nf4_levels() -> np.ndarray:
  """QLoRA's NormalFloat4: quantiles of N(0, 1), 8 positive and 7 negative, 0 exact, in [-1, 1]."""
  normal, offset = statistics.NormalDist(), 0.5 * (1 / 32 + 1 / 30)
  pos = [normal.inv_cdf(p) for p in np.linspace(1 - offset, 0.5, 9)[:-1]]
  neg = [-normal.inv_cdf(p) for p in np.linspace(1 - offset, 0.5, 8)[:-1]]
  levels = np.sort(np.array(pos + [0.0] + neg))
  return (levels / np.abs(levels).max()).astype(np.float32)


NF4 = _nf4_levels()


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How kernels are quantized: kind, group size along the contraction (0: all), zero point."""
  kind: str
  group_size: int = 0
  asymmetric: bool = False

  @property
  def bits(self) -> int:
    return 8 if self.kind == "int8" else 4

  @property
  def qrange(self) -> tuple[int, int]:
    top = 2 ** (self.bits - 1) - 1
    return (-top - 1, top) if self.asymmetric else (-top, top)

  def __str__(self) -> str:
    # g0 (per channel) is written where it is not the kind's default
    named = self.group_size or DEFAULT_GROUP[self.kind]
    parts = [self.kind] + ([f"g{self.group_size}"] if named else [])
    return ":".join(parts + (["asym"] if self.asymmetric else []))


def parse(text: str, key: str = "config.model.quant") -> QuantSpec | None:
  """The spec `text` names (None for ""); ConfigError naming `key` otherwise."""
  if not text:
    return None
  kind, *rest = text.split(":")
  allowed = ("int8[:gN][:asym], int4[:gN][:asym], nf4[:gN] (N dividing the input dimension; "
             "g0: per output channel)")
  if kind not in KINDS:
    raise ConfigError(f"{key}={text!r}: allowed {allowed}")
  group, asym = DEFAULT_GROUP[kind], False
  for part in rest:
    if part == "asym" and kind != "nf4":
      asym = True
    elif part[:1] == "g" and part[1:].isdigit():
      group = int(part[1:])
    else:
      raise ConfigError(f"{key}={text!r}: bad part {part!r}; allowed {allowed}")
  return QuantSpec(kind, group, asym)


def scale_shape(shape: tuple[int, ...], n_in: int, group: int, where: str) -> tuple[int, ...]:
  """The scale's shape for a kernel [*in, *out] with groups of `group` (0: all) over the
  flattened input; ConfigError naming `where` where the group does not tile the input."""
  in_dims = shape[:n_in]
  total = int(np.prod(in_dims))
  rem, dims = group or total, []
  bad = ConfigError(f"{where}: group size {group} does not divide the input dimension "
                    f"{'x'.join(map(str, in_dims))} = {total} of kernel {list(shape)}")
  for d in reversed(in_dims):
    if rem == 1:
      dims.append(d)
    elif rem >= d:
      if rem % d:
        raise bad
      dims.append(1)
      rem //= d
    else:
      if d % rem:
        raise bad
      dims.append(d // rem)
      rem = 1
  if rem != 1:
    raise bad
  return tuple(reversed(dims)) + tuple(shape[n_in:])


def stored_shape(shape: tuple[int, ...], spec: QuantSpec, where: str,
                 axis: int = 0) -> tuple[int, ...]:
  """The stored values' shape: the kernel's, axis `axis` halved for 4 bits (two per byte)."""
  if spec.bits == 8:
    return tuple(shape)
  if shape[axis] % 2:
    raise ConfigError(f"{where}: 4-bit values pack two per byte along the kernel's axis {axis}, "
                      f"which must be even (kernel {list(shape)})")
  return tuple(shape[:axis]) + (shape[axis] // 2,) + tuple(shape[axis + 1:])


def stored_dtype(spec: QuantSpec):
  return jnp.int8 if spec.bits == 8 else jnp.uint8


def _split(x: jax.Array, tile_shape: tuple[int, ...]):
  """x reshaped so each scale entry owns whole axes: (reshaped x, split shape for the scale,
  the axes to reduce over)."""
  x_shape, s_shape, reduce = [], [], []
  for a, b in zip(x.shape, tile_shape):
    if b in (a, 1) and a != 1:
      x_shape.append(a)
      s_shape.append(b)
      if b == 1:
        reduce.append(len(x_shape) - 1)
    elif a == 1:
      x_shape.append(1)
      s_shape.append(1)
    else:
      x_shape += [b, a // b]
      s_shape += [b, 1]
      reduce.append(len(x_shape) - 1)
  return x.reshape(x_shape), tuple(s_shape), tuple(reduce)


def broadcast_mul(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x times `scale` broadcast generically (each scale entry over its tile of x)."""
  xs, s_shape, _ = _split(x, scale.shape)
  return (xs * scale.reshape(s_shape)).reshape(x.shape)


def pack(v: jax.Array, axis: int = 0) -> jax.Array:
  """4-bit values (int, low nibble kept) two per uint8 along `axis`: even entries low, odd high."""
  nib = (jnp.moveaxis(v, axis, 0).astype(jnp.int32) & 15).astype(jnp.uint8)
  return jnp.moveaxis(nib[0::2] | (nib[1::2] << 4), 0, axis)


def unpack(b: jax.Array, signed: bool, axis: int = 0) -> jax.Array:
  """`pack` undone: `axis` doubled, values int8 (signed: -8..7, else 0..15)."""
  b = jnp.moveaxis(b, axis, 0)
  both = jnp.stack([b & 15, b >> 4], axis=1).astype(jnp.int8)
  both = jnp.where(both >= 8, both - 16, both) if signed else both
  return jnp.moveaxis(both.reshape((b.shape[0] * 2,) + b.shape[1:]), 0, axis)


def quantize(w: jax.Array, n_in: int, spec: QuantSpec, where: str = "kernel",
             pack_axis: int = 0) -> dict:
  """{"kernel": stored values, "kernel_scale": float32 [, "kernel_zero": int8]} of kernel `w`
  (4 bits: packed along `pack_axis`)."""
  sshape = scale_shape(w.shape, n_in, spec.group_size, where)
  stored_shape(w.shape, spec, where, pack_axis)
  w32 = w.astype(jnp.float32)
  ws, s_split, red = _split(w32, sshape)
  out = {}
  if spec.kind == "nf4":
    scale = jnp.max(jnp.abs(ws), axis=red, keepdims=True)
    scale = jnp.where(scale == 0, 1.0, scale)
    levels = jnp.asarray(NF4).reshape((1,) * ws.ndim + (16,))
    codes = jnp.argmin(jnp.abs((ws / scale)[..., None] - levels), axis=-1)
    q = codes.reshape(w.shape)
  elif spec.asymmetric:
    lo, hi = spec.qrange
    w_min = jnp.minimum(jnp.min(ws, axis=red, keepdims=True), 0.0)
    w_max = jnp.maximum(jnp.max(ws, axis=red, keepdims=True), 0.0)
    scale = (w_max - w_min) / (hi - lo)
    scale = jnp.where(scale == 0, 1.0, scale)
    zero = jnp.clip(jnp.round(lo - w_min / scale), lo, hi)
    q = jnp.clip(jnp.round(ws / scale) + zero, lo, hi).reshape(w.shape)
    out["kernel_zero"] = zero.reshape(sshape).astype(jnp.int8)
  else:
    lo, hi = spec.qrange
    scale = jnp.max(jnp.abs(ws), axis=red, keepdims=True) / hi
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(ws / scale), lo, hi).reshape(w.shape)
  out["kernel"] = pack(q, pack_axis) if spec.bits == 4 else q.astype(jnp.int8)
  out["kernel_scale"] = scale.reshape(sshape).astype(jnp.float32)
  return out


def values(stored: dict, spec: QuantSpec, pack_axis: int = 0) -> jax.Array:
  """The integer values (nf4: codes 0..15) at the kernel's shape, zero point subtracted."""
  q = stored["kernel"]
  q = unpack(q, spec.kind != "nf4", pack_axis) if spec.bits == 4 else q
  if "kernel_zero" in stored:
    zero = stored["kernel_zero"].astype(jnp.int32)
    return (q.astype(jnp.int32) - _broadcast_to(zero, q.shape)).astype(jnp.int32)
  return q


def _broadcast_to(s: jax.Array, shape) -> jax.Array:
  return broadcast_mul(jnp.ones(shape, s.dtype), s)


def dequantize(stored: dict, spec: QuantSpec, dtype=jnp.float32, pack_axis: int = 0) -> jax.Array:
  """The float kernel the stored values stand for, in `dtype` (scaled in float32)."""
  q = values(stored, spec, pack_axis)
  base = jnp.asarray(NF4)[q] if spec.kind == "nf4" else q.astype(jnp.float32)
  return broadcast_mul(base, stored["kernel_scale"]).astype(dtype)


def error_bound(stored: dict, spec: QuantSpec, pack_axis: int = 0) -> jax.Array:
  """Per element, the largest |w - dequantize(w)| the format allows: half a step (symmetric),
  a step (asymmetric: the rounded zero point shifts the grid), half nf4's widest gap x absmax."""
  scale = stored["kernel_scale"]
  shape = values(stored, spec, pack_axis).shape
  if spec.kind == "nf4":
    return _broadcast_to(scale * float(np.max(np.diff(NF4)) / 2), shape)
  return _broadcast_to(scale * (1.0 if spec.asymmetric else 0.5), shape)


# --- in a model: DenseGeneral's quantized kernel ---------------------------------------------

def _zeros(key, shape, dtype):
  return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
  return jnp.ones(shape, dtype)


def kernel_params(module: nn.Module, spec: QuantSpec, shape: tuple[int, ...], n_in: int,
                  logical_axes: tuple[str, ...], pack_axis: int = 0) -> dict:
  """Declare `module`'s stored kernel (its real values come from a quantized export or
  `quantize`): {"kernel", "kernel_scale"[, "kernel_zero"]}. Scales are sharded like the kernel's
  output axes and replicated along its input axes (a tile count rarely divides a mesh axis)."""
  where = "/".join(module.path) or module.name
  sshape = scale_shape(shape, n_in, spec.group_size, where)
  scale_axes = (None,) * n_in + tuple(logical_axes[n_in:])
  stored = {"kernel": module.param(
      "kernel", nn.with_logical_partitioning(_zeros, logical_axes),
      stored_shape(shape, spec, where, pack_axis), stored_dtype(spec))}
  stored["kernel_scale"] = module.param(
      "kernel_scale", nn.with_logical_partitioning(_ones, scale_axes), sshape, jnp.float32)
  if spec.asymmetric:
    stored["kernel_zero"] = module.param(
        "kernel_zero", nn.with_logical_partitioning(_zeros, scale_axes), sshape, jnp.int8)
  return stored


def dot(x: jax.Array, stored: dict, spec: QuantSpec, contract: tuple[int, ...], compute: str,
        dtype) -> jax.Array:
  """x contracted with the quantized kernel over `contract` (the kernel's leading axes):
  dequantized on the fly, or ("int8") x quantized per row to int8 and an int32 dot."""
  dims = ((contract, tuple(range(len(contract)))), ((), ()))
  if compute == "dequant":
    return jax.lax.dot_general(x.astype(dtype), dequantize(stored, spec, dtype), dims)
  x32 = x.astype(jnp.float32)
  x_scale = jnp.max(jnp.abs(x32), axis=contract, keepdims=True) / 127.0
  x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
  xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
  y = jax.lax.dot_general(xq, stored["kernel"], dims, preferred_element_type=jnp.int32)
  n_out = stored["kernel"].ndim - len(contract)
  rows = jnp.squeeze(x_scale, axis=contract)
  rows = rows.reshape(rows.shape + (1,) * n_out)
  w_scale = stored["kernel_scale"].reshape((1,) * (y.ndim - n_out)
                                           + stored["kernel_scale"].shape[len(contract):])
  return (y.astype(jnp.float32) * rows * w_scale).astype(dtype)


def check_compute(spec: QuantSpec, compute: str, where: str) -> None:
  """The integer path needs symmetric int8 with one scale per output channel."""
  if compute not in COMPUTE:
    raise ConfigError(f"config.model.quant_compute={compute!r}: allowed {', '.join(COMPUTE)}")
  if compute == "int8" and (spec.kind != "int8" or spec.group_size or spec.asymmetric):
    raise ConfigError(f"config.model.quant_compute='int8' needs config.model.quant='int8' "
                      f"(symmetric, per channel); got {str(spec)!r} at {where}")
