"""Parallel text: gettext catalogs, TSV/JSONL readers, source-disjoint splits, tfds, baselines."""

import dataclasses
import json
import pathlib

import numpy as np
import polib
import pytest

from llmjax.config import DataConfig
from llmjax.data import parallel_text as pt
from llmjax.data.gettext_pairs import gettext_pairs
from llmjax.errors import DataError
from llmjax.eval.translation_baselines import copy_source, nearest_neighbour

# --- gettext ------------------------------------------------------------------------------------


def _mo(path: pathlib.Path, entries) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  po = polib.POFile()
  po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
  for e in entries:
    po.append(e if isinstance(e, polib.POEntry) else polib.POEntry(msgid=e[0], msgstr=e[1]))
  po.save_as_mofile(str(path))


_CATALOG_A = [
    ("Open file", "Datei öffnen"),
    ("Close  window ", "Fenster\tschließen"),  # whitespace is normalised
    ("Progress 50% done", "Fortschritt 50% erledigt"),  # a percent sign, not a placeholder
    ("Print", "Drucken"),  # b.mo disagrees; a.mo comes first
    ("Edit", "_Bearbeiten"),  # dropped here, kept from b.mo
    ("%s files", "%s Dateien"), ("Copied %(count)d items", "%(count)d kopiert"),
    ("Item %1$s", "Element %1$s"), ("Hello {name}", "Hallo {name}"),
    ("{0} selected", "{0} gewählt"),
    ("Wait %2", "Warte %2"), ("Size %-5.2lf", "Größe %-5.2lf"),
    ("_File", "_Datei"), ("&View", "&Ansicht"), ("~Help", "~Hilfe"),
    ("<b>Bold</b> text", "<b>Fetter</b> Text"), ("Tom &amp; Jerry", "Tom &amp; Jerry ok"),
    ("Line<br/>break", "Zeilen<br/>umbruch"),
    ("Line one\nLine two", "Zeile eins\nZeile zwei"), ("x" * 201, "y" * 201),
    ("OK", "OK"), ("Blank", " "), ("Untranslated", ""), ("---", "==="),
    polib.POEntry(msgid="One file", msgid_plural="%d files",
                  msgstr_plural={0: "Eine Datei", 1: "%d Dateien"}),
    polib.POEntry(msgctxt="menu", msgid="Quit", msgstr="Verlassen"),
]
_CATALOG_B = [("Print", "Ausdrucken"), ("Edit", "Bearbeiten"), ("Quit", "Beenden"),
              ("Open file", "Datei öffnen")]
_KEPT = sorted([("Open file", "Datei öffnen"), ("Close window", "Fenster schließen"),
                ("Progress 50% done", "Fortschritt 50% erledigt"), ("Print", "Drucken"),
                ("Edit", "Bearbeiten"), ("Quit", "Beenden")])


@pytest.fixture
def locale_dir(tmp_path):
  root = tmp_path / "locale"
  _mo(root / "de/LC_MESSAGES/b.mo", _CATALOG_B)  # written first: order on disk must not matter
  _mo(root / "de/LC_MESSAGES/a.mo", _CATALOG_A)
  (root / "de/LC_MESSAGES/broken.mo").write_bytes(b"not a catalog")
  _mo(root / "fr/LC_MESSAGES/x.mo", [("Save", "Enregistrer")])
  (root / "es/LC_MESSAGES").mkdir(parents=True)  # no catalog: not a language found
  return root


def test_gettext_keeps_only_plain_translated_messages_first_catalog_wins(locale_dir):
  pairs, manifest = gettext_pairs(locale_dir, "de")
  assert pairs == _KEPT
  assert (pairs, manifest) == gettext_pairs(str(locale_dir), "de")
  assert manifest["catalogs"] == ["a.mo", "b.mo"]
  assert list(manifest["unreadable"]) == ["broken.mo"]
  assert manifest["pairs"] == 6 and manifest["lang"] == "de"
  assert manifest["dropped"] == {
      "accelerator": 4, "conflict": 1, "context": 1, "identical": 1, "markup": 3,
      "multiline": 1, "no_letters": 1, "placeholder": 7, "plural": 2, "too_long": 1,
      "untranslated": 1}
  assert len(manifest["sha256"]) == 64


