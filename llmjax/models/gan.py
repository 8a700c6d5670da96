"""A generator and a discriminator trained against each other (Goodfellow et al. 2014).

Variants (`GanSpec.variant`):
- dcgan (Radford et al. 2015): the generator projects z to a small map, then doubles it with 4x4
  stride-2 transposed convolutions (BatchNorm + ReLU between, tanh out); the discriminator halves
  the image with 4x4 stride-2 convolutions (LeakyReLU 0.2; BatchNorm after all but the first, or
  spectral normalisation of every layer, or neither), then one logit.
- mlp: the plain networks of the formulas, dense layers only: G(z) = tanh(dense(relu(...))),
  D(x) = sigmoid(W_D h + b_D) on LeakyReLU hidden layers; no hidden layers makes D the logistic
  regression D(x) = sigmoid(W_D x + b_D).

Images are NHWC floats in [-1, 1] (the generator's tanh range). Tensor-name letters as in
models/resnet.py, plus Z the latent dimension and F flattened features. Running statistics
(BatchNorm's, and the spectral norm's power-iteration vector u) are collection `batch_stats`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import resnet
from llmjax.parallel import axes

VARIANTS = ("dcgan", "mlp")
D_NORMS = ("batch", "spectral", "none")
# DCGAN's init: weights N(0, 0.02) (BatchNorm scales start at 1 here, not N(1, 0.02)).
_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class GanSpec:
  """The two networks' shapes (from config.task of the gan task and the data's image shape)."""
  variant: str  # dcgan | mlp
  latent_dim: int
  image_shape: tuple[int, int, int]  # H, W, C of the images the generator makes
  g_widths: tuple[int, ...]  # dcgan: channels at each resolution, smallest map first
  d_widths: tuple[int, ...]  # dcgan: channels of the stride-2 convolutions
  mlp_hidden: tuple[int, ...]  # mlp: hidden widths of both networks (() for none)
  d_norm: str = "batch"  # batch | spectral | none


def base_map(spec: GanSpec) -> tuple[int, int] | None:
  """The side of the map the dcgan generator starts from, or None if it cannot make the size:
  each of the len(g_widths) doublings needs the side divisible by 2 once more."""
  scale = 2 ** len(spec.g_widths)
  height, width, _ = spec.image_shape
  if height % scale or width % scale:
    return None
  return height // scale, width // scale


def _leaky(x):
  return nn.leaky_relu(x, 0.2)


def _unit(x):
  return x / (jnp.linalg.norm(x) + 1e-12)


class Layer(nn.Module):
  """A dense layer ([in, out]) or a 4x4 stride-2 convolution ([4, 4, in, out], padding 1, as
  DCGAN's), optionally spectrally normalised: the kernel divided by its largest singular value,
  estimated by one power iteration per training call (Miyato et al. 2018)."""
  cfg: ModelConfig
  features: int
  conv: bool
  spectral: bool = False
  use_bias: bool = True
  names: tuple[str, str] = (axes.FEATURES, axes.HIDDEN)  # a dense kernel's logical axes

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    cfg = self.cfg
    if self.conv:
      shape, names = (4, 4, x.shape[-1], self.features), (axes.CONV_H, axes.CONV_W, axes.CONV_IN,
                                                            axes.CONV_OUT)
    else:
      shape, names = (x.shape[-1], self.features), self.names
    kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, names), shape,
                        jnp.dtype(cfg.param_dtype))
    if self.spectral:
      rng = self.make_rng("params") if self.is_initializing() else None
      u_var = self.variable("batch_stats", "u", nn.with_logical_partitioning(
          lambda key, size: _unit(jax.random.normal(key, size)), (axes.NORM,)), rng,
          (self.features,))
      kernel = kernel / self._sigma(kernel, u_var, train)
    kernel = kernel.astype(jnp.dtype(cfg.dtype))
    x = x.astype(jnp.dtype(cfg.dtype))
    if self.conv:
      y = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = x @ kernel
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
                        (self.features,), jnp.dtype(cfg.param_dtype))
      y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (self.features,))
    return y

  def _sigma(self, kernel, u_var, train: bool) -> jax.Array:
    """The kernel's spectral norm; u (a float32 statistic, no gradient) advances when training."""
    w_KO = jax.lax.stop_gradient(kernel.reshape(-1, self.features).astype(jnp.float32))
    u_O = u_var.value
    if train:
      u_O = _unit(w_KO.T @ _unit(w_KO @ u_O))
      if not self.is_initializing():
        u_var.value = u_O
    v_K = _unit(w_KO @ u_O)
    # sigma = v^T W u with u, v constants: its gradient is v u^T, as the paper's.
    return v_K @ kernel.reshape(-1, self.features).astype(jnp.float32) @ u_O


class DCGenerator(nn.Module):
  """z [B, Z] -> images [B, H, W, C] in [-1, 1] (float32)."""
  cfg: ModelConfig
  spec: GanSpec

  @nn.compact
  def __call__(self, z_BZ: jax.Array, *, train: bool) -> jax.Array:
    cfg, spec = self.cfg, self.spec
    h0, w0 = base_map(spec)
    widths = spec.g_widths
    x = Layer(cfg, h0 * w0 * widths[0], conv=False, use_bias=False,
              names=(axes.HIDDEN, axes.FEATURES), name="project")(z_BZ, train=train)
    x_BHWC = x.reshape(z_BZ.shape[0], h0, w0, widths[0])
    x_BHWC = nn.relu(resnet.batch_norm(cfg, "bn0")(x_BHWC, deterministic=not train))
    for i, width in enumerate(widths[1:], start=1):
      x_BHWC = _deconv(cfg, width, f"deconv{i}", use_bias=False)(x_BHWC)
      x_BHWC = nn.relu(resnet.batch_norm(cfg, f"bn{i}")(x_BHWC, deterministic=not train))
    x_BHWC = _deconv(cfg, spec.image_shape[2], "out", use_bias=True)(x_BHWC)
    return jnp.tanh(x_BHWC.astype(jnp.float32))


def _deconv(cfg: ModelConfig, features: int, name: str, use_bias: bool) -> nn.ConvTranspose:
  """A 4x4 stride-2 transposed convolution that doubles the map ('SAME': out = 2 x in)."""
  extra = {}
  if use_bias:
    extra["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,))
  return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding="SAME", use_bias=use_bias,
                          dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                          kernel_init=nn.with_logical_partitioning(
                              _INIT, (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT)),
                          name=name, **extra)


class DCDiscriminator(nn.Module):
  """images [B, H, W, C] in [-1, 1] -> logits [B] (float32); D(x) = sigmoid(logit)."""
  cfg: ModelConfig
  spec: GanSpec

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, train: bool) -> jax.Array:
    cfg, spec = self.cfg, self.spec
    spectral, batch = spec.d_norm == "spectral", spec.d_norm == "batch"
    for i, width in enumerate(spec.d_widths):
      normed = batch and i > 0  # DCGAN leaves the first layer unnormalised
      x_BHWC = Layer(cfg, width, conv=True, spectral=spectral, use_bias=not normed,
                     name=f"conv{i}")(x_BHWC, train=train)
      if normed:
        x_BHWC = resnet.batch_norm(cfg, f"bn{i}")(x_BHWC, deterministic=not train)
      x_BHWC = _leaky(x_BHWC)
    x_BF = x_BHWC.reshape(x_BHWC.shape[0], -1)
    logits_B1 = Layer(cfg, 1, conv=False, spectral=spectral, names=(axes.FEATURES, axes.CLASSES),
                      name="logit")(x_BF, train=train)
    return logits_B1[:, 0].astype(jnp.float32)


