"""Image augmentations as seeded grain transforms, applied per example on the host.

Each transform maps one example {"image": uint8 [H, W, C], "label": ...} and draws its randomness
only from the generator it is handed: grain's `random_map` does that in a grain pipeline, and
`apply_transforms` does it for a batch from one seed per example. The training iterator derives
each example's seed from the run's seed and the example's place in the global order, so an
augmented batch depends on nothing else and a resumed run needs no augmentation state.

The random transforms keep uint8 (a quarter of the bytes of float32 to ship to the device);
`Normalize` turns an image into float32 for pipelines that normalise on the host. Pillow does the
resampling one channel at a time, so any channel count (1, 2, 3, 4) is handled alike.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import grain
import numpy as np
from PIL import Image

from llmjax.config import DataConfig
from llmjax.errors import ConfigError, DataError

_BILINEAR = Image.Resampling.BILINEAR


def _per_channel(image_HWC: np.ndarray, op) -> np.ndarray:
  """Pillow `op` on each channel as an 8-bit greyscale image (Pillow has no mode for 2 bands)."""
  return np.stack([np.asarray(op(Image.fromarray(np.ascontiguousarray(image_HWC[..., c]))))
                   for c in range(image_HWC.shape[-1])], axis=-1)


def resize(image_HWC: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [height, width, C], bilinear (antialiased when shrinking)."""
  if image_HWC.shape[:2] == (height, width):
    return image_HWC
  return _per_channel(image_HWC, lambda im: im.resize((width, height), _BILINEAR))


def _with_image(element: dict, image: np.ndarray) -> dict:
  return {**element, "image": image}


class RandomCropWithPadding(grain.transforms.RandomMap):
  """A random window of the image zero-padded by `padding` on every side (the CIFAR crop);
  the window is the image's own size unless `size` (height, width) says otherwise."""

  def __init__(self, padding: int, size: tuple[int, int] | None = None):
    if padding < 0:
      raise ConfigError(f"RandomCropWithPadding: padding must be >= 0, got {padding}")
    self.padding, self.size = int(padding), None if size is None else tuple(size)

  def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    height, width, channels = shape
    out = self.size or (height, width)
    padded = (height + 2 * self.padding, width + 2 * self.padding)
    if out[0] > padded[0] or out[1] > padded[1]:
      raise DataError(f"RandomCropWithPadding: a {out[0]}x{out[1]} crop is larger than the "
                      f"{padded[0]}x{padded[1]} padded image ({height}x{width} plus padding "
                      f"{self.padding})")
    return (*out, channels)

  def random_map(self, element, rng: np.random.Generator):
    image, p = element["image"], self.padding
    height, width, _ = self.output_shape(image.shape)
    padded = np.pad(image, ((p, p), (p, p), (0, 0))) if p else image
    top = rng.integers(0, padded.shape[0] - height + 1)
    left = rng.integers(0, padded.shape[1] - width + 1)
    return _with_image(element, padded[top:top + height, left:left + width])


