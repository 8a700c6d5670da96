"""Labelled data: CSV/JSONL/tfds rows, label sets, deterministic splits, stdlib snippets, errors."""

import collections
import dataclasses
import json
import re

import numpy as np
import pytest

from llmjax.config import DataConfig
from llmjax.data import labelled
from llmjax.errors import ConfigError, DataError

_SENTIMENT = [(f"review number {i} was {'great' if i % 3 else 'awful'}", "pos" if i % 3 else "neg")
              for i in range(40)]


def _csv(path, rows, header=("text", "label"), delimiter=","):
  lines = [delimiter.join(header)] + [f'"{t}"{delimiter}{y}' for t, y in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _files(path, **kw):
  return DataConfig(source="files", files=str(path), **kw)


def test_csv_names_sort_alphabetically_and_val_splits_off_deterministically(tmp_path):
  cfg = _files(_csv(tmp_path / "train.csv", _SENTIMENT), val_fraction=0.25)
  a, b = labelled.load_labelled(cfg), labelled.load_labelled(cfg)
  assert a == b
  assert a.label_names == ("neg", "pos")
  names = dict(_SENTIMENT)
  assert all(a.label_names[y] == names[t] for t, y in a.train + a.val)
  assert sorted(t for t, _ in a.train + a.val) == sorted(names)  # disjoint and covering
  assert a.val and a.train and a.test == []
  assert a.description["counts"]["train"]["pos"] + a.description["counts"]["val"]["pos"] == 26
  json.dumps(a.description)
  other = labelled.load_labelled(dataclasses.replace(cfg, seed=1))
  assert {t for t, _ in other.val} != {t for t, _ in a.val}
  assert other.description["sha256"] != a.description["sha256"]


def test_integer_labels_sort_numerically_in_jsonl_and_csv(tmp_path):
  rows = [(f"text {i}", [10, 2, 0][i % 3]) for i in range(30)]
  jsonl = labelled.load_labelled(_files(_jsonl(tmp_path / "a.jsonl",
                                               [{"text": t, "label": y} for t, y in rows])))
  csv_ = labelled.load_labelled(_files(_csv(tmp_path / "a.csv", rows)))
  tsv = labelled.load_labelled(_files(_csv(tmp_path / "a.tsv", rows, delimiter="\t")))
  for got in (jsonl, csv_, tsv):
    assert got.label_names == ("0", "2", "10")
    assert all(got.label_names[y] == str(dict(rows)[t]) for t, y in got.train + got.val)
  assert jsonl.train == csv_.train == tsv.train


def test_given_label_names_fix_the_set_and_order(tmp_path):
  path = _csv(tmp_path / "train.csv", _SENTIMENT)
  given = labelled.load_labelled(_files(path), label_names=("pos", "neg"))
  from_cfg = labelled.load_labelled(_files(path, label_names="pos, neg"))
  assert given.label_names == from_cfg.label_names == ("pos", "neg")
  assert given.train == from_cfg.train
  assert all(("pos", "neg")[y] == dict(_SENTIMENT)[t] for t, y in given.train)
  with pytest.raises(DataError,
                     match=r"train\.csv row 2 \(line 2\): label 'neg' is not one of.*pos, meh"):
    labelled.load_labelled(_files(path), label_names=("pos", "meh"))
  with pytest.raises(ConfigError, match="config.data.label_names='pos,neg' differs"):
    labelled.load_labelled(_files(path, label_names="pos,neg"), label_names=("neg", "pos"))
  with pytest.raises(ConfigError, match="config.data.label_names"):
    labelled.load_labelled(_files(path, label_names="pos,pos"))
  # Integer labels with non-numeric names are ids; with numeric names they are names.
  ints = _csv(tmp_path / "ints.csv", [(t, int(y == "pos")) for t, y in _SENTIMENT])
  as_ids = labelled.load_labelled(_files(ints, label_names="neg,pos"))
  assert all(("neg", "pos")[y] == dict(_SENTIMENT)[t] for t, y in as_ids.train + as_ids.val)
  as_names = labelled.load_labelled(_files(ints), label_names=("1", "0"))
  assert all(y == int(dict(_SENTIMENT)[t] == "neg") for t, y in as_names.train)


def test_val_and_test_files_are_used_as_given_and_checked_against_train_labels(tmp_path):
  train = _csv(tmp_path / "train.csv", _SENTIMENT)
  val = _csv(tmp_path / "val.csv", [("fine val", "pos"), ("bad val", "neg")])
  test = _jsonl(tmp_path / "test.jsonl", [{"text": "a test", "label": "neg"}])
  got = labelled.load_labelled(_files(train, val_files=str(val), test_files=str(test)))
  assert len(got.train) == 40 and got.val == [("fine val", 1), ("bad val", 0)]
  assert got.test == [("a test", 0)]
  assert got.description["files"] == {"train": [str(train)], "val": [str(val)],
                                      "test": [str(test)]}
  _csv(tmp_path / "odd.csv", [("x", "pos"), ("y", "meh")])
  with pytest.raises(DataError, match=r"odd\.csv row 3 \(line 3\): label 'meh' is not one of the "
                                      r"labels \(neg, pos\) from the training split"):
    labelled.load_labelled(_files(train, val_files=str(tmp_path / "odd.csv")))
  with pytest.raises(DataError, match=r"config.data.test_files='.*nothing\*.csv' matches no files"):
    labelled.load_labelled(_files(train, test_files=str(tmp_path / "nothing*.csv")))


def test_class_count_errors(tmp_path):
  path = _csv(tmp_path / "train.csv", _SENTIMENT)
  assert len(labelled.load_labelled(_files(path), num_classes=2).label_names) == 2
  with pytest.raises(ConfigError, match=r"config.task.num_classes=3 .* 2 labels \(neg, pos\)"):
    labelled.load_labelled(_files(path), num_classes=3)
  one = _csv(tmp_path / "one.csv", [(f"t{i}", "pos") for i in range(5)])
  with pytest.raises(DataError, match="single class 'pos'"):
    labelled.load_labelled(_files(one))


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", 'body,label\n"x",pos\n',
     r"a\.csv row 1 \(header\): no column 'text' \(config.data.text_key\); columns: 'body', "
     "'label'"),
    ("a.csv", 'text,label\n"x",pos\n"",neg\n', r"a\.csv row 3 \(line 3\): empty text in 'text'"),
    ("a.csv", 'text,label\n"x",pos\ny,pos,extra\n',
     r"a\.csv row 3 \(line 3\): 3 fields, the header has 2"),
    ("a.csv", 'text,label\n"x",\n', r"a\.csv row 2 \(line 2\): label 'label' must be a non-empty"),
    ("a.csv", "", r"a\.csv is empty"),
    ("a.jsonl", '{"text": "x", "label": 1}\n\n{"text": "y", "label": 2,}\n',
     r"a\.jsonl line 3: not valid JSON"),
    ("a.jsonl", '{"text": "x", "label": 1}\n{"text": "y", "lab": 2}\n',
     r"a\.jsonl line 2: no field 'label' \(config.data.label_key\); fields: 'text', 'lab'"),
    ("a.jsonl", '{"text": "x", "label": 1.5}\n', r"a\.jsonl line 1: label 'label' must be .* 1\.5"),
    ("a.jsonl", '{"text": 3, "label": 1}\n', r"a\.jsonl line 1: text 'text' must be a string"),
    ("a.jsonl", '[1, 2]\n', r"a\.jsonl line 1: expected a JSON object, got list"),
    ("a.txt", "x\n", r"a\.txt: unknown extension '\.txt'"),
])
def test_bad_files_name_file_row_and_problem(tmp_path, name, content, message):
  (tmp_path / name).write_text(content)
  with pytest.raises(DataError, match=message):
    labelled.load_labelled(_files(tmp_path / name))


