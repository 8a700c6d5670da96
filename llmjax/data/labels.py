"""The label policy that labelled text (llmjax.data.labelled) and images (llmjax.data.vision)
share: which names a run's labels have, in which order, and how a raw label becomes an id.

`label_names` (the argument, e.g. a run's labels.json, or config.data.label_names) fixes the set and
its order, and a label outside it is a DataError naming where it was read. Otherwise a dataset's
ClassLabel gives the names, else the training split does: integer labels sort numerically as
names "0", "1", ...; other labels sort as strings. An integer label matching no name of a
non-numeric `label_names` is an id: label i is label_names[i].
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from llmjax.errors import ConfigError, DataError, capped

INT = re.compile(r"-?\d+")


class Row(NamedTuple):
  """A labelled example before its label id."""
  text: str
  label: int | str  # raw: an integer or a name
  where: str  # for messages: file and row, tfds split and index; for stdlib the file


def shorten(names, n: int = 20) -> str:
  """The first n names, for messages."""
  return capped(names, n)


def resolve_names(cfg, given, train, dataset_names) -> tuple[tuple[str, ...], str]:
  """(label names, where they come from): `given`, config.data.label_names, the dataset's, or the
  training rows' (`train`, Rows)."""
  from_cfg = tuple(n.strip() for n in cfg.label_names.split(",")) if cfg.label_names else None
  if from_cfg and (not all(from_cfg) or len(set(from_cfg)) != len(from_cfg)):
    raise ConfigError(f"config.data.label_names={cfg.label_names!r} must be distinct, non-empty "
                      "comma-separated names")
  if given is not None:
    given = tuple(given)
    if len(set(given)) != len(given) or not all(isinstance(n, str) and n for n in given):
      raise ConfigError(f"label_names {given!r} must be distinct non-empty strings")
    if from_cfg and from_cfg != given:
      raise ConfigError(f"config.data.label_names={cfg.label_names!r} differs from this run's "
                        f"labels ({shorten(given)})")
    return given, "label_names given"
  if from_cfg:
    return from_cfg, "config.data.label_names"
  if dataset_names:
    return tuple(dataset_names), "dataset's ClassLabel"
  labels = {r.label for r in train}
  if all(isinstance(v, int) for v in labels):
    return tuple(str(v) for v in sorted(labels)), "training split"
  return tuple(sorted(str(v) for v in labels)), "training split"


def id_mapper(names: tuple[str, ...], names_from: str):
  """Row -> its label id into `names`; a label outside them is a DataError naming the row."""
  index = {n: i for i, n in enumerate(names)}
  ints_are_ids = not any(INT.fullmatch(n) for n in names)

  def ids(row: Row) -> int:
    if str(row.label) in index:
      return index[str(row.label)]
    if isinstance(row.label, int) and ints_are_ids and 0 <= row.label < len(names):
      return row.label
    raise DataError(f"{row.where}: label {row.label!r} is not one of the labels "
                    f"({shorten(names)}) from the {names_from}")
  return ids


def tfds_label(where: str, value: np.ndarray, names, key: str) -> int | str:
  """A tfds label value -> its raw label (a name, or an id when the dataset has no names)."""
  if value.ndim == 0 and value.dtype.kind in "SU":
    label = value.item()
    return label.decode("utf-8", errors="replace") if isinstance(label, bytes) else label
  if value.ndim != 0 or value.dtype.kind not in "iu":
    raise DataError(f"{where}: label {value!r} is not one integer or string")
  label = int(value)
  if label < 0:  # e.g. glue's test splits are published without labels
    raise DataError(f"{where}: label {label} means unlabelled; this split cannot be "
                    f"config.data.{key}")
  if names is None:
    return label
  if label >= len(names):
    raise DataError(f"{where}: label {label} is outside the dataset's {len(names)} classes")
  return names[label]
