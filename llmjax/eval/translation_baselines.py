"""Translation baselines a trained model should beat: copy the source, or a translation memory.

`nearest_neighbour` answers each source with the training translation of the most similar
training source. Similarity: TF-IDF cosine over character 3-grams of each lowercased word padded
with one space (" open " -> " op", "ope", "pen", "en "), the IDF fitted on the training sources
(smooth: ln((1 + N) / (1 + df)) + 1, raw term counts, L2-normalised rows; scikit-learn's
`TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3))`). Character n-grams match inflected
and compound words ("file" ~ "files", "Datei" ~ "Dateien") that word n-grams miss, which matters
for short UI strings. Scores are sparse dot products over an inverted index (numpy only).
Ties, including a query that shares no 3-gram with any training source (every score 0), go to
the earliest training pair.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

__all__ = ["copy_source", "nearest_neighbour", "nearest_other"]

NGRAM = 3
_TIE = 1e-9


def copy_source(sources: Sequence[str]) -> list[str]:
  """The hypothesis is the source itself: the floor for BLEU/chrF from shared names and numbers."""
  return list(sources)


def char_ngrams(text: str, n: int = NGRAM) -> collections.Counter:
  """Counts of the n-grams of each lowercased word padded with spaces (a short word: itself)."""
  grams = collections.Counter()
  for word in text.lower().split():
    word = f" {word} "
    grams.update(word[i:i + n] for i in range(max(1, len(word) - n + 1)))
  return grams


class _Index:
  """L2-normalised TF-IDF rows of the training sources, stored by feature (an inverted index)."""

  def __init__(self, texts: Sequence[str]):
    self.vocab: dict[str, int] = {}
    rows, cols, counts = [], [], []
    for r, text in enumerate(texts):
      for gram, count in char_ngrams(text).items():
        rows.append(r)
        cols.append(self.vocab.setdefault(gram, len(self.vocab)))
        counts.append(count)
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    df = np.bincount(cols, minlength=len(self.vocab))
    self.idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    weights = np.asarray(counts, np.float64) * self.idf[cols]
    norms = np.sqrt(np.bincount(rows, weights**2, minlength=len(texts)))
    weights /= norms[rows]
    order = np.argsort(cols, kind="stable")
    self.docs, self.weights = rows[order], weights[order]
    self.starts = np.concatenate([[0], np.cumsum(df)])
    self.size = len(texts)

  def scores(self, text: str) -> np.ndarray:
    """Cosine similarity of text (its 3-grams seen in training) to every training source."""
    known = [(self.vocab[g], c) for g, c in char_ngrams(text).items() if g in self.vocab]
    if not known:
      return np.zeros(self.size)
    query = np.array([c * self.idf[f] for f, c in known])
    query /= np.linalg.norm(query)
    spans = [slice(self.starts[f], self.starts[f + 1]) for f, _ in known]
    docs = np.concatenate([self.docs[s] for s in spans])
    weights = np.concatenate([self.weights[s] * q for s, q in zip(spans, query)])
    return np.bincount(docs, weights, minlength=self.size)


def nearest_neighbour(train_pairs: Sequence[tuple[str, str]], sources: Sequence[str]) -> list[str]:
  """For each source, the translation of the most similar training source (see module doc)."""
  if not train_pairs:
    raise ValueError("nearest_neighbour needs at least one training pair")
  index = _Index([s for s, _ in train_pairs])
  out = []
  for source in sources:
    scores = index.scores(source)
    # Equal bags of 3-grams can differ in the last bits (summation order): within _TIE is a tie.
    out.append(train_pairs[int(np.argmax(scores >= scores.max() - _TIE))][1])
  return out


def _best_first(scores: np.ndarray, k: int) -> np.ndarray:
  """The indices of the k best scores, best first; ties (within _TIE) to the earliest pair, as
  nearest_neighbour breaks them. Only the scores up to the k-th best are sorted (a full sort per
  query made building preference pairs from the gettext catalogs take ten seconds)."""
  key = -np.round(scores / _TIE)
  if k >= key.size:
    return np.lexsort((np.arange(key.size), key))
  kth = np.partition(key, k - 1)[k - 1]
  picked = np.flatnonzero(key <= kth)  # every index that can be among the k, in index order
  return picked[np.lexsort((picked, key[picked]))][:k]


def nearest_other(train_pairs: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str]],
                  candidates: int = 20) -> list[str | None]:
  """For each (source, translation) query, the translation of the most similar training source
  that is a *different* message with a different translation (the retrieval baseline's answer
  once the query itself is out of its memory); None when none of the `candidates` best is."""
  if not train_pairs:
    raise ValueError("nearest_other needs at least one training pair")
  index = _Index([s for s, _ in train_pairs])
  out = []
  for source, translation in queries:
    order = _best_first(index.scores(source), candidates)
    out.append(next((train_pairs[i][1] for i in order if train_pairs[i][0] != source
                     and train_pairs[i][1] != translation), None))
  return out
