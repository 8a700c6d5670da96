"""Labelled text for classification: (text, label id) splits from CSV/JSONL files, tfds or stdlib.

Labels (the policy in llmjax.data.labels, which images share): `label_names` (the argument, e.g.
a run's labels.json, or config.data.label_names) fixes the set and its order, and a label outside
it is a DataError naming where it was read. Otherwise a tfds ClassLabel gives the names, else the
training split does: integer labels (ints, or digit strings in CSV/JSON) sort numerically as names
"0", "1", ...; other labels sort as strings. An integer label matching no name of a non-numeric
`label_names` is an id: label i is label_names[i].

files: an empty (whitespace-only) text is a DataError: in a file the user controls it almost always
means a wrong column or a broken row. tfds rows are kept as published, so benchmark splits stay
comparable. For both, max_bytes > 0 keeps each split's rows until that many bytes of text are read.

stdlib: snippets of the standard library's packages labelled by package (see `_SNIPPET_LINES`),
the K most common, split by file, the training split capped per class (see `_TRAIN_CAP`).
max_bytes > 0 reads about that much of each package, the head of each of its files.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import pathlib
import sys

import numpy as np

from llmjax.config import DataConfig
from llmjax.data.labels import INT, Row, id_mapper, resolve_names, shorten, tfds_label
from llmjax.data.sources import (glob_files, read_files, require_fields, stdlib_files, stdlib_root,
                                 take_bytes, tfds_labelled_sources)
from llmjax.data.text import split_documents, unit_hash
from llmjax.errors import ConfigError, DataError

_SPLITS = ("train", "val", "test")
# A snippet: consecutive lines, at most 12 non-blank and 512 characters. Long enough to carry a
# package's idioms (imports, names, docstrings), short enough that the byte tokenizer or a trained
# BPE fits it in a 128-512 token sequence and one file gives many examples.
_SNIPPET_LINES, _SNIPPET_CHARS = 12, 512
_MIN_SNIPPET_CHARS = 64  # non-whitespace; fewer is a nearly empty tail (`)`, `"""`, blank lines)
# A package needs snippets from this many files, so the file-disjoint split gives it train, val
# and test files (pydoc_data, one generated file, cannot be split).
_MIN_PACKAGE_FILES = 3
# Training snippets per class are capped at this multiple of the smallest class's: encodings and
# idlelib would otherwise hold ~5x the rarest class, and the majority baseline would be high.
_TRAIN_CAP = 2


@dataclasses.dataclass(frozen=True)
class LabelledSplits:
  """Train, validation and (possibly empty) test rows of (text, label id), with label names."""
  train: list[tuple[str, int]]
  val: list[tuple[str, int]]
  test: list[tuple[str, int]]
  label_names: tuple[str, ...]
  description: dict


def load_labelled(cfg: DataConfig, label_names: tuple[str, ...] | None = None,
                  num_classes: int = 0) -> LabelledSplits:
  """The configured labelled splits; bad rows, labels or class counts raise a named UserError."""
  readers = {"files": _files_rows, "tfds": _tfds_rows, "stdlib": _stdlib_rows}
  if cfg.source not in readers:
    raise DataError(f"config.data.source={cfg.source!r} is not one of {', '.join(readers)}")
  splits, dataset_names, description = readers[cfg.source](cfg)
  names, names_from = resolve_names(cfg, label_names, splits["train"], dataset_names)
  if num_classes > 0 and num_classes != len(names):
    raise ConfigError(f"config.task.num_classes={num_classes} but the data has {len(names)} "
                      f"labels ({shorten(names)}); set it to {len(names)} or 0 (from the data)")
  ids = id_mapper(names, names_from)
  out = {s: [(r.text, ids(r)) for r in rows] for s, rows in splits.items()}
  present = sorted({i for _, i in out["train"]})
  if len(present) < 2:
    got = f"the single class {names[present[0]]!r}" if present else "no rows"
    raise DataError(f"{description['data']}: the training split has {got}; a classifier needs "
                    "2 or more classes")
  digest = hashlib.sha256()
  for s in _SPLITS:
    for text, i in out[s]:
      digest.update(json.dumps([s, i, text], ensure_ascii=False).encode("utf-8") + b"\n")
  description.update(
      label_names=list(names), labels_from=names_from, max_bytes=cfg.max_bytes, seed=cfg.seed,
      sizes={s: len(out[s]) for s in _SPLITS},
      counts={s: dict(zip(names, np.bincount([i for _, i in out[s]], minlength=len(names))
                          .tolist())) for s in _SPLITS},
      sha256=digest.hexdigest())
  return LabelledSplits(out["train"], out["val"], out["test"], names, description)


def _split_off_val(cfg: DataConfig, train: list[Row], what: str) -> tuple[list[Row], list[Row]]:
  """Validation rows split off training rows by a stable hash of (seed, text)."""
  if len(train) < 2:
    raise DataError(f"{what}: {len(train)} training row(s); splitting off validation needs 2+")
  kept, val = split_documents([(r.text, r) for r in train], cfg.val_fraction, cfg.seed)
  return [r for _, r in kept], [r for _, r in val]


# --- source=files -------------------------------------------------------------------------------


def _files_rows(cfg: DataConfig):
  what = f"config.data.files={cfg.files!r}"
  globs = {"train": ("files", cfg.files), "val": ("val_files", cfg.val_files),
           "test": ("test_files", cfg.test_files)}
  files = {}
  for split, (key, pattern) in globs.items():  # every glob before reading: fail fast
    try:
      files[split] = [str(p) for p in glob_files(pattern)] if pattern else []
    except DataError as e:
      raise DataError(f"config.data.{key}={pattern!r} matches no files") from e
  splits = {}
  for split, (key, pattern) in globs.items():
    rows = [row for path in files[split] for row in _read_table(pathlib.Path(path), cfg)]
    if pattern and not rows:
      raise DataError(f"config.data.{key}={pattern!r}: its files hold no rows")
    splits[split] = [r for r, _ in take_bytes([(r, r.text) for r in rows], cfg.max_bytes)]
  if not cfg.val_files:
    splits["train"], splits["val"] = _split_off_val(cfg, splits["train"], what)
    files["val"] = f"split off train (val_fraction={cfg.val_fraction}, seed={cfg.seed})"
  return splits, None, {"data": what, "source": "files", "files": files,
                        "text_key": cfg.text_key, "label_key": cfg.label_key}


def _read_table(path: pathlib.Path, cfg: DataConfig) -> list[Row]:
  kind = {".csv": ",", ".tsv": "\t", ".jsonl": "json", ".json": "json"}.get(path.suffix.lower())
  if kind is None:
    raise DataError(f"labelled file {path}: unknown extension {path.suffix!r}; allowed .csv, "
                    ".tsv (tab-separated), .jsonl or .json (one JSON object per line)")
  try:
    text = path.read_bytes().decode("utf-8-sig")
  except OSError as e:
    raise DataError(f"cannot read labelled file {path}: {e.strerror}") from e
  except UnicodeDecodeError as e:
    line = path.read_bytes()[:e.start].count(b"\n") + 1
    raise DataError(f"labelled file {path} line {line} is not UTF-8 text") from e
  records = _json_records(path, text) if kind == "json" else _csv_records(path, text, kind, cfg)
  return [Row(_text_of(where, record, cfg.text_key), _label_of(where, record, cfg.label_key),
               where) for where, record in records]


def _csv_records(path, text: str, delimiter: str, cfg: DataConfig):
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  try:
    header = next(reader, None)
    if header is None:
      raise DataError(f"labelled file {path} is empty (no header row)")
    for key, role in ((cfg.text_key, "text_key"), (cfg.label_key, "label_key")):
      if key not in header:
        raise DataError(f"labelled file {path} row 1 (header): no column {key!r} "
                        f"(config.data.{role}); columns: {', '.join(map(repr, header))}")
    for i, fields in enumerate(reader, start=2):
      where = f"{path} row {i} (line {reader.line_num})"
      if not fields:
        continue  # a blank line
      if len(fields) != len(header):
        raise DataError(f"{where}: {len(fields)} fields, the header has {len(header)}; quote "
                        f"fields that contain {delimiter!r}, quotes or newlines")
      yield where, dict(zip(header, fields))
  except csv.Error as e:
    raise DataError(f"labelled file {path} line {reader.line_num}: not valid CSV ({e})") from e


def _json_records(path, text: str):
  for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON allows raw U+2028
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"labelled file {path} line {n}: not valid JSON ({e.msg} at column "
                      f"{e.colno})") from e
    if not isinstance(record, dict):
      raise DataError(f"labelled file {path} line {n}: expected a JSON object, got "
                      f"{type(record).__name__}")
    yield f"{path} line {n}", record


def _field(where: str, record: dict, key: str, role: str):
  if key not in record:
    raise DataError(f"{where}: no field {key!r} (config.data.{role}); fields: "
                    f"{', '.join(map(repr, record))}")
  return record[key]


def _text_of(where: str, record: dict, key: str) -> str:
  text = _field(where, record, key, "text_key")
  if not isinstance(text, str):
    raise DataError(f"{where}: text {key!r} must be a string, got {text!r}")
  if not text.strip():
    raise DataError(f"{where}: empty text in {key!r}; remove the row or fix its quoting")
  return text


def _label_of(where: str, record: dict, key: str) -> int | str:
  value = _field(where, record, key, "label_key")
  if isinstance(value, str) and value.strip():
    value = value.strip()
    return int(value) if INT.fullmatch(value) else value
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  raise DataError(f"{where}: label {key!r} must be a non-empty string or an integer, "
                  f"got {value!r}")


# --- source=tfds --------------------------------------------------------------------------------


def _tfds_rows(cfg: DataConfig):
  what = f"tfds dataset {cfg.tfds_name!r}"
  names, sources = tfds_labelled_sources(cfg)
  splits = {s: [] for s in _SPLITS}
  for s, (key, split, source) in sources.items():
    splits[s] = _read_tfds_split(cfg, source, key, split, names)
  read = {s: sources[s][1] if s in sources else None for s in _SPLITS}
  if not cfg.tfds_val_split:
    splits["train"], splits["val"] = _split_off_val(cfg, splits["train"], what)
    read["val"] = (f"split off {cfg.tfds_split} (val_fraction={cfg.val_fraction}, "
                   f"seed={cfg.seed})")
  return splits, names, {"data": what, "source": "tfds", "tfds_name": cfg.tfds_name,
                         "splits": read, "text_key": cfg.text_key, "label_key": cfg.label_key}


def _read_tfds_split(cfg: DataConfig, source, key: str, split: str, names) -> list[Row]:
  rows, total = [], 0
  for i in range(len(source)):
    record, where = source[i], f"tfds dataset {cfg.tfds_name!r} split {split!r} row {i}"
    require_fields(record, cfg, ("text_key", "label_key"))
    text = np.asarray(record[cfg.text_key]).item()
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    if not isinstance(text, str):
      raise DataError(f"{where}: field config.data.text_key={cfg.text_key!r} is not text")
    rows.append(Row(text, tfds_label(where, np.asarray(record[cfg.label_key]), names, key),
                     where))
    total += len(text.encode("utf-8"))
    if 0 < cfg.max_bytes <= total:
      break
  return rows


# --- source=stdlib ------------------------------------------------------------------------------


def _snippets(text: str) -> list[str]:
  """Consecutive lines, at most _SNIPPET_LINES non-blank and _SNIPPET_CHARS; none nearly empty."""
  out, lines, nonblank, chars = [], [], 0, 0
  for line in text.splitlines(keepends=True):
    line = line[:_SNIPPET_CHARS]
    if lines and (nonblank == _SNIPPET_LINES or chars + len(line) > _SNIPPET_CHARS):
      out.append("".join(lines).rstrip())
      lines, nonblank, chars = [], 0, 0
    if lines or line.strip():  # a snippet starts on a non-blank line
      lines.append(line)
      nonblank, chars = nonblank + bool(line.strip()), chars + len(line)
  out.append("".join(lines).rstrip())
  return [s for s in out if len("".join(s.split())) >= _MIN_SNIPPET_CHARS]


def _stdlib_rows(cfg: DataConfig):
  """Snippets of the K most common packages, split by file; Row.where is the file."""
  root, k = stdlib_root(), cfg.stdlib_classes
  if not 0 < cfg.val_fraction < 0.5:
    raise ConfigError(f"config.data.val_fraction={cfg.val_fraction} must be below 0.5 for "
                      "source='stdlib' (test takes the same fraction of files again)")
  packages = collections.defaultdict(list)
  for f in stdlib_files():
    parts = f.relative_to(root).parts
    if len(parts) > 1:  # top-level modules have no package
      packages[parts[0]].append(f)
  snippets, bytes_read = {}, 0  # package -> [(file, snippet)]
  for package, files in sorted(packages.items()):
    # max_bytes: per package, spread over its files (the head of each, at least one snippet's
    # worth), so every file still gives snippets and the file split stays balanced in small runs.
    budget = max(_SNIPPET_CHARS, cfg.max_bytes // len(files)) if cfg.max_bytes > 0 else None
    docs = [(name, t[:budget]) for name, t in read_files(files, root)]
    bytes_read += sum(len(t.encode("utf-8")) for _, t in docs)
    snippets[package] = [(name, s) for name, t in docs for s in _snippets(t)]
  eligible = [p for p, s in snippets.items() if len({f for f, _ in s}) >= _MIN_PACKAGE_FILES]
  if len(eligible) < k:
    cap = f" within config.data.max_bytes={cfg.max_bytes} per package" if cfg.max_bytes else ""
    raise DataError(f"config.data.stdlib_classes={k}, but the standard library at {root} has "
                    f"{len(eligible)} packages with snippets in {_MIN_PACKAGE_FILES}+ files{cap}")
  chosen = sorted(sorted(eligible, key=lambda p: (-len(snippets[p]), p))[:k])
  splits = {s: [] for s in _SPLITS}
  for package in chosen:
    split_of = _split_files(cfg, sorted({f for f, _ in snippets[package]}))
    for name, snippet in snippets[package]:
      splits[split_of[name]].append(Row(snippet, package, name))
  splits["train"], cap = _cap_train(cfg, splits["train"])
  return splits, None, {
      "data": f"config.data.source='stdlib' ({root})", "source": "stdlib", "root": str(root),
      "python": sys.version.split()[0], "packages": chosen, "bytes_read": bytes_read,
      "snippet": {"max_lines": _SNIPPET_LINES, "max_chars": _SNIPPET_CHARS,
                  "min_chars": _MIN_SNIPPET_CHARS},
      "files": {s: len({r.where for r in rows}) for s, rows in splits.items()},
      "split_fractions": {"val": cfg.val_fraction, "test": cfg.val_fraction},
      "train_cap_per_class": cap}


def _split_files(cfg: DataConfig, files: list[str]) -> dict[str, str]:
  """Each file's split by a stable hash u of (seed, path): val u < f, test u < 2f, else train.

  Every split keeps at least one of the package's (3+) files: files move across in u order.
  """
  order = sorted(files, key=lambda f: unit_hash(cfg.seed, f))
  u = [unit_hash(cfg.seed, f) for f in order]
  n_val = max(1, sum(x < cfg.val_fraction for x in u))
  n_test = max(1, sum(x < 2 * cfg.val_fraction for x in u) - n_val)
  while n_val + n_test >= len(order):
    n_val, n_test = (n_val - 1, n_test) if n_val > n_test else (n_val, n_test - 1)
  return {f: "val" if i < n_val else "test" if i < n_val + n_test else "train"
          for i, f in enumerate(order)}


def _cap_train(cfg: DataConfig, rows: list[Row]) -> tuple[list[Row], int]:
  """At most _TRAIN_CAP x the smallest class per class; kept rows by stable hash, order kept."""
  by_class = collections.defaultdict(list)
  for i, r in enumerate(rows):
    by_class[r.label].append(i)
  cap = _TRAIN_CAP * min(len(v) for v in by_class.values())
  keep = set()
  for idx in by_class.values():
    keep.update(sorted(idx, key=lambda i: unit_hash(cfg.seed, f"{rows[i].where}\0{i}"))[:cap])
  return [r for i, r in enumerate(rows) if i in keep], cap