def test_gettext_without_catalogs_lists_the_languages_found(locale_dir):
  with pytest.raises(DataError, match=r"no gettext catalogs for language 'it' in .*; languages "
                                      r"with catalogs there: de, fr$"):
    gettext_pairs(locale_dir, "it")


def test_gettext_direction_follows_the_english_side(locale_dir):
  cfg = DataConfig(source="gettext", locale_dir=str(locale_dir), val_fraction=0.0)
  assert pt.load_parallel(cfg).train == _KEPT
  back = pt.load_parallel(dataclasses.replace(cfg, source_lang="de", target_lang="en"))
  assert back.train == sorted((t, s) for s, t in _KEPT)
  assert back.manifest["direction"] == "de->en"
  assert back.manifest["gettext"]["catalogs"] == ["a.mo", "b.mo"]
  fr = pt.load_parallel(dataclasses.replace(cfg, target_lang="fr"))
  assert fr.train == [("Save", "Enregistrer")]
  with pytest.raises(DataError, match="source_lang='de' and target_lang='fr' must be 'en'"):
    pt.load_parallel(dataclasses.replace(cfg, source_lang="de", target_lang="fr"))


_REAL = pathlib.Path("/usr/share/locale/de/LC_MESSAGES")


@pytest.mark.skipif(not any(_REAL.glob("*.mo")), reason=f"no gettext catalogs in {_REAL}")
def test_real_german_catalogs_give_thousands_of_pairs_in_disjoint_splits():
  corpus = pt.load_parallel(DataConfig(source="gettext", val_fraction=0.05, test_fraction=0.05))
  assert corpus.manifest["gettext"]["pairs"] > 5000
  sources = [{s for s, _ in split} for split in (corpus.train, corpus.val, corpus.test)]
  assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
  assert sum(corpus.manifest["counts"].values()) == corpus.manifest["gettext"]["pairs"]
  assert corpus.manifest["overlap"] == {"val": 0, "test": 0}


# --- splits -------------------------------------------------------------------------------------

_MANY = [(f"message {i}", f"Nachricht {i}") for i in range(1000)]


def test_split_is_by_source_deterministic_and_near_the_fractions():
  pairs = _MANY + [(f"message {i}", f"andere {i}") for i in range(0, 1000, 7)]  # repeated sources
  train, val, test = pt.split_pairs(pairs, 0.1, 0.2, seed=3)
  assert (train, val, test) == pt.split_pairs(pairs, 0.1, 0.2, seed=3)
  assert sorted(train + val + test) == sorted(pairs)
  sources = [{s for s, _ in split} for split in (train, val, test)]
  assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
  assert abs(len(sources[1]) - 100) < 35 and abs(len(sources[2]) - 200) < 45
  assert pt.split_pairs(pairs, 0.1, 0.2, seed=4) != (train, val, test)


def test_split_of_a_pair_does_not_change_when_others_are_removed():
  whole = pt.split_pairs(_MANY, 0.1, 0.1, seed=0)
  part = pt.split_pairs(_MANY[::3], 0.1, 0.1, seed=0)
  for split_whole, split_part in zip(whole, part):
    assert split_part == [p for p in split_whole if p in set(_MANY[::3])]
  with pytest.raises(DataError, match=r"val_fraction=0.6 and test_fraction=0.5 must be >= 0"):
    pt.split_pairs(_MANY, 0.6, 0.5, seed=0)


# --- files --------------------------------------------------------------------------------------


def test_tsv_and_jsonl_readers(tmp_path):
  tsv = tmp_path / "a.tsv"
  tsv.write_text("source\ttarget\r\nHello\tHallo\r\n\n  \n good day \tguten Tag\n")
  assert pt.read_tsv(tsv) == [("Hello", "Hallo"), ("good day", "guten Tag")]
  keyed = tmp_path / "k.tsv"
  keyed.write_text("en\tde\nsource\ttarget\n")  # only the first line can be a header
  assert pt.read_tsv(keyed, "en", "de") == [("source", "target")]
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text(json.dumps({"en": "Hello", "de": "Hallo", "id": 1}) + "\n\n")
  assert pt.read_jsonl(jsonl, "en", "de") == [("Hello", "Hallo")]


