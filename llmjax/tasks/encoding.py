"""What the text tasks share: the run's tokenizer, special ids, and rows of token ids."""

from __future__ import annotations

import os
import sys

import numpy as np

from llmjax.config import Experiment
from llmjax.errors import ConfigError

_TRAINED = ("wordpiece:", "bpe:")


def _init_from_tokenizer_dir(spec: str) -> str | None:
  """The directory holding the tokenizer.json of an init_from checkpoint, if it has one (a PEFT
  adapter's: its base model's)."""
  # deferred: grain, tensorflow-datasets and orbax stay off the model-only import path
  from llmjax import weights
  found = weights.parse(spec, "config.train.init_from").tokenizer_dir()
  return found if found and os.path.isfile(os.path.join(found, "tokenizer.json")) else None


def run_tokenizer(exp: Experiment, workdir: str | None, training_texts):
  """(tokenizer, artifacts). A vocabulary to be trained gives way to the init_from checkpoint's:
  pretrained embeddings are indexed by that checkpoint's ids, a new vocabulary would scramble them.
  """
  # deferred: grain, tensorflow-datasets and orbax stay off the model-only import path
  from llmjax.data import tokenizers
  spec = exp.data.tokenizer
  resumed = workdir and os.path.isfile(os.path.join(workdir, tokenizers.TOKENIZER_FILE))
  if spec.startswith(_TRAINED) and exp.train.init_from and not resumed:
    found = _init_from_tokenizer_dir(exp.train.init_from)
    if found:
      print(f"tokenizer: using {found}/tokenizer.json of config.train.init_from instead of "
            f"training {spec}", file=sys.stderr)
      spec = f"hf:{found}"
  return tokenizers.for_run(spec, workdir, training_texts)


def special_ids(tokenizer) -> dict[str, int | None]:
  return {role: tokenizer.special_id(role) for role in ("pad", "cls", "sep", "mask")}


def require_special(specials: dict, role: str, exp: Experiment, why: str) -> int:
  if specials[role] is None:
    raise ConfigError(f"config.data.tokenizer={exp.data.tokenizer!r} has no {role} token, which "
                      f"{why} needs; use a trained vocabulary ('wordpiece:N', 'bpe:N') or an "
                      "hf:PATH tokenizer that has one")
  return specials[role]


def framed_rows(pieces: list[np.ndarray], seq_len: int, specials: dict) -> dict[str, np.ndarray]:
  """One piece per row as [CLS] piece [SEP] (where the vocabulary has them), zero-padded:
  {"tokens", "segment_ids"} [N, seq_len] int32, segment 1 on real tokens, 0 on padding."""
  head = [specials["cls"]] if specials.get("cls") is not None else []
  tail = [specials["sep"]] if specials.get("sep") is not None else []
  room = seq_len - len(head) - len(tail)
  pad = specials.get("pad") or 0
  tokens = np.full((len(pieces), seq_len), pad, np.int32)
  segment_ids = np.zeros((len(pieces), seq_len), np.int32)
  for row, piece in enumerate(pieces):
    ids = np.concatenate([head, np.asarray(piece[:room]), tail]).astype(np.int32)
    tokens[row, :ids.size] = ids
    segment_ids[row, :ids.size] = 1
  return {"tokens": tokens, "segment_ids": segment_ids}


def chunks(token_docs: list[np.ndarray], size: int, min_size: int = 2) -> list[np.ndarray]:
  """Each document cut into consecutive pieces of `size` tokens; shorter scraps than
  `min_size` are dropped (a row of [CLS] x [SEP] teaches nothing)."""
  out = []
  for doc in token_docs:
    out += [doc[i:i + size] for i in range(0, doc.size, size) if doc[i:i + size].size >= min_size]
  return out


def pair_rows(token_docs: list[np.ndarray], seq_len: int, specials: dict, objective: str,
              seed: int) -> dict[str, np.ndarray]:
  """Segment pairs for BERT's second objective: [CLS] A [SEP] B [SEP], zero-padded.

  Each document is cut into consecutive segments of up to (seq_len - 3) // 2 tokens, paired
  (0, 1), (2, 3), ... Half the pairs, drawn with `seed`, are changed and labelled 1: `nsp`
  replaces B by a random segment of another document of the corpus (when there is one document,
  any segment but the true B: a small validation split), `sop` swaps A and B (ALBERT's sentence order); the rest, labelled 0, are
  in order. {"tokens", "segment_ids" (1 on real tokens), "token_types" (0 for [CLS] A [SEP], 1 for
  B [SEP]): [N, seq_len] int32, "pair_label": [N] int32} (Hugging Face's next_sentence_label).
  """
  segments, doc_of, pairs = [], [], []
  for d, doc in enumerate(token_docs):
    pieces = chunks([doc], (seq_len - 3) // 2)
    pairs += [(len(segments) + j, len(segments) + j + 1) for j in range(0, len(pieces) - 1, 2)]
    segments += pieces
    doc_of += [d] * len(pieces)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, len(pairs)).astype(np.int32)
  one_doc = len(set(doc_of)) < 2
  shape = (len(pairs), seq_len)
  tokens = np.full(shape, specials.get("pad") or 0, np.int32)
  segment_ids, token_types = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for row, ((a, b), label) in enumerate(zip(pairs, labels)):
    if label and objective == "sop":
      a, b = b, a
    elif label:  # a random segment of another document (BERT's NotNext)
      r = int(rng.integers(len(segments)))
      while r == b if one_doc else doc_of[r] == doc_of[a]:
        r = int(rng.integers(len(segments)))
      b = r
    first = [specials["cls"], *segments[a], specials["sep"]]
    ids = np.asarray(first + [*segments[b], specials["sep"]], np.int32)
    tokens[row, :ids.size], segment_ids[row, :ids.size] = ids, 1
    token_types[row, len(first):ids.size] = 1
  return {"tokens": tokens, "segment_ids": segment_ids, "token_types": token_types,
          "pair_label": labels}
