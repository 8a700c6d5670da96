"""ResNet v1.5 (torchvision, timm, Hugging Face `microsoft/resnet-*`): NHWC, BatchNorm, basic or
bottleneck blocks, the stride on the 3x3 conv (on the first 1x1, v1, with resnet_stride_1x1).

Tensor-name letters: B batch, H height, W width, C channels (of a feature map, or the classes of
logits). Convolutions pad k//2 on every side as torch does: 'SAME' pads asymmetrically at
stride 2 and would shift every feature map by a pixel against a torch checkpoint.

With config.model.quant set (a quantized export, `llmjax quantize`), the convolutions and the
classifier store their kernels quantized (models/quant_conv.py, DenseGeneral); BatchNorm and
biases stay float.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.models.apply import HEAD_INPUT
from llmjax.models.layers import DenseGeneral
from llmjax.models.quant_conv import QuantConv
from llmjax.parallel import axes

# Kaiming-normal over fan-out, as torchvision and HF initialise ResNet convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch's Linear default (uniform, bound 1/sqrt(fan_in)), as HF's ResNet classifier starts.
_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def ints(text: str, key: str) -> tuple[int, ...]:
  """'3,4,6,3' -> (3, 4, 6, 3); ConfigError naming `key` unless every entry is positive."""
  try:
    values = tuple(int(s) for s in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) <= 0:
    raise ConfigError(f"config.model.{key}={text!r} must be comma-separated positive integers")
  return values


def stages(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
  """((depth, output width), ...) per stage."""
  depths = ints(cfg.resnet_depths, "resnet_depths")
  widths = ints(cfg.resnet_widths, "resnet_widths")
  if len(depths) != len(widths):
    raise ConfigError(f"config.model.resnet_depths={cfg.resnet_depths!r} and "
                      f"config.model.resnet_widths={cfg.resnet_widths!r} must have one entry per "
                      "stage each")
  if cfg.resnet_block == "bottleneck" and min(widths) < 4:
    raise ConfigError(f"config.model.resnet_widths={cfg.resnet_widths!r}: a bottleneck block "
                      "works at a quarter of its width, so every width must be at least 4")
  return tuple(zip(depths, widths))


# A block's convolutions as (kernel, stride, output channels); the last one is followed by the
# residual add instead of a ReLU. Bottlenecks work at a quarter width (HF's `reduction`).
BLOCKS = {
    "basic": lambda width, stride: ((3, stride, width), (3, 1, width)),
    "bottleneck": lambda width, stride: ((1, 1, width // 4), (3, stride, width // 4),
                                         (1, 1, width)),
}
# Stems as (kernel, stride, 3x3/2 max-pool after it).
STEMS = {"imagenet": (7, 2, True), "small": (3, 1, False)}


def block_plan(cfg: ModelConfig) -> list[tuple[int, int, tuple, int]]:
  """Every block as (stage, index in the stage, convs, stride), in order: the one description the
  model, the FLOP count and the Hugging Face key map read. The first block of every stage but the
  first halves the resolution; with resnet_downsample_first the first stage's does too (HF:
  downsample_in_first_stage). resnet_stride_1x1 puts a block's stride on its first conv (ResNet
  v1; HF: downsample_in_bottleneck) instead of the bottleneck's 3x3."""
  plan = []
  for s, (depth, width) in enumerate(stages(cfg)):
    for b in range(depth):
      stride = 2 if b == 0 and (s > 0 or cfg.resnet_downsample_first) else 1
      convs = BLOCKS[cfg.resnet_block](width, stride)
      if cfg.resnet_stride_1x1:
        convs = tuple((k, stride if i == 0 else 1, c) for i, (k, _, c) in enumerate(convs))
      plan.append((s, b, convs, stride))
  return plan


def block_name(stage: int, index: int) -> str:
  return f"stage{stage}_block{index}"