@pytest.mark.parametrize("name, content, message", [
    ("a.tsv", "a\tb\nno tab here\n", r"a.tsv:2: 1 tab-separated field\(s\), expected 2"),
    ("a.tsv", "a\tb\n\nc\td\te\n", r"a.tsv:3: 3 tab-separated field\(s\), expected 2"),
    ("a.tsv", "a\tb\n \tb\n", r"a.tsv:2: empty source field"),
    ("a.tsv", "a\t\n", r"a.tsv:1: empty target field"),
    ("a.tsv", b"a\tb\n\xff\tc\n", r"a.tsv:2: not UTF-8 text"),
    ("a.jsonl", '{"source": "a"}\n', r"a.jsonl:1: no key 'target' \(config.data.target_key\); "
                                     "keys: 'source'"),
    ("a.jsonl", '{"source": "a", "target": 3}\n', r"a.jsonl:1: the target value must be a string"),
    ("a.jsonl", '\n{"source": "", "target": "b"}\n', r"a.jsonl:2: empty source value"),
    ("a.jsonl", '["a", "b"]\n', r"a.jsonl:1: expected a JSON object, got list"),
    ("a.jsonl", '{"source": \n', r"a.jsonl:1: not valid JSON"),
    ("a.csv", "a,b\n", r"unknown extension '.csv'; allowed: .tsv .* or .jsonl"),
])
def test_bad_files_name_path_line_and_problem(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(DataError, match=message):
    pt.load_parallel(DataConfig(source="files", files=str(path)))


def test_files_with_given_val_split_and_max_bytes(tmp_path):
  (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in _MANY))
  (tmp_path / "val.jsonl").write_text(json.dumps({"source": "message 1", "target": "x"}) + "\n")
  cfg = DataConfig(source="files", files=str(tmp_path / "train.*"), test_fraction=0.1,
                   val_files=str(tmp_path / "val.jsonl"))
  corpus = pt.load_parallel(cfg)
  assert corpus.val == [("message 1", "x")]
  assert (corpus.train, [], corpus.test) == pt.split_pairs(_MANY, 0.0, 0.1, seed=0)
  assert corpus.manifest["files"]["val"] == [str(tmp_path / "val.jsonl")]
  assert corpus.manifest["split_by"]["val"] == "given"
  assert corpus.manifest["overlap"]["val"] == int(("message 1", "Nachricht 1") in corpus.train)
  assert corpus.manifest["counts"] == {"train": len(corpus.train), "val": 1,
                                       "test": len(corpus.test)}
  assert pt.load_parallel(cfg).manifest["sha256"] == corpus.manifest["sha256"]
  small = pt.load_parallel(dataclasses.replace(cfg, max_bytes=200))
  assert sum(small.manifest["counts"].values()) == 1 + 10  # 10 pairs of 20 bytes reach 200
  (tmp_path / "empty.tsv").write_text("source\ttarget\n")
  with pytest.raises(DataError, match=r"config.data.test_files='.*empty.tsv': no test pairs"):
    pt.load_parallel(dataclasses.replace(cfg, test_files=str(tmp_path / "empty.tsv")))
  with pytest.raises(DataError, match=r"config.data.files must be a glob"):
    pt.load_parallel(dataclasses.replace(cfg, files=""))
  with pytest.raises(DataError, match=r"config.data.test_files='nope\*' matches no files"):
    pt.load_parallel(dataclasses.replace(cfg, test_files="nope*"))
  with pytest.raises(DataError, match=r"test_fraction=0.1 of 11 pairs gave no test pairs"):
    pt.load_parallel(dataclasses.replace(cfg, max_bytes=200, seed=3))  # seed 3: none of 10


# --- tfds ---------------------------------------------------------------------------------------


@pytest.fixture
def tfds_mock(monkeypatch):
  """tfds.testing.mock_data; `records` (split -> list of dicts) replaces its random examples."""
  import tensorflow_datasets as tfds  # slow import; only these tests need it
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)

  def mock(records=None):
    as_data_source = None if records is None else (lambda self, split, **kw: records[split])
    return tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE,
                                  as_data_source_fn=as_data_source)
  return mock