class RandomResizedCrop(grain.transforms.RandomMap):
  """A window of random area (a `scale` fraction of the image) and aspect (width / height in
  `ratio`, drawn log-uniformly), resized to size x size (None: the image's own size).

  After `attempts` windows that do not fit, the whole image, cut to the nearest allowed aspect
  and centred: the Inception-style crop of ImageNet training.
  """

  def __init__(self, size: int | None, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10):
    if size is not None and size <= 0:
      raise ConfigError(f"RandomResizedCrop: size must be positive, got {size}")
    if not 0 < scale[0] <= scale[1] <= 1:
      raise ConfigError(f"RandomResizedCrop: scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
      raise ConfigError(f"RandomResizedCrop: ratio must satisfy 0 < min <= max, got {ratio}")
    self.size, self.scale, self.ratio, self.attempts = size, tuple(scale), tuple(ratio), attempts

  def output_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    height, width, channels = shape
    return (self.size, self.size, channels) if self.size else (height, width, channels)

  def window(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, window height, window width) within a height x width image."""
    log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
    for _ in range(self.attempts):
      area = height * width * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
      if 0 < w <= width and 0 < h <= height:
        return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < self.ratio[0]:  # too tall: keep the width
      w, h = width, min(height, round(width / self.ratio[0]))
    elif aspect > self.ratio[1]:  # too wide: keep the height
      w, h = min(width, round(height * self.ratio[1])), height
    else:
      w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    top, left, h, w = self.window(image.shape[0], image.shape[1], rng)
    out_h, out_w, _ = self.output_shape(image.shape)
    return _with_image(element, resize(image[top:top + h, left:left + w], out_h, out_w))


class RandomHorizontalFlip(grain.transforms.RandomMap):
  """The mirror image (left <-> right) with probability p."""

  def __init__(self, p: float = 0.5):
    if not 0 <= p <= 1:
      raise ConfigError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
    self.p = p

  def output_shape(self, shape):
    return tuple(shape)

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < self.p:
      return _with_image(element, element["image"][:, ::-1])
    return element


class RandomRotation(grain.transforms.RandomMap):
  """Rotation about the centre by a uniform angle in [-degrees, degrees]: bilinear, corners 0."""

  def __init__(self, degrees: float):
    if degrees < 0:
      raise ConfigError(f"RandomRotation: degrees must be >= 0, got {degrees}")
    self.degrees = float(degrees)

  def output_shape(self, shape):
    return tuple(shape)

  def random_map(self, element, rng: np.random.Generator):
    angle = rng.uniform(-self.degrees, self.degrees)
    if angle == 0:  # Pillow would return a copy; skip the round trip
      return element
    return _with_image(element, _per_channel(
        element["image"], lambda im: im.rotate(angle, resample=_BILINEAR, fillcolor=0)))


class Normalize(grain.transforms.Map):
  """uint8 -> float32 (image / 255 - mean) / std, per channel (mean and std in [0, 1] units)."""

  def __init__(self, mean, std):
    self.mean = np.asarray(mean, np.float32).reshape(-1)
    self.std = np.asarray(std, np.float32).reshape(-1)
    if self.mean.shape != self.std.shape:
      raise ValueError(f"Normalize: mean {self.mean.shape} and std {self.std.shape} differ")
    if not np.all(self.std > 0):
      raise DataError(f"Normalize: std must be positive per channel, got {self.std.tolist()}")

  def output_shape(self, shape):
    if shape[-1] != len(self.mean):
      raise DataError(f"Normalize: {len(self.mean)} channel statistics for images of "
                      f"{shape[-1]} channel(s)")
    return tuple(shape)

  def map(self, element):
    self.output_shape(element["image"].shape)
    image = element["image"].astype(np.float32) / np.float32(255.0)
    return _with_image(element, (image - self.mean) / self.std)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) of uint8 [N, H, W, C] in [0, 1] units: float32 [C] each.

  Exact, from each channel's histogram (no float copy of the set). A constant channel gets std 1,
  so normalising it subtracts its value and never divides by zero.
  """
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise DataError(f"channel_stats needs uint8 [N, H, W, C] images with N > 0, got "
                    f"{images.dtype} {images.shape}")
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].reshape(-1), minlength=256).astype(np.float64)
    m = counts @ values / counts.sum()
    var = max(counts @ (values - m) ** 2 / counts.sum(), 0.0)
    mean.append(m)
    std.append(math.sqrt(var) if var > 0 else 1.0)
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def check_shapes(transforms: list, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
  """The shape after `transforms` on images of `image_shape`; a crop that cannot fit raises now."""
  shape = tuple(image_shape)
  for t in transforms:
    shape = t.output_shape(shape)
  return shape


def augment_transforms(cfg: DataConfig,
                       image_shape: tuple[int, int, int] | None = None) -> list:
  """The random training transforms config.data asks for, in order: random resized crop, padded
  crop, rotation, flip. With `image_shape` ([H, W, C] of the stored images) they are checked now."""
  _require(cfg.image_size >= 0, f"config.data.image_size must be >= 0, got {cfg.image_size}")
  _require(cfg.crop_padding >= 0, f"config.data.crop_padding must be >= 0, got {cfg.crop_padding}")
  _require(cfg.rotate_degrees >= 0,
           f"config.data.rotate_degrees must be >= 0, got {cfg.rotate_degrees}")
  out = []
  if cfg.random_resized_crop:
    _require(0 < cfg.crop_scale_min <= 1,
             f"config.data.crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
    _require(0 < cfg.crop_ratio_min <= 1,
             f"config.data.crop_ratio_min must be in (0, 1], got {cfg.crop_ratio_min}")
    out.append(RandomResizedCrop(cfg.image_size or None, scale=(cfg.crop_scale_min, 1.0),
                                 ratio=(cfg.crop_ratio_min, 1.0 / cfg.crop_ratio_min)))
  if cfg.crop_padding:
    out.append(RandomCropWithPadding(cfg.crop_padding))
  if cfg.rotate_degrees:
    out.append(RandomRotation(cfg.rotate_degrees))
  if cfg.hflip:
    out.append(RandomHorizontalFlip())
  if image_shape is not None:
    check_shapes(out, image_shape)
  return out


def _normalize(cfg: DataConfig, mean, std) -> Normalize:
  if cfg.normalize:
    return Normalize(mean, std)
  channels = len(np.asarray(mean).reshape(-1))
  return Normalize(np.zeros(channels), np.ones(channels))  # only scaled to [0, 1]


def train_transforms(cfg: DataConfig, mean, std,
                     image_shape: tuple[int, int, int] | None = None) -> list:
  """`augment_transforms` then Normalize(mean, std) (config.data.normalize=False: only / 255)."""
  out = augment_transforms(cfg, image_shape) + [_normalize(cfg, mean, std)]
  if image_shape is not None:
    check_shapes(out, image_shape)
  return out


def eval_transforms(cfg: DataConfig, mean, std) -> list:
  """Evaluation: no randomness, only the training set's normalisation."""
  return [_normalize(cfg, mean, std)]


def apply_transforms(transforms: list, batch: dict[str, np.ndarray],
                     seeds: np.ndarray) -> dict[str, np.ndarray]:
  """Each example of {"images": [B, H, W, C], "labels": [B], ...} through `transforms`, example i
  with its own np.random.default_rng(seeds[i]); other keys (e.g. "mask") pass through.

  Returns "images" stacked in the dtype the last transform gives (float32 after Normalize, uint8
  otherwise) and "labels" as int32 [B].
  """
  images, labels = batch["images"], np.asarray(batch["labels"])
  seeds = np.asarray(seeds, np.uint64).reshape(-1)
  if len(seeds) != len(images) or len(labels) != len(images):
    raise ValueError(f"apply_transforms: {len(images)} images, {len(labels)} labels and "
                     f"{len(seeds)} seeds; need one of each per example")
  out = []
  for image, label, seed in zip(images, labels, seeds):
    rng = np.random.default_rng(int(seed))
    element = {"image": image, "label": label}
    for t in transforms:
      if isinstance(t, grain.transforms.RandomMap):
        element = t.random_map(element, rng)
      elif isinstance(t, grain.transforms.Map):
        element = t.map(element)
      else:
        raise TypeError(f"apply_transforms: {type(t).__name__} is neither a grain RandomMap "
                        "nor a Map")
    out.append(element["image"])
  stacked = np.stack(out) if out else images
  return {**batch, "images": stacked, "labels": labels.astype(np.int32)}


def augmenter(cfg: DataConfig, image_shape: tuple[int, int, int] | None = None
              ) -> Callable[[dict, np.ndarray], dict] | None:
  """(batch, seeds_B) -> augmented batch with uint8 images (normalised later, on the device), or
  None when config.data asks for no augmentation."""
  transforms = augment_transforms(cfg, image_shape)
  return functools.partial(apply_transforms, transforms) if transforms else None


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)
