"""Image classifiers by `config.model.arch`: ResNet (models/resnet.py) or the small CNN."""

from __future__ import annotations

from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.models.cnn import CNN
from llmjax.models.resnet import ResNet

MODELS = {"resnet": ResNet, "cnn": CNN}


def image_model(cfg: ModelConfig, num_classes: int, *, in_channels: int = 3,
                image_size: int = 32) -> nn.Module:
  """The image model `cfg.arch` names, for square images of `image_size` (the CNN's dense layer
  depends on it; a ResNet runs at any size) with `in_channels` channels."""
  if cfg.arch not in MODELS:
    raise ConfigError(f"config.model.arch={cfg.arch!r} is not an image model; allowed: "
                      f"{', '.join(MODELS)}")
  return MODELS[cfg.arch](cfg, num_classes, in_channels=in_channels, image_size=image_size)