def test_tfds_translation_dataset_by_language_features(tfds_mock):
  rows = [{"de": f"Satz {i}".encode(), "en": f"sentence {i}".encode()} for i in range(40)]
  records = {"train": rows + [{"de": b"", "en": b"skipped: no German"}],
             "validation": rows[:3]}
  cfg = DataConfig(source="tfds", tfds_name="wmt14_translate/de-en", tfds_val_split="validation")
  with tfds_mock(records):
    corpus = pt.load_parallel(cfg)
    assert corpus.train == [(f"sentence {i}", f"Satz {i}") for i in range(40)]
    assert corpus.val == [(f"sentence {i}", f"Satz {i}") for i in range(3)] and corpus.test == []
    assert corpus.manifest["tfds_splits"] == {"train": "train", "val": "validation"}
    assert corpus.manifest["overlap"] == {"val": 3, "test": 0}
    back = pt.load_parallel(dataclasses.replace(cfg, source_lang="de", target_lang="en",
                                                tfds_val_split="", test_fraction=0.2))
    assert sorted(back.train + back.val + back.test) == sorted((t, s) for s, t in corpus.train)
    assert back.val and back.test
    with pytest.raises(DataError, match=r"split 'train' has no field "
                                        r"config.data.target_lang='fr'; available: de, en"):
      pt.load_parallel(dataclasses.replace(cfg, target_lang="fr"))
  with tfds_mock():  # tfds's own random examples of the Translation feature
    random = pt.load_parallel(dataclasses.replace(cfg, tfds_val_split=""))
  assert all(isinstance(s, str) and isinstance(t, str) for s, t in random.train)


# --- baselines ----------------------------------------------------------------------------------

_MEMORY = [("Open the file", "Datei öffnen"), ("Close the window", "Fenster schließen"),
           ("Save the document", "Dokument speichern"), ("Close the window", "Schließen")]


def test_copy_source_and_nearest_neighbour_on_hand_checkable_data():
  queries = ["open a file", "Closing windows", "saved documents", "qqq"]
  assert copy_source(queries) == queries
  assert nearest_neighbour(_MEMORY, queries) == [
      "Datei öffnen", "Fenster schließen", "Dokument speichern",
      "Datei öffnen"]  # ties (here: nothing in common) go to the earliest training pair
  assert nearest_neighbour(_MEMORY, []) == []
  with pytest.raises(ValueError, match="at least one training pair"):
    nearest_neighbour([], queries)


def test_nearest_neighbour_agrees_with_sklearn_char_wb_tfidf():
  from sklearn.feature_extraction.text import TfidfVectorizer
  rng = np.random.default_rng(0)
  words = ["file", "files", "open", "opening", "window", "save", "saved", "print", "close",
           "document", "the", "a", "new", "recent", "all"]
  train = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(300)]
  queries = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(100)]
  pairs = [(s, str(i)) for i, s in enumerate(train)]
  vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3))
  scores = (vec.fit(train).transform(queries) @ vec.transform(train).T).toarray()
  got = np.array([int(t) for t in nearest_neighbour(pairs, queries)])
  best = scores.max(axis=1)
  assert np.allclose(scores[np.arange(len(queries)), got], best)  # the best score, ties aside
  assert all(got[q] == np.flatnonzero(scores[q] >= best[q] - 1e-9)[0]
             for q in range(len(queries)))  # ... and the earliest of equals


def test_the_k_best_equal_a_full_sort_with_ties_to_the_earliest():
  from llmjax.eval.translation_baselines import _TIE, _best_first
  rng = np.random.default_rng(0)
  for size, k in ((50, 5), (50, 50), (7, 20), (200, 1), (1000, 20)):
    scores = rng.integers(0, 6, size) / 5.0 + rng.choice([0.0, _TIE / 10], size)  # many ties
    full = np.lexsort((np.arange(size), -np.round(scores / _TIE)))[:k]
    np.testing.assert_array_equal(_best_first(scores, k), full)