def conv(cfg: ModelConfig, features: int, kernel: int, stride: int, name: str, *,
         use_bias: bool = False) -> nn.Module:
  """A square convolution with torch's symmetric padding (k//2), kernel [H, W, in, out]
  (stored quantized where config.model.quant says)."""
  pad = kernel // 2
  kernel_axes = (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)
  if cfg.quant:
    return QuantConv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                     kernel_axes, cfg.quant, use_bias, cfg.dtype, cfg.param_dtype, name=name)
  if kernel == 1 and not use_bias:
    return PointwiseConv(features, stride, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype),
                         kernel_axes, name=name)
  extra = {}
  if use_bias:
    extra["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                 kernel_init=nn.with_logical_partitioning(_CONV_INIT, kernel_axes),
                 name=name, **extra)


class PointwiseConv(nn.Module):
  """A 1x1 convolution (kernel [1, 1, in, out], nn.Conv's variable and init) computed as a
  matrix product over the pixels, a stride as a strided slice first.

  The values are nn.Conv's within float32 rounding. On XLA:CPU the convolution's backward
  transposes every activation to [C, H, W, B] for the kernel gradient; the product's backward
  is two more products that read the activations as they are: ResNet-50's step (two thirds of
  its convolutions are 1x1) cost 1.22x less CPU time (benchmarks/RESULTS.md "ResNet (CPU)").
  """
  features: int
  stride: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  kernel_axes: tuple[str, str, str, str]

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(_CONV_INIT, self.kernel_axes),
                        (1, 1, x_BHWC.shape[-1], self.features), self.param_dtype)
    if self.stride > 1:
      x_BHWC = x_BHWC[:, ::self.stride, ::self.stride, :]
    return jnp.einsum("bhwi,io->bhwo", x_BHWC.astype(self.dtype), kernel[0, 0].astype(self.dtype))


def dense(cfg: ModelConfig, features: int, logical_axes: tuple[str, str], name: str) -> nn.Module:
  """flax's Dense with torch's init; with config.model.quant, llmjax's DenseGeneral storing the
  same kernel [in, out] quantized (its init is never used: the values come from an export)."""
  if cfg.quant:
    return DenseGeneral((features,), logical_axes, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        quant=cfg.quant, quant_compute=cfg.quant_compute, name=name)
  return nn.Dense(features, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=nn.with_logical_partitioning(_DENSE_INIT, logical_axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                         logical_axes[1:]), name=name)


def _batch_moments(x_NC):
  """Mean and biased variance over the rows, [1, C] each (two passes: no cancellation)."""
  mean_1C = jnp.mean(x_NC, 0, keepdims=True)
  return mean_1C, jnp.mean(jnp.square(x_NC - mean_1C), 0, keepdims=True)


# BatchNorm's training normalisation with its backward written out: autodiff of the formula
# reduces over the batch once per path through mean and var (XLA:CPU runs each as its own pass
# over a full feature map); the closed form needs two sums, over g and g * xhat, that read the
# same rows. The two cost ~45% of a ResNet step on CPU (benchmarks/RESULTS.md "ResNet (CPU)").
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x_NC, scale_C, bias_C, epsilon):
  """((x - mean) / sqrt(var + eps) * scale + bias, mean, var) with the rows' mean and biased
  var; differentiable in all three outputs."""
  (y_NC, mean_C, var_C), _ = _normalize_fwd(x_NC, scale_C, bias_C, epsilon)
  return y_NC, mean_C, var_C


def _normalize_fwd(x_NC, scale_C, bias_C, epsilon):
  mean_1C, var_1C = _batch_moments(x_NC)
  inv_1C = jax.lax.rsqrt(var_1C + epsilon)
  y_NC = (x_NC - mean_1C) * (inv_1C * scale_C[None]) + bias_C[None]
  return (y_NC, mean_1C[0], var_1C[0]), (x_NC, mean_1C, inv_1C, scale_C)


