"""Where documents come from: the interpreter's standard library, local files, or tfds."""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import re
import sysconfig
from collections.abc import Iterable, Iterator

from llmjax.config import DataConfig
from llmjax.errors import DataError

# Tests and vendored packages would dominate the corpus and differ between machines.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"})


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
  """The running interpreter's standard-library .py files, sorted, without tests or packages."""
  root, files = stdlib_root(), []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]  # prune, don't walk them
    files.extend(pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(files)


def glob_files(pattern: str) -> list[pathlib.Path]:
  """Sorted files matching a glob (`**` recurses); no match is an error naming the glob."""
  files = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not files:
    raise DataError(f"config.data.files={pattern!r} matches no files")
  return files


_WILDCARD = re.compile(r"[*?[]")


def glob_root(pattern: str) -> pathlib.Path:
  """The directory a glob starts from: its leading parts before the first with a wildcard (a file
  named relative to it keeps its name wherever the data is copied, and whether the glob is given
  absolute or relative)."""
  parts = pathlib.Path(os.path.expanduser(pattern)).parts[:-1]
  fixed = []
  for part in parts:
    if _WILDCARD.search(part):
      break
    fixed.append(part)
  return pathlib.Path(*fixed)


def read_files(files: list[pathlib.Path], root: pathlib.Path) -> Iterator[tuple[str, str]]:
  """(name, text) of each file, named relative to `root`."""
  for f in files:
    try:
      data = f.read_bytes()
    except OSError as e:
      raise DataError(f"cannot read corpus file {f}: {e.strerror}") from e
    yield str(f.relative_to(root)), data.decode("utf-8", errors="replace")


def _tfds_source(cfg: DataConfig):
  """The split as a random-access tfds source; any reason it cannot be read is a DataError."""
  import tensorflow_datasets as tfds  # Heavy import, only for source=tfds.
  name, data_dir = cfg.tfds_name, cfg.tfds_data_dir or None
  where = data_dir or f"{tfds.core.constants.DATA_DIR} (default; set config.data.tfds_data_dir)"
  howto = (f"prepare it on a machine with network: `tfds build {name} --data_dir=DIR "
           "--file_format=array_record`, copy DIR here and set config.data.tfds_data_dir=DIR")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f"tfds dataset {name!r} not found in data_dir {where}; {howto}") from e
  if not builder.is_prepared():
    raise DataError(f"tfds dataset {name!r} is not prepared in data_dir {where}; {howto}")
  try:
    return tfds.data_source(name, split=cfg.tfds_split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # prepared, but as tfrecord: no random access
    raise DataError(f"tfds dataset {name!r} in data_dir {where} is stored as "
                    f"{builder.info.file_format.value}, not array_record; {howto}") from e
  except ValueError as e:  # tfds names the allowed splits
    raise DataError(f"tfds dataset {name!r}, config.data.tfds_split={cfg.tfds_split!r}: "
                    f"{str(e).splitlines()[0]}") from e


def tfds_labelled_sources(cfg: DataConfig) -> tuple[tuple[str, ...] | None, dict]:
  """Labelled tfds data: (the label feature's ClassLabel names or None, {"train" | "val" |
  "test": (config key, tfds split, random-access source)} for each split the config names).
  The train split is opened first: its errors say what is missing and how to prepare it."""
  import tensorflow_datasets as tfds  # Heavy import, only for source=tfds.
  train = _tfds_source(cfg)
  features = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir or None).info.features
  label_feature = features[cfg.label_key] if cfg.label_key in features else None
  names = (tuple(label_feature.names)
           if isinstance(label_feature, tfds.features.ClassLabel) else None)
  wanted = {"train": ("tfds_split", cfg.tfds_split), "val": ("tfds_val_split", cfg.tfds_val_split),
            "test": ("tfds_test_split", cfg.tfds_test_split)}
  return names, {s: (key, split, train if s == "train" else
                     _tfds_source(dataclasses.replace(cfg, tfds_split=split)))
                 for s, (key, split) in wanted.items() if split}


def require_fields(record, cfg: DataConfig, keys: tuple[str, ...], split: str = "") -> None:
  """A tfds record must hold the fields the config keys `keys` (e.g. "text_key") name; else
  one DataError naming the key and listing the fields the dataset has."""
  for key in keys:
    field = getattr(cfg, key)
    if not isinstance(record, dict) or field not in record:
      have = ", ".join(sorted(record)) if isinstance(record, dict) else "none (not a dict)"
      where = f" split {split!r}" if split else ""
      raise DataError(f"tfds dataset {cfg.tfds_name!r}{where} has no field "
                      f"config.data.{key}={field!r}; available: {have}")


def _read_tfds(cfg: DataConfig) -> Iterator[tuple[str, str]]:
  source = _tfds_source(cfg)
  for i in range(len(source)):
    record = source[i]
    require_fields(record, cfg, ("tfds_text_key",))
    text = record[cfg.tfds_text_key]
    yield str(i), text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def take_bytes(docs: Iterable[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
  """Whole documents until max_bytes have been read (0: all); always at least one."""
  out, total = [], 0
  for name, text in docs:
    out.append((name, text))
    if max_bytes > 0:
      total += len(text.encode("utf-8"))
      if total >= max_bytes:
        break
  return out


def read_documents(cfg: DataConfig) -> list[tuple[str, str]]:
  """(doc_name, text) pairs from config.data.source, capped by config.data.max_bytes."""
  if cfg.source == "stdlib":
    docs = read_files(stdlib_files(), stdlib_root())
  elif cfg.source == "files":
    # Named from the glob's directory: a document's split (a hash of its name) is the same
    # wherever the corpus sits.
    docs = read_files(glob_files(cfg.files), glob_root(cfg.files))
  elif cfg.source == "tfds":
    docs = _read_tfds(cfg)
  else:
    raise DataError(f"config.data.source={cfg.source!r} is not one of stdlib, files, tfds")
  return take_bytes(docs, cfg.max_bytes)
