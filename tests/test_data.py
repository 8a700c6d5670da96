"""Data stack: packing invariants, document splits, grain order/resume/sharding, sources."""

import dataclasses
import os
import pathlib
import re
import shutil

import json

import numpy as np
import pytest

from llmjax.config import DataConfig
from llmjax.data import sources, text, tokenizers
from llmjax.errors import DataError


def _random_docs(rng, n, max_len):
  return [rng.integers(1, 1000, size=rng.integers(0, max_len)).astype(np.int32) for _ in range(n)]


def _unique_rows(n_rows, seq_len=4):
  tokens = np.arange(n_rows * seq_len, dtype=np.int32).reshape(n_rows, seq_len)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens)}


def _take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_pack_keeps_every_token_once_and_never_joins_documents(seq_len):
  docs = _random_docs(np.random.default_rng(seq_len), 40, 30)
  packed = text.pack(docs, seq_len)
  tokens, seg = packed["tokens"], packed["segment_ids"]
  assert tokens.dtype == seg.dtype == np.int32 and tokens.shape == seg.shape
  assert tokens.shape[1] == seq_len
  np.testing.assert_array_equal(tokens[seg > 0], np.concatenate(docs))
  flat = seg.reshape(-1)
  n_real = int((flat > 0).sum())
  assert (flat[:n_real] > 0).all() and (flat[n_real:] == 0).all()  # padding only at the end
  assert len(flat) - n_real < seq_len
  doc_of_token = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
  doc = np.full(flat.shape, -1)
  doc[:n_real] = doc_of_token
  doc = doc.reshape(seg.shape)
  for r in range(seg.shape[0]):
    real = seg[r] > 0
    assert seg[r, 0] == 1
    np.testing.assert_array_equal(np.diff(seg[r][real]) > 0, np.diff(doc[r][real]) != 0)
    assert set(np.diff(seg[r][real])) <= {0, 1}


def test_pack_of_nothing_is_zero_rows():
  assert text.pack([np.zeros(0, np.int32)], 8)["tokens"].shape == (0, 8)


def test_split_is_disjoint_covering_and_stable():
  docs = [(f"doc{i}.py", "x") for i in range(200)]
  train, val = text.split_documents(docs, 0.1, seed=3)
  names = lambda ds: {n for n, _ in ds}
  assert names(train).isdisjoint(names(val))
  assert names(train) | names(val) == names(docs)
  assert 5 < len(val) < 40
  assert text.split_documents(docs, 0.1, seed=3) == (train, val)
  assert text.split_documents(docs, 0.1, seed=4) != (train, val)
  for n in (2, 3):
    tr, va = text.split_documents(docs[:n], 0.001, seed=0)
    assert tr and va and len(tr) + len(va) == n


def test_seeded_order_is_deterministic_and_resumes_exactly():
  rows = _unique_rows(20)
  make = lambda seed: text.batch_iterator(rows, 4, seed=seed, shuffle=True, num_epochs=None)
  first = _take(make(0), 12)  # 12 batches of 4 cross two epochs of 20 rows
  np.testing.assert_array_equal(first, _take(make(0), 12))
  assert not np.array_equal(first, _take(make(1), 12))
  epoch = np.concatenate(first[:5])
  assert sorted(epoch[:, 0].tolist()) == sorted(rows["tokens"][:, 0].tolist())

  it = make(0)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = make(0)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 6), expected)


def test_unshuffled_iterator_reads_rows_in_order():
  rows = _unique_rows(9)
  got = list(text.batch_iterator(rows, 3, seed=0, shuffle=False, num_epochs=1))
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in got]), rows["tokens"])
  assert all(b["segment_ids"].dtype == np.int32 for b in got)