def _normalize_bwd(epsilon, res, cotangents):
  """dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)), plus what mean and var's own
  cotangents add (the running statistics take no gradient, but the function stays exact)."""
  x_NC, mean_1C, inv_1C, scale_C = res
  g_NC, gmean_C, gvar_C = cotangents
  n = x_NC.shape[0]
  xc_NC = x_NC - mean_1C
  xhat_NC = xc_NC * inv_1C
  gbias_1C = jnp.sum(g_NC, 0, keepdims=True)
  gscale_1C = jnp.sum(g_NC * xhat_NC, 0, keepdims=True)
  gx_NC = (scale_C[None] * inv_1C) * (g_NC - gbias_1C / n - xhat_NC * (gscale_1C / n))
  gx_NC = gx_NC + gmean_C[None] / n + xc_NC * (2.0 * gvar_C[None] / n)
  return gx_NC, gscale_1C[0], gbias_1C[0]


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
  """Batch normalisation over every axis but the last, with torch's running statistics.

  Variables as flax's nn.BatchNorm names them (params scale/bias, batch_stats mean/var), and
  new = momentum * old + (1 - momentum) * batch as flax counts momentum. Unlike flax, the running
  variance takes the unbiased batch variance (n / (n - 1)), as torch's BatchNorm2d does, so a
  model trained here keeps the statistics torch would have; the batch itself is normalised by
  the biased variance in both. Statistics are float32 whatever the compute dtype. There is no
  axis_name: under jit with the batch sharded over the mesh, the means below are already over
  the global batch.
  """
  momentum: float
  epsilon: float
  dtype: str = "float32"
  param_dtype: str = "float32"
  zero_scale: bool = False  # zero_init_residual: the block starts as its shortcut

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    c = x_BHWC.shape[-1]
    def vector(init):
      return nn.with_logical_partitioning(init, (axes.NORM,))
    scale = self.param("scale", vector(nn.initializers.zeros if self.zero_scale
                                       else nn.initializers.ones), (c,),
                       jnp.dtype(self.param_dtype))
    bias = self.param("bias", vector(nn.initializers.zeros), (c,), jnp.dtype(self.param_dtype))
    ra_mean = self.variable("batch_stats", "mean", vector(nn.initializers.zeros),
                            None, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", vector(nn.initializers.ones),
                           None, (c,), jnp.float32)
    x = x_BHWC.astype(jnp.float32)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if not deterministic:
      y_NC, mean, var = normalize_batch(x.reshape(-1, c), scale, bias, self.epsilon)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * var * (n / max(n - 1, 1))
      return y_NC.reshape(x.shape).astype(jnp.dtype(self.dtype))
    bshape = (1,) * (x.ndim - 1) + (c,)
    inv = (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale).reshape(bshape)
    y = (x - ra_mean.value.reshape(bshape)) * inv + bias.reshape(bshape)
    return y.astype(jnp.dtype(self.dtype))


def batch_norm(cfg: ModelConfig, name: str, zero_scale: bool = False) -> BatchNorm:
  return BatchNorm(cfg.bn_momentum, cfg.bn_eps, cfg.dtype, cfg.param_dtype, zero_scale,
                   name=name)


class Block(nn.Module):
  """relu(convs(x) + shortcut(x)); the shortcut is a 1x1 conv + BN where the shape changes."""
  cfg: ModelConfig
  convs: tuple[tuple[int, int, int], ...]  # (kernel, stride, output channels)

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg, last = self.cfg, len(self.convs)
    width, stride = self.convs[-1][2], max(s for _, s, _ in self.convs)
    y_BHWC = x_BHWC
    for i, (kernel, s, features) in enumerate(self.convs, start=1):
      y_BHWC = conv(cfg, features, kernel, s, f"conv{i}")(y_BHWC)
      y_BHWC = batch_norm(cfg, f"bn{i}", cfg.zero_init_residual and i == last)(
          y_BHWC, deterministic=deterministic)
      if i < last:
        y_BHWC = nn.relu(y_BHWC)
    shortcut_BHWC = x_BHWC
    if x_BHWC.shape[-1] != width or stride != 1:
      shortcut_BHWC = conv(cfg, width, 1, stride, "proj_conv")(x_BHWC)
      shortcut_BHWC = batch_norm(cfg, "proj_bn")(shortcut_BHWC, deterministic=deterministic)
    return nn.relu(y_BHWC + shortcut_BHWC.astype(y_BHWC.dtype))


