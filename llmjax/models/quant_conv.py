"""A 2-D convolution whose kernel is stored quantized (config.model.quant on ResNet and the CNN).

The kernel [H, W, in, out] is stored as models/quant.py stores a dense kernel: integer values,
a float32 `kernel_scale` of the kernel's rank (one scale per output channel, or per group of
`group_size` over the flattened contraction H x W x in), an int8 `kernel_zero` when asymmetric.
Two conventions differ from DenseGeneral's: 4-bit values pack two per byte along the output
channels (a conv kernel's first axis is its height, 3 or 7: odd), and the kernel is always
dequantized before the convolution (quant_compute=int8 applies to dense kernels only: XLA's
int8 convolution was not measured). The float model keeps flax's nn.Conv: parameters named
alike (`kernel`, `bias`), so a float checkpoint quantizes into this module's tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.models import quant as quantlib

# Which axes of a conv kernel [H, W, in, out] are inputs, and which one 4-bit values pack along.
N_IN, PACK_AXIS = 3, 3


class QuantConv(nn.Module):
  """NHWC images convolved with a quantized HWIO kernel, as nn.Conv computes the float one."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  logical_axes: tuple[str, ...]  # the kernel's: (height, width, in, out)
  quant: str
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    spec = quantlib.parse(self.quant)
    shape = tuple(self.kernel_size) + (x_BHWC.shape[-1], self.features)
    stored = quantlib.kernel_params(self, spec, shape, N_IN, self.logical_axes, PACK_AXIS)
    compute = jnp.dtype(self.dtype)
    kernel_HWIO = quantlib.dequantize(stored, spec, compute, PACK_AXIS)
    y_BHWC = jax.lax.conv_general_dilated(
        x_BHWC.astype(compute), kernel_HWIO, tuple(self.strides), tuple(self.padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.logical_axes[-1:]),
                        (self.features,), jnp.dtype(self.param_dtype))
      y_BHWC = y_BHWC + bias.astype(compute).reshape((1, 1, 1, -1))
    return y_BHWC