def test_unreadable_and_non_utf8_files(tmp_path, monkeypatch):
  bad = tmp_path / "bad.csv"
  bad.write_bytes(b"text,label\nok,pos\n\xff\xfe,neg\n")
  with pytest.raises(DataError, match=r"bad\.csv line 3 is not UTF-8"):
    labelled.load_labelled(_files(bad))
  good = _csv(tmp_path / "good.csv", _SENTIMENT)
  real = type(good).read_bytes

  def read_bytes(self):
    if self == good:
      raise PermissionError(13, "Permission denied")
    return real(self)
  monkeypatch.setattr(type(good), "read_bytes", read_bytes)
  with pytest.raises(DataError, match=r"cannot read labelled file .*good\.csv: Permission denied"):
    labelled.load_labelled(_files(good))
  with pytest.raises(DataError, match="config.data.val_files='.*none.csv' matches no files"):
    labelled.load_labelled(_files(bad, val_files=str(tmp_path / "none.csv")))


# --- stdlib ---------------------------------------------------------------------------------------

_STDLIB = DataConfig(source="stdlib", stdlib_classes=4, max_bytes=40_000, val_fraction=0.1)


@pytest.fixture(scope="module")
def stdlib_splits():
  return labelled.load_labelled(_STDLIB), labelled._stdlib_rows(_STDLIB)[0]


def test_stdlib_is_deterministic_with_k_classes_in_every_split(stdlib_splits):
  got, rows = stdlib_splits
  again = labelled.load_labelled(_STDLIB)
  assert got == again
  d = got.description
  assert len(got.label_names) == 4
  assert list(got.label_names) == d["packages"] == sorted(d["packages"])
  for split in ("train", "val", "test"):
    assert {y for _, y in getattr(got, split)} == set(range(4)), split
    assert [t for t, _ in getattr(got, split)] == [r.text for r in rows[split]]
  json.dumps(d)
  assert d["bytes_read"] < 1_500_000 and re.fullmatch("[0-9a-f]{64}", d["sha256"])
  counts = collections.Counter(y for _, y in got.train)
  assert max(counts.values()) <= labelled._TRAIN_CAP * min(counts.values())
  assert d["train_cap_per_class"] == labelled._TRAIN_CAP * min(counts.values())


