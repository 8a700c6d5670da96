"""Instruction data files -> conversations -> packed rows with segment ids and a loss mask.

Files are JSONL or Parquet, the formats HF `datasets` writes. A row holds either `messages` (a
list of {role, content}: system, user, assistant, several turns) or `prompt` and `completion`
(each a string, or a list of messages as TRL's conversational format has them). Packing puts
whole conversations side by side in rows of `seq_len`, first fit (segment ids 1, 2, ... keep
attention and loss within one; 0 is padding); a conversation longer than a row is cut to its first `seq_len`
tokens or dropped (`too_long`), and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import pyarrow.parquet as pq

from llmjax.data import chat
from llmjax.data.sources import glob_files, glob_root
from llmjax.errors import DataError

TOO_LONG = ("cut", "drop")


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One row's messages, where it came from (file:row) for error messages, and its name: file:row
  with the file named from its glob's directory (what a split hashes, so the split stays when
  the data moves), or `where` itself for a row that has no file."""
  messages: list[dict]
  where: str
  name: str = ""

  @property
  def split_key(self) -> str:
    return self.name or self.where


def _jsonl_rows(path: pathlib.Path):
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield f"{path}:{number}", json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from e


def _parquet_rows(path: pathlib.Path):
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for a file that is not Parquet
    raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__})") from e
  for number, row in enumerate(table.to_pylist(), 1):
    yield f"{path} row {number}", row


def read_rows(pattern: str, key: str = "config.data.files") -> list[tuple[str, dict]]:
  """(file:row, row dict) of every JSONL / Parquet file matching the glob, in order."""
  out = []
  for path in glob_files(pattern):
    if path.suffix == ".parquet":
      out.extend(_parquet_rows(path))
    elif path.suffix in (".jsonl", ".json"):
      out.extend(_jsonl_rows(path))
    else:
      raise DataError(f"{key}={pattern!r}: {path} is neither .jsonl nor .parquet")
  return out


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, (list, tuple)):
    return check_messages(list(value), where, field)
  raise DataError(f"{where}: `{field}` must be a string or a list of messages, got "
                  f"{type(value).__name__}")


def check_messages(messages, where: str, field: str = "messages") -> list[dict]:
  """Every message a dict with a known string `role` and a string `content`; else a DataError
  naming the row and message."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f"{where}: `{field}` must be a non-empty list of {{role, content}}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      have = ", ".join(sorted(m)) if isinstance(m, dict) else type(m).__name__
      raise DataError(f"{where}: {field}[{i}] needs `role` and `content` (has {have})")
    if m["role"] not in chat.ROLES or not isinstance(m["content"], str):
      raise DataError(f"{where}: {field}[{i}] role {m['role']!r} with a "
                      f"{type(m['content']).__name__} content; allowed: roles "
                      f"{', '.join(chat.ROLES)} with string content")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def to_conversation(where: str, row: dict) -> Conversation:
  """A row with `messages`, or `prompt` + `completion` -> Conversation."""
  if not isinstance(row, dict):
    raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
  if "messages" in row:
    return Conversation(check_messages(row["messages"], where), where)
  if "prompt" in row and "completion" in row:
    return Conversation(_as_messages(row["prompt"], "user", where, "prompt") +
                        _as_messages(row["completion"], "assistant", where, "completion"), where)
  raise DataError(f"{where}: a row needs `messages`, or `prompt` and `completion` (has "
                  f"{', '.join(sorted(row)) or 'nothing'})")


def read_conversations(pattern: str, key: str = "config.data.files") -> list[Conversation]:
  """Every conversation in the files matching `pattern`, named from the glob's directory."""
  root = glob_root(pattern)
  return [dataclasses.replace(to_conversation(where, row), name=os.path.relpath(where, root))
          for where, row in read_rows(pattern, key)]


OPEN_ROWS = 16  # rows still taking conversations: first fit among the newest few, in order


def pack(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
         too_long: str = "cut") -> tuple[dict[str, np.ndarray], dict]:
  """(ids, mask) per conversation -> ({"tokens", "segment_ids", "loss_mask"} [N, seq_len] int32,
  counts). Each whole conversation goes to the first of the newest OPEN_ROWS rows it fits in."""
  rows, free = [], []
  counts = {"conversations": len(examples), "too_long": 0, "cut": 0, "dropped": 0, "no_loss": 0}
  for ids, mask in examples:
    if len(ids) > seq_len:
      counts["too_long"] += 1
      if too_long == "drop":
        counts["dropped"] += 1
        continue
      counts["cut"] += 1
      ids, mask = ids[:seq_len], mask[:seq_len]
    if not np.any(mask[1:]):  # the first token is never a target
      counts["no_loss"] += 1
    first = max(0, len(rows) - OPEN_ROWS)
    r = next((r for r in range(first, len(rows)) if free[r] >= len(ids)), None)
    if r is None:
      rows.append([])
      free.append(seq_len)
      r = len(rows) - 1
    rows[r].append((ids, mask))
    free[r] -= len(ids)
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("tokens", "segment_ids",
                                                                "loss_mask")}
  for r, conversations in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(conversations, 1):
      out["tokens"][r, at:at + len(ids)] = ids
      out["segment_ids"][r, at:at + len(ids)] = s
      out["loss_mask"][r, at:at + len(ids)] = mask
      at += len(ids)
  counts["rows"] = len(rows)
  return out, counts
