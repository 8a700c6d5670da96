"""Parallel text for seq2seq: (source, target) pairs from TSV/JSONL files, gettext catalogs or tfds.

Splits: a split the config does not name as files (val_files, test_files) or a tfds split
(tfds_val_split, tfds_test_split) is cut from the training pairs by a stable hash of the SOURCE
text and the seed (`split_pairs`): one source is never in two splits, and a pair keeps its split
when others are added or removed. Given splits are used as given; the manifest counts their
sources that also occur in train (`overlap`).

max_bytes > 0 (smoke runs): each split keeps its pairs, in reading order, until that many bytes
of source and target text have been read.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from collections.abc import Iterable, Iterator

import numpy as np

from llmjax.config import DataConfig
from llmjax.data.gettext_pairs import gettext_pairs, pairs_sha256
from llmjax.data.sources import glob_files, require_fields, tfds_labelled_sources
from llmjax.data.text import unit_hash
from llmjax.errors import DataError

__all__ = ["ParallelCorpus", "gettext_pairs", "load_parallel", "read_jsonl", "read_tsv",
           "split_pairs"]

Pair = tuple[str, str]
_SPLITS = ("train", "val", "test")
_READERS = {".tsv": "tsv", ".jsonl": "jsonl"}


@dataclasses.dataclass(frozen=True)
class ParallelCorpus:
  """Train, validation and (possibly empty) test (source, target) pairs, and what was read."""
  train: list[Pair]
  val: list[Pair]
  test: list[Pair]
  manifest: dict


# --- files -------------------------------------------------------------------------------------


def _lines(path) -> Iterator[tuple[int, str]]:
  """(line number, line) of a UTF-8 file's non-blank lines; unreadable files are DataErrors."""
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise DataError(f"cannot read parallel-text file {path}: {e.strerror}") from e
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not UTF-8 text") from e
  for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is text
    line = line.rstrip("\r")
    if line.strip():
      yield n, line


def _checked(where: str, source, target, what: str) -> Pair:
  for side, text in (("source", source), ("target", target)):
    if not isinstance(text, str):
      raise DataError(f"{where}: the {side} {what} must be a string, got {text!r}")
    if not text.strip():
      raise DataError(f"{where}: empty {side} {what}; remove the line or fill it in")
  return source.strip(), target.strip()


def read_tsv(path, source_key: str = "source", target_key: str = "target") -> list[Pair]:
  """source<TAB>target lines; a first line `source<TAB>target` (or the keys) is a header."""
  headers = {("source", "target"), (source_key, target_key)}
  pairs = []
  for n, line in _lines(path):
    fields = line.split("\t")
    if len(fields) != 2:
      raise DataError(f"{path}:{n}: {len(fields)} tab-separated field(s), expected 2 "
                      "(source<TAB>target)")
    if n == 1 and tuple(fields) in headers:
      continue
    pairs.append(_checked(f"{path}:{n}", *fields, "field"))
  return pairs


def read_jsonl(path, source_key: str = "source", target_key: str = "target") -> list[Pair]:
  """One JSON object a line, with non-empty strings under source_key and target_key."""
  pairs = []
  for n, line in _lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
      raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    for key, role in ((source_key, "source_key"), (target_key, "target_key")):
      if key not in record:
        raise DataError(f"{path}:{n}: no key {key!r} (config.data.{role}); keys: "
                        f"{', '.join(map(repr, record)) or 'none'}")
    pairs.append(_checked(f"{path}:{n}", record[source_key], record[target_key], "value"))
  return pairs


def _read_file(path: pathlib.Path, cfg: DataConfig) -> list[Pair]:
  kind = _READERS.get(path.suffix.lower())
  if kind is None:
    raise DataError(f"parallel-text file {path}: unknown extension {path.suffix!r}; allowed: "
                    ".tsv (source<TAB>target) or .jsonl ({source_key, target_key} objects)")
  reader = read_tsv if kind == "tsv" else read_jsonl
  return reader(path, cfg.source_key, cfg.target_key)


def _files_splits(cfg: DataConfig) -> tuple[dict, dict]:
  if not cfg.files:
    raise DataError("config.data.files must be a glob of .tsv or .jsonl files when "
                    "config.data.source='files'")
  globs = {"train": ("files", cfg.files), "val": ("val_files", cfg.val_files),
           "test": ("test_files", cfg.test_files)}
  files = {}
  for split, (key, pattern) in globs.items():  # every glob before reading any file: fail fast
    if pattern:
      try:
        files[split] = glob_files(pattern)
      except DataError as e:
        raise DataError(f"config.data.{key}={pattern!r} matches no files") from e
  splits = {s: _take_bytes((p for f in fs for p in _read_file(f, cfg)), cfg.max_bytes)
            for s, fs in files.items()}
  return splits, {"source": "files", "files": {s: [str(f) for f in fs] for s, fs in files.items()},
                  "source_key": cfg.source_key, "target_key": cfg.target_key}


# --- gettext -----------------------------------------------------------------------------------