def test_stdlib_splits_by_file_and_only_packages(stdlib_splits):
  got, rows = stdlib_splits
  files = {s: {r.where for r in rows[s]} for s in rows}
  assert not files["train"] & files["val"] and not files["train"] & files["test"]
  assert not files["val"] & files["test"]
  for s, split_rows in rows.items():
    for r in split_rows:
      assert r.where.split("/")[0] == r.label  # a package's file, never a top-level module
      assert len(r.text) <= labelled._SNIPPET_CHARS
      assert sum(bool(line.strip()) for line in r.text.splitlines()) <= labelled._SNIPPET_LINES
      assert len("".join(r.text.split())) >= labelled._MIN_SNIPPET_CHARS
  assert got.description["files"] == {s: len(f) for s, f in files.items()}
  reseeded = labelled._stdlib_rows(dataclasses.replace(_STDLIB, seed=3))[0]
  assert {r.where for r in reseeded["val"]} != files["val"]


def test_snippets_are_consecutive_lines_without_nearly_empty_ones():
  body = "".join(f"value_{i} = compute_something({i})\n" for i in range(36))
  snippets = labelled._snippets("\n\n" + body + "\n)\n")
  assert [s.count("\n") + 1 for s in snippets] == [12, 12, 12]
  assert "".join(s + "\n" for s in snippets) == body  # leading blanks and the ")" tail dropped
  spaced = labelled._snippets("total = alpha + beta + gamma\n\n" * 14)  # blank lines don't count
  assert [s.count("total") for s in spaced] == [12] and spaced[0].count("\n") == 22
  assert labelled._snippets("x" * 2000) == ["x" * 512]


def test_file_split_gives_every_split_a_file():
  cfg = DataConfig(val_fraction=0.05)
  for n in (3, 4, 10, 50):
    files = [f"pkg/m{i}.py" for i in range(n)]
    split_of = labelled._split_files(cfg, files)
    assert set(split_of) == set(files) and set(split_of.values()) == {"train", "val", "test"}
  assert collections.Counter(labelled._split_files(cfg, files).values())["train"] >= 40


def test_stdlib_errors_name_the_key():
  with pytest.raises(DataError, match="config.data.stdlib_classes=500"):
    labelled.load_labelled(dataclasses.replace(_STDLIB, stdlib_classes=500))
  with pytest.raises(ConfigError, match="config.data.val_fraction=0.5"):
    labelled.load_labelled(dataclasses.replace(_STDLIB, val_fraction=0.5))
  with pytest.raises(ConfigError, match=r"config.task.num_classes=5 .* 4 labels"):
    labelled.load_labelled(_STDLIB, num_classes=5)


# --- tfds -----------------------------------------------------------------------------------------


@pytest.fixture
def tfds_mock(monkeypatch):
  """tfds.testing.mock_data; `records` (split -> list of dicts) replaces its random examples."""
  import tensorflow_datasets as tfds  # slow import; only these tests need it
  # mock_data leaves is_prepared alone, which _tfds_source checks before reading.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)

  def mock(records=None):
    as_data_source = None if records is None else (lambda self, split, **kw: records[split])
    return tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE,
                                  as_data_source_fn=as_data_source)
  return mock


def test_tfds_class_label_names_and_splits(tfds_mock):
  reviews = [{"text": f"review {i}".encode(), "label": np.int64(i % 2)} for i in range(30)]
  records = {"train": reviews, "test": reviews[:4],
             "unsupervised": [{"text": b"x", "label": np.int64(-1)}]}
  cfg = DataConfig(source="tfds", tfds_name="imdb_reviews", tfds_test_split="test")
  with tfds_mock(records):
    got = labelled.load_labelled(cfg)
    assert got == labelled.load_labelled(cfg)
    assert got.label_names == ("neg", "pos")
    assert sorted(got.train + got.val) == sorted((f"review {i}", i % 2) for i in range(30))
    assert got.val and got.test == [(f"review {i}", i % 2) for i in range(4)]
    assert got.description["labels_from"] == "dataset's ClassLabel"
    with pytest.raises(DataError, match=r"split 'unsupervised' row 0: label -1 means unlabelled; "
                                        "this split cannot be config.data.tfds_test_split"):
      labelled.load_labelled(dataclasses.replace(cfg, tfds_test_split="unsupervised"))
    with pytest.raises(DataError, match="no field config.data.text_key='content'; available: "
                                        "label, text"):
      labelled.load_labelled(dataclasses.replace(cfg, text_key="content"))
    with pytest.raises(ConfigError, match=r"num_classes=4 .* 2 labels \(neg, pos\)"):
      labelled.load_labelled(cfg, num_classes=4)


def test_tfds_random_mock_records_read_as_real_ones(tfds_mock):
  cfg = DataConfig(source="tfds", tfds_name="ag_news_subset", text_key="description",
                   tfds_val_split="test")
  with tfds_mock():
    got = labelled.load_labelled(cfg)
  assert got.label_names == ("World", "Sports", "Business", "Sci/Tech")
  assert len(got.train) == len(got.val) == 16 and all(isinstance(t, str) for t, _ in got.train)
  assert got.description["splits"] == {"train": "train", "val": "test", "test": None}
  assert sum(got.description["counts"]["train"].values()) == 16
