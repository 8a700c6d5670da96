"""Trained subword vocabularies (`wordpiece:N`, `bpe:N`) as a pure function of the training text.

The `tokenizers` library's trainers are not: its BPE trainer (which its WordPiece trainer runs)
keeps words in a Rust `HashMap`, whose iteration order is seeded afresh in every process. The ids
of the `##x` continuation characters are handed out in that order and merges that tie in count are
ranked by id, and its merge queue can hold two entries of equal rank whose order is the order of
another hash map; so three trainings on the same files gave three vocabularies. This is the same
algorithm with every order fixed:

- words are counted with the tokenizer's own pre-tokenizer (what `train_from_iterator` counts);
- ids: the special tokens, then the alphabet (every character seen, and the initial alphabet)
  by code point, then the `##x` continuation characters by code point, then merges in order;
- each step merges the most frequent adjacent pair in every word that holds it (left to right,
  no overlaps, as `tokenizers` applies a merge); ties go to the smallest (left id, right id);
- a merged token's text is left + right without right's `##`; a text already in the vocabulary
  keeps its id; training stops at N tokens or when no pair is left.
"""

from __future__ import annotations

import collections
import heapq
import re

Pair = tuple[int, int]


# Rust's `char::is_whitespace` (Unicode White_Space), where BertPreTokenizer splits first: each
# chunk between these pre-tokenizes alone, so each distinct chunk is pre-tokenized once.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f"
                         "\u205f\u3000]+")


def word_counts(pre_tokenizer, texts, whitespace_first: bool = False) -> dict[str, int]:
  """How often each pre-tokenized word occurs in `texts` (`whitespace_first`: the pre-tokenizer
  splits on whitespace before anything else)."""
  chunks = collections.Counter()
  for text in texts:
    chunks.update(_WHITESPACE.split(text) if whitespace_first else (text,))
  counts = collections.Counter()
  for chunk, n in chunks.items():
    for word, _ in pre_tokenizer.pre_tokenize_str(chunk):
      counts[word] += n
  return counts


def initial_vocab(counts: dict[str, int], specials, alphabet=(), prefix: str | None = None
                  ) -> list[str]:
  """Specials, the alphabet by code point, then (with `prefix`) the continuation characters."""
  chars = set(alphabet)
  later = set()
  for word in counts:
    chars.update(word)
    later.update(word[1:])
  tokens = list(dict.fromkeys(specials))
  tokens += [c for c in sorted(chars) if c not in tokens]
  if prefix is not None:
    tokens += [prefix + c for c in sorted(later) if prefix + c not in tokens]
  return tokens


def train(counts: dict[str, int], tokens: list[str], vocab_size: int,
          prefix: str | None = None) -> tuple[list[str], list[Pair]]:
  """(the vocabulary in id order, the merges as id pairs in order), from `initial_vocab`'s."""
  tokens = list(tokens)
  ids = {t: i for i, t in enumerate(tokens)}
  words = sorted(counts)
  freq = [counts[w] for w in words]
  seqs = [[ids[c if i == 0 or prefix is None else prefix + c] for i, c in enumerate(w)]
          for w in words]
  pair_count: dict[Pair, int] = collections.defaultdict(int)
  where: dict[Pair, set[int]] = collections.defaultdict(set)
  for w, seq in enumerate(seqs):
    for pair in zip(seq, seq[1:]):
      pair_count[pair] += freq[w]
      where[pair].add(w)
  heap = [(-n, pair) for pair, n in pair_count.items()]
  heapq.heapify(heap)
  merges = []
  while len(ids) < vocab_size and heap:
    negative, pair = heapq.heappop(heap)
    if pair_count.get(pair, 0) != -negative:
      continue  # stale: the pair's current count has its own entry (or none when it is 0)
    a, b = pair
    right = tokens[b][len(prefix):] if prefix and tokens[b].startswith(prefix) else tokens[b]
    text = tokens[a] + right
    if text not in ids:
      ids[text] = len(tokens)
      tokens.append(text)
    merges.append(pair)
    changed = _merge(pair, ids[text], sorted(where.pop(pair)), seqs, freq, pair_count, where)
    for p in sorted(changed):
      if pair_count[p] > 0:
        heapq.heappush(heap, (-pair_count[p], p))
  return tokens, merges


def _merge(pair: Pair, new: int, positions: list[int], seqs, freq, pair_count, where) -> set:
  """Replaces `pair` by `new` in the words at `positions`; returns the pairs whose count moved.

  Only the windows next to a merge change: counts are updated there, not over the whole word."""
  a, b = pair
  changed = set()
  for w in positions:
    seq, sites, i = seqs[w], [], 0
    while True:  # left to right, non-overlapping: "a a a" merges (a, a) once
      try:
        i = seq.index(a, i)
      except ValueError:
        break
      if i + 1 < len(seq) and seq[i + 1] == b:
        sites.append(i)
        i += 2
      else:
        i += 1
    if not sites:
      continue  # a stale position: an earlier merge took the pair out of this word
    merged, start = [], 0
    for i in sites:
      merged += seq[start:i]
      merged.append(new)
      start = i + 2
    merged += seq[start:]
    old = {j for i in sites for j in (i - 1, i, i + 1) if 0 <= j < len(seq) - 1}
    for j in sorted(old):
      p = (seq[j], seq[j + 1])
      pair_count[p] -= freq[w]
      changed.add(p)
    at = [i - k for k, i in enumerate(sites)]  # where each new token sits in `merged`
    for j in sorted({j for k in at for j in (k - 1, k) if 0 <= j < len(merged) - 1}):
      p = (merged[j], merged[j + 1])
      pair_count[p] += freq[w]
      where[p].add(w)
      changed.add(p)
    seqs[w] = merged
  pair_count.pop(pair, None)
  changed.discard(pair)
  return changed