def _gettext_splits(cfg: DataConfig) -> tuple[dict, dict]:
  if cfg.source_lang == cfg.target_lang or "en" not in (cfg.source_lang, cfg.target_lang):
    raise DataError(f"config.data.source='gettext' translates from or to English: one of "
                    f"config.data.source_lang={cfg.source_lang!r} and target_lang="
                    f"{cfg.target_lang!r} must be 'en', the other a language under "
                    f"{cfg.locale_dir}")
  reverse = cfg.target_lang == "en"
  pairs, manifest = gettext_pairs(cfg.locale_dir, cfg.source_lang if reverse else cfg.target_lang)
  if reverse:
    pairs = sorted((t, s) for s, t in pairs)
  return {"train": _take_bytes(pairs, cfg.max_bytes)}, {
      "source": "gettext", "direction": f"{cfg.source_lang}->{cfg.target_lang}",
      "gettext": manifest}


# --- tfds --------------------------------------------------------------------------------------


def _tfds_splits(cfg: DataConfig) -> tuple[dict, dict]:
  # tfds imports its legacy builders (wmt*_translate, ted_*, opus, ...) lazily, and tfds.builder
  # does not trigger it: register them so a translation dataset's code is found by name.
  importlib.import_module("tensorflow_datasets.translate")
  _, sources = tfds_labelled_sources(cfg)
  splits = {s: _take_bytes(_tfds_pairs(cfg, split, source), cfg.max_bytes)
            for s, (_, split, source) in sources.items()}
  return splits, {"source": "tfds", "tfds_name": cfg.tfds_name,
                  "tfds_splits": {s: split for s, (_, split, _) in sources.items()},
                  "source_lang": cfg.source_lang, "target_lang": cfg.target_lang}


def _text(value) -> str:
  value = np.asarray(value).item() if not isinstance(value, (str, bytes)) else value
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _tfds_pairs(cfg: DataConfig, split: str, source) -> Iterator[Pair]:
  """The split's (source, target) texts in order; empty sides are skipped, as they teach nothing."""
  for i in range(len(source)):
    record = source[i]
    require_fields(record, cfg, ("source_lang", "target_lang"), split)
    pair = _text(record[cfg.source_lang]).strip(), _text(record[cfg.target_lang]).strip()
    if pair[0] and pair[1]:
      yield pair


# --- splits and the corpus ---------------------------------------------------------------------


def _take_bytes(pairs: Iterable[Pair], max_bytes: int) -> list[Pair]:
  """Pairs in order until max_bytes of text have been read (0: all)."""
  out, total = [], 0
  for pair in pairs:
    out.append(pair)
    total += len(pair[0].encode("utf-8")) + len(pair[1].encode("utf-8"))
    if 0 < max_bytes <= total:
      break
  return out


def split_pairs(pairs: list[Pair], val_fraction: float, test_fraction: float,
                seed: int) -> tuple[list[Pair], list[Pair], list[Pair]]:
  """(train, val, test) by u = a stable hash of (seed, source) in [0, 1): val u < val_fraction,
  test u < val_fraction + test_fraction, else train; pairs keep their order within a split."""
  if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
    raise DataError(f"config.data.val_fraction={val_fraction} and test_fraction="
                    f"{test_fraction} must be >= 0 with a sum below 1")
  out = ([], [], [])
  for pair in pairs:
    u = unit_hash(seed, pair[0])
    out[0 if u >= val_fraction + test_fraction else 1 if u < val_fraction else 2].append(pair)
  return out


def load_parallel(cfg: DataConfig) -> ParallelCorpus:
  """The configured parallel text as train/val/test pairs; bad input raises a named DataError."""
  readers = {"files": _files_splits, "gettext": _gettext_splits, "tfds": _tfds_splits}
  if cfg.source not in readers:
    raise DataError(f"config.data.source={cfg.source!r} is not one of {', '.join(readers)} "
                    "for parallel text")
  splits, manifest = readers[cfg.source](cfg)
  given = {s for s in splits if s != "train"}
  train, val, test = split_pairs(splits["train"], 0.0 if "val" in given else cfg.val_fraction,
                                 0.0 if "test" in given else cfg.test_fraction, cfg.seed)
  out = {"train": train, "val": splits.get("val", val), "test": splits.get("test", test)}
  _check_nonempty(cfg, out, given)
  train_sources = {s for s, _ in out["train"]}
  manifest.update(
      split_by={s: "given" if s in given else
                f"source hash (fraction={cfg.val_fraction if s == 'val' else cfg.test_fraction}, "
                f"seed={cfg.seed})" for s in ("val", "test")},
      max_bytes=cfg.max_bytes, counts={s: len(out[s]) for s in _SPLITS},
      overlap={s: sum(src in train_sources for src, _ in out[s]) for s in ("val", "test")},
      sha256=pairs_sha256((s, *pair) for s in _SPLITS for pair in out[s]))
  return ParallelCorpus(out["train"], out["val"], out["test"], manifest)


def _check_nonempty(cfg: DataConfig, out: dict, given: set) -> None:
  what = {"files": f"config.data.files={cfg.files!r}", "tfds": f"tfds dataset {cfg.tfds_name!r}",
          "gettext": f"gettext catalogs under {cfg.locale_dir}"}[cfg.source]
  if not out["train"]:
    raise DataError(f"{what}: no training pairs")
  for s in given:
    key = f"{s}_files" if cfg.source == "files" else f"tfds_{s}_split"
    if not out[s]:
      raise DataError(f"config.data.{key}={getattr(cfg, key)!r}: no {s} pairs")
  for s, fraction in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
    if s not in given and fraction > 0 and not out[s]:
      raise DataError(f"{what}: config.data.{s}_fraction={fraction} of "
                      f"{sum(map(len, out.values()))} pairs gave no {s} pairs; use more data "
                      "or a larger fraction")
