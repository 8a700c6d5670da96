"""Evaluation plots (matplotlib, headless) and image grids (Pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def confusion(confusion_CC: np.ndarray, names, out_png: str, title: str) -> None:
  """A confusion matrix with class names on both axes and the counts in the cells."""
  import matplotlib  # heavy: only when a plot is drawn
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # heavy, as above

  n = confusion_CC.shape[0]
  names = list(names) if names else [str(i) for i in range(n)]
  size = max(4.0, 0.6 * n + 2)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(confusion_CC, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046)
  ax.set_xticks(range(n), names, rotation=45, ha="right")
  ax.set_yticks(range(n), names)
  ax.set_xlabel("predicted label")
  ax.set_ylabel("true label")
  ax.set_title(title)
  threshold = confusion_CC.max() / 2 if confusion_CC.size else 0
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(int(confusion_CC[i, j])), ha="center", va="center", fontsize=8,
              color="white" if confusion_CC[i, j] > threshold else "black")
  os.makedirs(os.path.dirname(out_png), exist_ok=True)
  fig.savefig(out_png, dpi=120, bbox_inches="tight")
  plt.close(fig)


def image_grid(images_NHWC: np.ndarray, out_png: str, columns: int = 0) -> None:
  """uint8 images [N, H, W, C] (C 1 or 3) as one PNG grid, 2-pixel gaps, rows of `columns`
  (0: as square as N allows)."""
  n, height, width, channels = images_NHWC.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  grid = np.zeros((rows * (height + 2) + 2, columns * (width + 2) + 2, channels), np.uint8)
  for i, image in enumerate(images_NHWC):
    top, left = 2 + (i // columns) * (height + 2), 2 + (i % columns) * (width + 2)
    grid[top:top + height, left:left + width] = image
  os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
  # whole or not at all: a crash leaves no half-written PNG
  Image.fromarray(grid[..., 0] if channels == 1 else grid).save(out_png + ".tmp", format="PNG")
  os.replace(out_png + ".tmp", out_png)