def test_processes_rows_put_together_are_the_one_process_batches():
  """Any split of the global batch between processes reads the same steps, and resumes alike."""
  rows = _unique_rows(21)
  one = _take(text.batch_iterator(rows, 4, seed=5, shuffle=True, num_epochs=None), 12)
  for parts in ([slice(0, 2), slice(2, 4)], [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]):
    iterators = [text.batch_iterator(rows, 4, seed=5, shuffle=True, num_epochs=None, rows=r)
                 for r in parts]
    for step, want in enumerate(one):
      got = np.concatenate([next(it)["tokens"] for it in iterators])
      np.testing.assert_array_equal(got, want, err_msg=f"{len(parts)} processes, step {step}")
  half = text.batch_iterator(rows, 4, seed=5, shuffle=True, num_epochs=None, rows=slice(2, 4))
  _take(half, 5)
  whole = text.batch_iterator(rows, 4, seed=5, shuffle=True, num_epochs=None)
  whole.set_state(half.get_state())  # 2 processes -> 1: same position
  np.testing.assert_array_equal(_take(whole, 7), one[5:])


def test_iterator_states_of_earlier_runs_still_resume():
  """Runs saved grain DataLoader states ("last_seen_indices": rows handed out - 1)."""
  old = json.dumps({"version": 2, "last_seen_indices": {"0": 4 * 6 - 1}, "worker_count": 0})
  assert text.iterator_state(old, 4) == {"next_index": 6}


def test_too_few_rows_for_a_batch_is_an_error():
  with pytest.raises(DataError, match="batch of 8"):
    text.batch_iterator(_unique_rows(3), 8, seed=0, shuffle=False, num_epochs=1)


def test_eval_batches_pad_the_last_batch_and_drop_nothing():
  rows = _unique_rows(5)
  batches = text.eval_batches(rows, 2, max_batches=10)
  assert len(batches) == 3
  assert all(b["tokens"].shape == (2, 4) for b in batches)
  np.testing.assert_array_equal(batches[-1]["segment_ids"][1], 0)
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches])[:5], rows["tokens"])
  assert len(text.eval_batches(rows, 2, max_batches=2)) == 2


def test_byte_tokenizer_round_trip():
  tok = tokenizers.get_tokenizer("byte")
  s = "def f(x):\n  return 'héllo, 世界 🙂'"
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and len(ids) == len(s.encode())
  assert tok.decode(ids) == s
  assert tok.decode(ids[:-2]).endswith("\ufffd")  # a cut character is replaced, not an error


def test_hf_tokenizer_round_trip(tmp_path):
  import tokenizers as hf
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=300,
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["def foo(bar):\n  return bar + 1\n"] * 20, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = tokenizers.get_tokenizer(f"hf:{tmp_path}")
  s = "def baz(x):\n  return 'héllo'"
  ids = loaded.encode(s)
  assert ids.dtype == np.int32 and loaded.vocab_size == tok.get_vocab_size()
  assert loaded.decode(ids) == s
  np.testing.assert_array_equal(loaded.encode_batch(["x", s])[1], ids)


@pytest.mark.parametrize("spec", ["wordpiece:64", "bpe:300"])
def test_training_a_vocabulary_prints_nothing(spec, capfd):
  """(The trainer's progress bars came out as blank lines in every run that trained one.)"""
  tok = tokenizers.train_tokenizer(spec, ["def foo(bar):\n  return bar + 1\n"] * 20)
  assert tok.vocab_size > 0
  assert capfd.readouterr() == ("", "")


def test_tokenizer_errors_name_the_problem(tmp_path):
  with pytest.raises(DataError, match="nope.*tokenizer.json"):
    tokenizers.get_tokenizer(f"hf:{tmp_path / 'nope'}")
  with pytest.raises(DataError, match="'byte' or 'hf:PATH'"):
    tokenizers.get_tokenizer("gpt2")


def test_stdlib_files_skip_tests_and_packages():
  files = sources.stdlib_files()
  assert len(files) > 100 and files == sorted(files)
  root = sources.stdlib_root()
  for f in files:
    assert f.suffix == ".py"
    assert not set(f.relative_to(root).parts) & {"test", "tests", "idle_test", "site-packages",
                                                 "lib2to3", "__pycache__"}


def _write_corpus(root, n=6):
  for i in range(n):
    path = root / f"d{i % 2}" / f"f{i}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"document {i} é\n" * (i + 1))


