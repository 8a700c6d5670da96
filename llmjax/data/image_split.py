"""What every image source shares before label ids: a split of raw images and labels, a
validation (and test) split taken off training images by a stable hash, and an image as [H, W, C]
at the configured size. A leaf under llmjax.data.vision and llmjax.data.image_files."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from llmjax.config import DataConfig
from llmjax.data.augment import resize
from llmjax.data.text import split_documents
from llmjax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Split:
  """A source's split before label ids: raw labels are class names (str) or integer ids."""
  images: np.ndarray
  labels: np.ndarray
  where: Callable[[int], str]  # example i, for messages

  def take(self, index: np.ndarray) -> Split:
    return Split(self.images[index], self.labels[index], lambda i: self.where(int(index[i])))


def split_off(cfg: DataConfig, split: Split, what: str,
              parts: tuple[str, ...] = ("val",)) -> dict[str, Split]:
  """Training examples -> {"train", *parts}, each part about a val_fraction of them, chosen by
  text.split_documents' stable hash of (seed + k, example index) from what earlier parts left."""
  n, f = len(split.labels), cfg.val_fraction
  if n < len(parts) + 1:
    raise DataError(f"{what}: {n} training image(s); splitting off {' and '.join(parts)} needs "
                    f"{len(parts) + 1}+")
  if len(parts) * f >= 1:
    raise ConfigError(f"config.data.val_fraction={f} must be below {1 / len(parts):g} to split "
                      f"off {' and '.join(parts)}")
  out, rest = {}, [(str(i), i) for i in range(n)]
  for k, part in enumerate(parts):
    # The k-th part is the val split (fraction f / (1 - k f)) of what the earlier parts left.
    rest, taken = split_documents(rest, f / (1 - k * f), cfg.seed + k)
    out[part] = split.take(np.asarray([i for _, i in taken], np.int64))
  out["train"] = split.take(np.asarray([i for _, i in rest], np.int64))
  return out


def image_array(image: np.ndarray, size: int) -> np.ndarray:
  """An HxW or HxWxC uint8 image as [H, W, C], resized to size x size when size > 0."""
  image = image[..., None] if image.ndim == 2 else image
  return resize(image, size, size) if size > 0 else image