class Stem(nn.Module):
  """conv + BN + relu (+ 3x3/2 max-pool for the imagenet stem)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    kernel, stride, pool = STEMS[cfg.stem]
    x_BHWC = conv(cfg, cfg.stem_width, kernel, stride, "conv")(images_BHWC)
    x_BHWC = nn.relu(batch_norm(cfg, "bn")(x_BHWC, deterministic=deterministic))
    if pool:
      x_BHWC = max_pool_3x3_s2(x_BHWC)
    return x_BHWC


def max_pool_3x3_s2(x_BHWC: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1) (-inf padding) as the max of nine strided views.

  The values are reduce_window's (nn.max_pool's) exactly. The gradient differs in how it is
  computed: here nine selects at the pooled size, where reduce_window's is XLA:CPU's
  select-and-scatter (four index iotas at the input size, a variadic reduce-window and a
  scatter: ~15% of a ResNet-18 step on CPU, benchmarks/RESULTS.md "ResNet (CPU)"). On a tie
  the gradient is shared instead of going to the first maximum; after the stem's ReLU the only
  ties are zeros, whose ReLU gradient is zero either way.
  """
  b, h, w, c = x_BHWC.shape
  h_out, w_out = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_BHWC = None
  for i in range(3):
    for j in range(3):
      view = jax.lax.slice(padded, (0, i, j, 0), (b, i + 2 * h_out - 1, j + 2 * w_out - 1, c),
                           (1, 2, 2, 1))
      out_BHWC = view if out_BHWC is None else jnp.maximum(out_BHWC, view)
  return out_BHWC


def check_images(images_BHWC: jax.Array, in_channels: int, model: str, size: int = 0) -> None:
  """NHWC with the model's channels (and, where `size`, its side); ConfigError otherwise."""
  side = "height, width" if not size else f"{size}, {size}"
  if (images_BHWC.ndim != 4 or images_BHWC.shape[-1] != in_channels
      or (size and images_BHWC.shape[1:3] != (size, size))):
    raise ConfigError(f"{model} takes images [batch, {side}, {in_channels}] (NHWC), got shape "
                      f"{list(images_BHWC.shape)}")


class ResNet(nn.Module):
  """Images [B, H, W, in_channels] -> logits [B, num_classes] (float32); num_classes=0: the
  pooled features [B, C_last] (HF ResNetModel's pooler_output). Variables: params, batch_stats."""
  cfg: ModelConfig
  num_classes: int
  in_channels: int = 3
  image_size: int = 32  # only what abstract init traces: any size runs, parameters do not change
  # How XLA compiles this model's steps, over the backend's defaults (train/compile_options.py):
  # on CPU, YNNPACK's reduction kernels for BatchNorm's statistics and their gradients (the
  # Transformers' default, no YNNPACK fusion, doubled the step; benchmarks/RESULTS.md "ResNet
  # (CPU)").
  compile_options: ClassVar[dict] = {
      "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}}

  def example_input(self) -> jax.Array:
    """One image for abstract init."""
    return jnp.zeros((1, self.image_size, self.image_size, self.in_channels), jnp.float32)

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    check_images(images_BHWC, self.in_channels, "ResNet")
    x_BHWC = Stem(cfg, name="stem")(images_BHWC, deterministic=deterministic)
    for stage, index, convs, _ in block_plan(cfg):
      x_BHWC = Block(cfg, convs, name=block_name(stage, index))(x_BHWC,
                                                                 deterministic=deterministic)
      x_BHWC = nn.with_logical_constraint(x_BHWC, (axes.BATCH, None, None, None))
    features_BC = jnp.mean(x_BHWC.astype(jnp.float32), axis=(1, 2))
    if not self.num_classes:
      return features_BC
    self.sow("intermediates", HEAD_INPUT, features_BC)  # what the classifier reads (distillation)
    logits_BC = dense(cfg, self.num_classes, (axes.FEATURES, axes.CLASSES), "classifier")(
        features_BC)
    return logits_BC.astype(jnp.float32)  # the loss is taken in float32 whatever the compute
