"""Image segmentation by mean shift in (colour, position) space: `llmjax segment`'s library.

Each pixel is a point: its colour channels in 0..1, then its row and column scaled so that the
image's longer side spans `spatial_weight` (0: colour alone). Pixels that climb to the same mode
form one region and take that mode's colour.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llmjax.cluster.meanshift import ClusterError, checked_bandwidth, estimate_bandwidth, mean_shift

# With no bandwidth given, it is estimated on this many pixels (seeded): estimating on every
# pixel is quadratic in the pixel count.
ESTIMATE_PIXELS = 2000


@dataclasses.dataclass(frozen=True)
class Segmentation:
  image: np.ndarray  # uint8 [H, W, C]: each pixel in its region's colour
  labels: np.ndarray  # int32 [H, W]: region ids, 0 the most populous mode
  centers: np.ndarray  # [K, C + 2]: the modes in feature space
  bandwidth: float  # the one used (given or estimated)

  @property
  def regions(self) -> int:
    return len(self.centers)


def pixel_features(image_HWC: np.ndarray, spatial_weight: float) -> np.ndarray:
  """[H * W, C + 2] float32: colour / 255, then (row, column) * spatial_weight / max(H, W)."""
  height, width, _ = image_HWC.shape
  rows_HW, cols_HW = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  place_HW2 = np.stack([rows_HW, cols_HW], axis=-1) * (spatial_weight / max(height, width))
  features_HWF = np.concatenate([image_HWC / 255.0, place_HW2], axis=-1)
  return features_HWF.reshape(height * width, -1).astype(np.float32)


def segment_image(image, bandwidth: float | None = None, *, spatial_weight: float = 0.5,
                  bin_seeding: bool = True, kernel: str = "flat", mesh=None) -> Segmentation:
  """Mean-shift regions of a uint8 [H, W] or [H, W, C] image (see the module docstring)."""
  image_HWC = np.asarray(image)
  if image_HWC.ndim == 2:
    image_HWC = image_HWC[:, :, None]
  if image_HWC.ndim != 3 or 0 in image_HWC.shape:
    raise ClusterError(f"image must be [H, W] or [H, W, C] with pixels, got shape "
                       f"{image_HWC.shape}")
  if image_HWC.dtype != np.uint8:
    raise ClusterError(f"image must be uint8 (0..255), got dtype {image_HWC.dtype}")
  if not (isinstance(spatial_weight, (int, float)) and math.isfinite(spatial_weight)
          and spatial_weight >= 0):
    raise ClusterError(f"spatial_weight must be a finite number >= 0, got {spatial_weight!r}")
  features_NF = pixel_features(image_HWC, spatial_weight)
  if bandwidth is None:
    bandwidth = estimate_bandwidth(features_NF, n_samples=min(len(features_NF), ESTIMATE_PIXELS))
    if bandwidth <= 0:
      raise ClusterError("the estimated bandwidth is 0 (the image is one flat colour); pass "
                         "--bandwidth > 0")
  bandwidth = checked_bandwidth(bandwidth)
  centers_KF, labels_N = mean_shift(features_NF, bandwidth, kernel=kernel, bin_seeding=bin_seeding,
                                    mesh=mesh)
  channels = image_HWC.shape[2]
  colours_KC = np.clip(np.rint(centers_KF[:, :channels] * 255.0), 0, 255).astype(np.uint8)
  labels_HW = labels_N.reshape(image_HWC.shape[:2])
  return Segmentation(colours_KC[labels_HW], labels_HW, centers_KF, bandwidth)
