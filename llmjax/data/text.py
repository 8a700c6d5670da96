"""Corpus -> token documents -> packed rows with segment ids -> grain iterators.

Packing concatenates documents into rows of `seq_len` tokens; `segment_ids` number the documents
within a row (1, 2, ...) and 0 marks padding, so attention masks and losses never cross documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import numpy as np

from llmjax.config import DataConfig
from llmjax.data.sources import read_documents, stdlib_root
from llmjax.data import tokenizers
from llmjax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Packed train and validation rows ({"tokens", "segment_ids"}: [N, L] int32), with tokenizer."""
  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  tokenizer: Any
  n_train_tokens: int
  n_val_tokens: int
  artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # e.g. tokenizer.json


def unit_hash(seed: int, name: str) -> float:
  """A stable number in [0, 1) from (seed, name): which split a named example falls in."""
  digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: list[tuple[str, str]], val_fraction: float,
                    seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(train, val) by a stable hash of (seed, doc name); both sides non-empty given >= 2 docs."""
  u = np.array([unit_hash(seed, name) for name, _ in docs])
  is_val = u < val_fraction
  if len(docs) >= 2:
    # Tiny corpora can hash to one side; move the nearest document across so both exist.
    if not is_val.any():
      is_val[np.argmin(u)] = True
    if is_val.all():
      is_val[np.argmax(u)] = False
  train = [d for d, v in zip(docs, is_val) if not v]
  val = [d for d, v in zip(docs, is_val) if v]
  return train, val


def pack(token_docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Documents, in order, into rows of seq_len: {"tokens", "segment_ids"} [N, seq_len] int32."""
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  docs = [np.asarray(d, dtype=np.int32).reshape(-1) for d in token_docs]
  docs = [d for d in docs if d.size]  # an empty document would leave a gap in the ids
  total = sum(d.size for d in docs)
  n_rows = -(-total // seq_len)
  tokens = np.zeros(n_rows * seq_len, np.int32)
  segment_ids = np.zeros(n_rows * seq_len, np.int32)
  if total:
    tokens[:total] = np.concatenate(docs)
    doc_of_token = np.repeat(np.arange(len(docs), dtype=np.int32), [d.size for d in docs])
    # Ids restart per row: a document continuing from the previous row is segment 1 here.
    first_doc_of_row = doc_of_token[::seq_len]
    segment_ids[:total] = doc_of_token - np.repeat(first_doc_of_row, seq_len)[:total] + 1
  return {"tokens": tokens.reshape(n_rows, seq_len),
          "segment_ids": segment_ids.reshape(n_rows, seq_len)}


def _describe_source(cfg: DataConfig) -> str:
  where = {"stdlib": f"config.data.source='stdlib' ({stdlib_root()})",
           "files": f"config.data.files={cfg.files!r}",
           "tfds": f"tfds dataset {cfg.tfds_name!r} split {cfg.tfds_split!r}"}[cfg.source]
  return where + (f" with config.data.max_bytes={cfg.max_bytes}" if cfg.max_bytes else "")


def load_corpus(cfg: DataConfig, workdir: str | None = None) -> Corpus:
  """Read, split by document, tokenize and pack the configured corpus."""
  if not cfg.tokenizer.startswith(("wordpiece:", "bpe:")):  # a bad path should fail fast
    tokenizers.get_tokenizer(cfg.tokenizer)
  docs = read_documents(cfg)
  train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
  tokenizer, artifacts = tokenizers.for_run(cfg.tokenizer, workdir,
                                            lambda: [t for _, t in train_docs])
  train = pack(tokenizer.encode_batch([t for _, t in train_docs]), cfg.seq_len)
  val = pack(tokenizer.encode_batch([t for _, t in val_docs]), cfg.seq_len)
  for side, arrays in (("training", train), ("validation", val)):
    if not len(arrays["tokens"]):
      raise DataError(f"{_describe_source(cfg)} gives no {side} tokens ({len(docs)} document(s) "
                      "read; at least 2 non-empty documents are needed)")
  return Corpus(train=train, val=val, tokenizer=tokenizer,
                n_train_tokens=int((train["segment_ids"] > 0).sum()),
                n_val_tokens=int((val["segment_ids"] > 0).sum()), artifacts=artifacts)


class _Rows:
  """Rows of in-memory packed arrays as a grain random-access data source."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = arrays
    self._n = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    # Stored in the iterator state: no memory addresses, so states compare equal across runs.
    shapes = {k: v.shape for k, v in self._arrays.items()}
    return f"_Rows({shapes})"


class _ProcessBatches:
  """Random access to this process's rows of each global batch: the grain source of training.

  Global batch i holds the records at positions [i*B, (i+1)*B) of grain's seeded epoch order,
  so what a step sees depends on neither the process count nor which process reads which rows:
  runs on 1 and on N processes take the same steps, and a run resumes on another process count.
  """

  def __init__(self, arrays: dict[str, np.ndarray], order, global_batch: int, rows: slice,
               num_batches: int, transform=None, seed: int = 0):
    self._arrays, self._order, self._global_batch = arrays, order, global_batch
    self._rows, self._num_batches = rows, num_batches
    self._transform, self._seed = transform, seed

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = index * self._global_batch
    positions = range(start + self._rows.start, start + self._rows.stop)
    keys = [self._order[p].record_key for p in positions]
    batch = {k: v[keys] for k, v in self._arrays.items()}
    if self._transform is None:
      return batch
    # An example's randomness depends on the run's seed and its place in the global order only:
    # the same on any process count, different every epoch, nothing to checkpoint.
    seeds = np.asarray([_example_seed(self._seed, p) for p in positions], np.uint64)
    return self._transform(batch, seeds)

  def __repr__(self) -> str:  # no memory addresses: states compare equal across runs
    return f"_ProcessBatches(batch={self._global_batch}, rows={self._rows})"


def _example_seed(seed: int, position: int) -> int:
  digest = hashlib.sha256(f"{seed}\0{position}".encode()).digest()
  return int.from_bytes(digest[:8], "big")


def batch_iterator(arrays: dict[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool,
                   num_epochs: int | None, rows: slice | None = None,
                   transform=None) -> grain.DatasetIterator:
  """A checkpointable grain iterator of `rows` (default: all) of each global batch.

  `batch_size` is the global batch; `rows` this process's part of it (`sharding.process_rows`).
  The state ({"next_index": global batches consumed}) is the same on every process.
  `transform(batch, seeds_B)` (e.g. augmentation) gets one seed per example.
  """
  n = len(next(iter(arrays.values())))
  rows = slice(0, batch_size) if rows is None else rows
  if batch_size <= 0 or not 0 <= rows.start < rows.stop <= batch_size:
    raise ValueError(f"need batch_size > 0 and rows within it, got {batch_size}, {rows}")
  if n == 0 or (num_epochs is not None and n * num_epochs < batch_size):
    raise DataError(f"{n} packed rows cannot fill a batch of {batch_size} over {num_epochs} "
                    "epoch(s)")
  order = grain.samplers.IndexSampler(
      num_records=n, shard_options=grain.sharding.ShardOptions(0, 1, drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs,
      seed=seed % 2**32)  # grain takes a 32-bit seed
  num_batches = 2**62 if num_epochs is None else n * num_epochs // batch_size
  source = _ProcessBatches(arrays, order, batch_size, rows, num_batches, transform, seed)
  # In memory: reading threads would only contend for the GIL.
  dataset = grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(dataset)


def iterator_state(saved: str, batch_size: int) -> dict:
  """A saved iterator state as `set_state` takes it; older runs saved grain DataLoader states."""
  state = json.loads(saved)
  if "last_seen_indices" in state:  # DataLoader, one process: rows handed out so far
    return {"next_index": (int(state["last_seen_indices"]["0"]) + 1) // batch_size}
  return state


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first batches in order, the last padded with all-zero rows (segment 0: no loss)."""
  n = len(next(iter(arrays.values())))
  n_batches = -(-n // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, max_batches)
  batches = []
  for start in range(0, n_batches * batch_size, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(next(iter(batch.values())))
    batches.append({k: np.pad(v, ((0, pad),) + ((0, 0),) * (v.ndim - 1)) if pad else v
                    for k, v in batch.items()})
  return batches