class MLPGenerator(nn.Module):
  """z [B, Z] -> images [B, H, W, C] in [-1, 1]: dense + ReLU layers, then dense + tanh."""
  cfg: ModelConfig
  spec: GanSpec

  @nn.compact
  def __call__(self, z_BZ: jax.Array, *, train: bool) -> jax.Array:
    x_BF = z_BZ
    for i, width in enumerate(self.spec.mlp_hidden):
      x_BF = nn.relu(Layer(self.cfg, width, conv=False, names=(axes.HIDDEN, axes.FEATURES),
                           name=f"dense{i}")(x_BF, train=train))
    height, width, channels = self.spec.image_shape
    x_BF = Layer(self.cfg, height * width * channels, conv=False,
                 names=(axes.HIDDEN, axes.FEATURES), name="out")(x_BF, train=train)
    return jnp.tanh(x_BF.astype(jnp.float32)).reshape(z_BZ.shape[0], height, width, channels)


class MLPDiscriminator(nn.Module):
  """images [B, H, W, C] -> logits [B]: LeakyReLU hidden layers (BatchNorm before each, with
  d_norm=batch), then one logit; no hidden layers: logistic regression on the pixels."""
  cfg: ModelConfig
  spec: GanSpec

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, *, train: bool) -> jax.Array:
    spectral = self.spec.d_norm == "spectral"
    x_BF = x_BHWC.reshape(x_BHWC.shape[0], -1)
    for i, width in enumerate(self.spec.mlp_hidden):
      x_BF = Layer(self.cfg, width, conv=False, spectral=spectral, name=f"dense{i}")(
          x_BF, train=train)
      if self.spec.d_norm == "batch":
        x_BF = resnet.batch_norm(self.cfg, f"bn{i}")(x_BF, deterministic=not train)
      x_BF = _leaky(x_BF)
    logits_B1 = Layer(self.cfg, 1, conv=False, spectral=spectral,
                      names=(axes.FEATURES, axes.CLASSES), name="logit")(x_BF, train=train)
    return logits_B1[:, 0].astype(jnp.float32)


NETWORKS = {"dcgan": (DCGenerator, DCDiscriminator), "mlp": (MLPGenerator, MLPDiscriminator)}


class GAN(nn.Module):
  """Both networks under one parameter tree: params/generator/..., params/discriminator/...
  (and batch_stats alike); `generate` and `discriminate` run one of them."""
  cfg: ModelConfig
  spec: GanSpec

  def setup(self):
    generator, discriminator = NETWORKS[self.spec.variant]
    self.generator = generator(self.cfg, self.spec)
    self.discriminator = discriminator(self.cfg, self.spec)

  def __call__(self, z_BZ: jax.Array, images_BHWC: jax.Array, *, deterministic: bool):
    """(G(z), D(images)): what init traces, creating both networks' variables."""
    return (self.generate(z_BZ, deterministic=deterministic),
            self.discriminate(images_BHWC, deterministic=deterministic))

  def generate(self, z_BZ: jax.Array, *, deterministic: bool) -> jax.Array:
    """G(z); `deterministic`: running statistics instead of the batch's, none updated."""
    return self.generator(z_BZ, train=not deterministic)

  def discriminate(self, images_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    """D's logits; `deterministic` as in `generate`."""
    return self.discriminator(images_BHWC, train=not deterministic)
