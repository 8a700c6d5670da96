"""Write classes of an IDX data set (Fashion-MNIST by default) as an ImageFolder of PNGs.

  python -m llmjax.data.image_folder_export --classes=5,6,7,8,9 --per_class=200 --out=/tmp/fm59
  python -m llmjax.data.image_folder_export --classes=0,1,2,3,4 --out=/tmp/fm04

writes OUT/train/<class name>/<index>.png from the IDX train files (the first `per_class` of each
class; 0: all) and OUT/val/<class name>/... from the t10k files (`val_per_class`; 0: all), the
layout `config.data.source=image_folder` with `config.data.image_folder=OUT/train` reads (train
and its sibling val/). Class names are the data set's, with '/' written as '_'. It is how
experiments/vision/imagefolder_finetune.py makes a folder of "your own" images here.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

from llmjax.config import DataConfig
from llmjax.data import image_files
from llmjax.errors import DataError, print_error


def write_folder(images_NHWC: np.ndarray, labels_N: np.ndarray, names: tuple[str, ...],
                 classes: list[int], per_class: int, root: pathlib.Path) -> dict[str, int]:
  """PNG files root/<name>/<i>.png for the first `per_class` images of each class (0: all)."""
  written = {}
  for label in classes:
    name = names[label].replace("/", "_")
    indices = np.flatnonzero(labels_N == label)
    indices = indices[:per_class] if per_class else indices
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
      image = images_NHWC[i]
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(root / name /
                                                                            f"{i:05d}.png")
    written[name] = len(indices)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--idx_dir", default="", help="IDX files ('' Debian's Fashion-MNIST)")
  parser.add_argument("--classes", required=True, help="comma-separated label ids, e.g. 5,6,7")
  parser.add_argument("--per_class", type=int, default=0, help="train images per class (0: all)")
  parser.add_argument("--val_per_class", type=int, default=0, help="val images per class (0: all)")
  parser.add_argument("--out", required=True, help="the folder to write (OUT/train, OUT/val)")
  args = parser.parse_args(argv)
  try:
    classes = [int(c) for c in args.classes.split(",")]
    splits, labels, _ = image_files.idx_splits(DataConfig(idx_dir=args.idx_dir))
  except (ValueError, DataError) as e:
    print_error(str(e))
    sys.exit(2)
  names = labels[0] if labels else tuple(str(i) for i in range(10))
  out = pathlib.Path(args.out)
  train = splits["train"]  # idx_splits holds out a val_fraction of train: use all of it back
  images = np.concatenate([train.images, splits["val"].images])
  targets = np.concatenate([train.labels, splits["val"].labels])
  counts = write_folder(images, targets, names, classes, args.per_class, out / "train")
  if splits["test"] is not None:
    write_folder(splits["test"].images, splits["test"].labels, names, classes,
                 args.val_per_class, out / "val")
  print(f"wrote {out}/train ({', '.join(f'{k}: {v}' for k, v in counts.items())}) and {out}/val")


if __name__ == "__main__":
  main()
