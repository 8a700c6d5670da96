"""Tokenizers behind one interface: `name`, `vocab_size`, `encode`, `encode_batch`, `decode`,
`special_id`; and vocabularies trained offline on a run's own training text (`wordpiece:N`,
`bpe:N`), kept in the workdir as tokenizer.json so a resumed or later run reuses them.
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

from llmjax.data import vocab_training
from llmjax.errors import DataError


class ByteTokenizer:
  """UTF-8 bytes as tokens: no files, no unknown tokens, vocabulary 256."""
  name = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], the [start, end) character span [T, 2] each byte belongs to)."""
    widths = [len(c.encode("utf-8")) for c in text]
    chars_T = np.repeat(np.arange(len(text), dtype=np.int64), widths)
    return self.encode(text), np.stack([chars_T, chars_T + 1], axis=1)

  def decode(self, ids) -> str:
    # Sampled ids may split a multi-byte character; show it rather than fail.
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")

  def special_id(self, role: str) -> int | None:
    return None  # every byte is text


# The names special tokens go by in BERT-, RoBERTa- and GPT-style vocabularies, by role.
SPECIAL_NAMES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
                 "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}
TRAINED_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4 of trained vocabularies


class HFTokenizer:
  """A Hugging Face `tokenizer.json` read with the `tokenizers` library (no network)."""

  def __init__(self, path: str, tokenizer=None):
    if tokenizer is None:
      import tokenizers  # Only needed for hf: specs; keeps byte-level runs import-light.
      file = pathlib.Path(path).expanduser() / "tokenizer.json"
      if not file.is_file():
        raise DataError(f"tokenizer path {path!r}: expected a directory with tokenizer.json "
                        f"({file} not found)")
      tokenizer = tokenizers.Tokenizer.from_file(str(file))
    self.name = f"hf:{path}"
    self._tok = tokenizer
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids,
                      dtype=np.int32)

  def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[np.ndarray]:
    # The Rust library tokenizes a batch on all cores; a corpus is thousands of documents.
    return [np.asarray(e.ids, dtype=np.int32)
            for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

  def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], character spans [T, 2]) with no special tokens added (chat templates write
    their own)."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return (np.asarray(encoding.ids, np.int32),
            np.asarray(encoding.offsets, np.int64).reshape(-1, 2))

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids).tolist())

  def special_id(self, role: str) -> int | None:
    """The id of the `role` token (pad, unk, cls, sep, mask) if the vocabulary has one."""
    for name in SPECIAL_NAMES[role]:
      index = self._tok.token_to_id(name)
      if index is not None:
        return int(index)
    return None

  def to_json(self) -> str:
    return self._tok.to_str()


def train_tokenizer(spec: str, texts: list[str]) -> HFTokenizer:
  """A `wordpiece:N` or `bpe:N` vocabulary trained on `texts`; specials take ids 0-4.

  The same texts give the same tokenizer.json in every process (llmjax.data.vocab_training).
  """
  import tokenizers  # only when a vocabulary is trained: byte-level runs never load it
  from tokenizers import decoders, models, pre_tokenizers  # the same
  kind, _, size = spec.partition(":")
  if kind == "wordpiece":
    # Case and punctuation carry meaning in code and prose alike: split, never lowercase.
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = vocab_training.word_counts(pre_tokenizer, texts, whitespace_first=True)
    initial = vocab_training.initial_vocab(counts, TRAINED_SPECIALS, prefix="##")
    vocab, _ = vocab_training.train(counts, initial, int(size), prefix="##")
    tok = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)},
                                                unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
  else:
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts = vocab_training.word_counts(pre_tokenizer, texts)
    initial = vocab_training.initial_vocab(counts, TRAINED_SPECIALS,
                                           alphabet=pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = vocab_training.train(counts, initial, int(size))
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)},
                                          [(vocab[a], vocab[b]) for a, b in merges]))
    tok.decoder = decoders.ByteLevel()
  tok.pre_tokenizer = pre_tokenizer
  tok.add_special_tokens(list(TRAINED_SPECIALS))
  return HFTokenizer(spec, tok)


TOKENIZER_FILE = "tokenizer.json"


def for_run(spec: str, workdir: str | None, training_texts) -> tuple[object, dict[str, str]]:
  """(tokenizer, artifacts) for `config.data.tokenizer`; the workdir's tokenizer.json wins.

  A run keeps the vocabulary it used (trained here, or read from hf:PATH) as WORKDIR/tokenizer.json
  so a resumed run, `llmjax eval` and a fine-tuning run that starts from it see the same ids.
  `training_texts()` is called only when a vocabulary must be trained.
  """
  if spec == "byte":
    return ByteTokenizer(), {}
  saved = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if saved and os.path.isfile(saved):
    tokenizer = HFTokenizer(workdir)
    tokenizer.name = spec
    return tokenizer, {}
  if spec.partition(":")[0] in ("wordpiece", "bpe"):
    texts = training_texts()
    tokenizer = train_tokenizer(spec, texts)
    print(f"trained a {spec} tokenizer on {len(texts)} training texts "
          f"({tokenizer.vocab_size} tokens)", file=sys.stderr)
  else:
    tokenizer = get_tokenizer(spec)
  return tokenizer, {TOKENIZER_FILE: tokenizer.to_json()}


def get_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
  """'byte' or 'hf:PATH' (a local directory holding tokenizer.json) -> tokenizer."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("hf:") and len(spec) > 3:
    return HFTokenizer(spec[3:])
  raise DataError(f"unknown tokenizer {spec!r}; allowed: 'byte' or 'hf:PATH' "
                  "(a directory with tokenizer.json); trained: 'wordpiece:N' or 'bpe:N'")