def test_files_source_reads_sorted_documents_and_caps_bytes(tmp_path):
  _write_corpus(tmp_path)
  cfg = DataConfig(source="files", files=str(tmp_path / "**" / "*.txt"))
  docs = sources.read_documents(cfg)
  # Named from the glob's directory (the split hashes the name): d0/f0.txt, d0/f2.txt, ...
  assert [n for n, _ in docs] == sorted(str(p.relative_to(tmp_path))
                                        for p in tmp_path.rglob("*.txt"))
  assert docs[0][1].startswith("document 0 é")
  capped = sources.read_documents(DataConfig(source="files", files=cfg.files, max_bytes=1))
  assert len(capped) == 1


def test_a_corpus_splits_alike_wherever_it_sits_and_however_the_glob_names_it(tmp_path,
                                                                            monkeypatch):
  (tmp_path / "here").mkdir()
  _write_corpus(tmp_path / "here", n=12)
  shutil.copytree(tmp_path / "here", tmp_path / "moved" / "elsewhere")
  monkeypatch.chdir(tmp_path)
  corpora = [text.load_corpus(DataConfig(source="files", files=files, tokenizer="byte",
                                         seq_len=16, val_fraction=0.3))
             for files in (str(tmp_path / "here" / "**" / "*.txt"),
                           str(tmp_path / "moved" / "elsewhere" / "**" / "*.txt"),
                           "here/d*/f*.txt")]
  first = corpora[0]
  assert 0 < first.n_val_tokens < first.n_train_tokens
  for other in corpora[1:]:
    for split in ("train", "val"):
      for key, value in getattr(first, split).items():
        np.testing.assert_array_equal(getattr(other, split)[key], value)
  assert sources.glob_root("~/data/*.txt") == pathlib.Path(os.path.expanduser("~/data"))
  assert sources.glob_root("*.txt") == pathlib.Path() and sources.glob_root("/a/b.txt") == (
      pathlib.Path("/a"))


def test_missing_glob_is_an_error_naming_it(tmp_path):
  with pytest.raises(DataError, match="nothing_here"):
    sources.read_documents(DataConfig(source="files", files=str(tmp_path / "nothing_here*.txt")))


def test_load_corpus_packs_both_sides(tmp_path):
  _write_corpus(tmp_path, n=10)
  cfg = DataConfig(source="files", files=str(tmp_path / "**/*.txt"), seq_len=16, val_fraction=0.3)
  corpus = text.load_corpus(cfg)
  n_bytes = sum(len(p.read_bytes()) for p in tmp_path.rglob("*.txt"))
  assert corpus.n_train_tokens + corpus.n_val_tokens == n_bytes
  assert corpus.train["tokens"].shape[1] == corpus.val["tokens"].shape[1] == 16
  with pytest.raises(DataError, match="max_bytes=1"):
    text.load_corpus(DataConfig(source="files", files=cfg.files, max_bytes=1))


def test_tfds_source_reads_prepared_array_record(tmp_path):
  import tensorflow_datasets as tfds  # slow import; only this test needs it

  class TinyLlmjaxText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Two splits of short text records."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "n": np.int32})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"record {i} ü", "n": i}

  TinyLlmjaxText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = DataConfig(source="tfds", tfds_name="tiny_llmjax_text", tfds_data_dir=str(tmp_path))
  docs = sources.read_documents(cfg)
  assert sorted(t for _, t in docs) == [f"record {i} ü" for i in range(5)]
  assert [n for n, _ in docs] == [str(i) for i in range(5)]
  test_docs = sources.read_documents(dataclasses.replace(cfg, tfds_split="test"))
  assert len(test_docs) == 2
  with pytest.raises(DataError, match="available: n, text"):
    sources.read_documents(dataclasses.replace(cfg, tfds_text_key="content"))
  empty = tmp_path / "empty"
  with pytest.raises(DataError, match=f"not_prepared_text.*{re.escape(str(empty))}.*tfds build"):
    sources.read_documents(dataclasses.replace(cfg, tfds_name="not_prepared_text",
                                               tfds_data_dir=str(empty)))

