"""A LeNet-style CNN for small images: (3x3 conv + relu + 2x2 max-pool) per width, then
dense + relu, dense. Tensor-name letters as in models/resnet.py; F flattened features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models.apply import HEAD_INPUT
from llmjax.models import resnet
from llmjax.parallel import axes


class CNN(nn.Module):
  """Images [B, H, W, in_channels] -> logits [B, num_classes] (float32). The first dense layer
  sees the flattened maps, so its shape depends on `image_size`."""
  cfg: ModelConfig
  num_classes: int
  in_channels: int = 3
  image_size: int = 32  # the side of the (square) images it takes

  def example_input(self) -> jax.Array:
    return jnp.zeros((1, self.image_size, self.image_size, self.in_channels), jnp.float32)

  @nn.compact
  def __call__(self, images_BHWC: jax.Array, *, deterministic: bool) -> jax.Array:
    del deterministic  # no dropout or BatchNorm; taken so every image model is called alike
    cfg = self.cfg
    resnet.check_images(images_BHWC, self.in_channels, "CNN", self.image_size)
    x_BHWC = images_BHWC
    for i, width in enumerate(resnet.ints(cfg.cnn_widths, "cnn_widths")):
      x_BHWC = nn.relu(resnet.conv(cfg, width, 3, 1, f"conv{i}", use_bias=True)(x_BHWC))
      x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2))
    x_BF = x_BHWC.reshape(x_BHWC.shape[0], -1)
    h_BF = nn.relu(resnet.dense(cfg, cfg.cnn_hidden, (axes.FEATURES, axes.HIDDEN), "hidden")(x_BF))
    self.sow("intermediates", HEAD_INPUT, h_BF)  # what the classifier reads (distillation)
    logits_BC = resnet.dense(cfg, self.num_classes, (axes.HIDDEN, axes.CLASSES), "classifier")(h_BF)
    return logits_BC.astype(jnp.float32)
