"""Conversations from a tensorflow-datasets dataset (config.data.source='tfds', task sft).

Each record becomes a row of the JSONL format (llmjax/data/chat_rows.py) before it becomes a
Conversation, so both sources have one set of rules and errors. `config.data.chat_fields` maps
the dataset's fields to the row's, comma-separated `ROLE=FIELD[+FIELD...]`:

  messages=F            F holds the whole conversation (a tfds Sequence of {role, content})
  system=F              a system turn before the prompt (left out where F is empty)
  prompt=F[+G...]       the user turn: the fields' texts joined by a blank line, empty ones left
                        out (databricks_dolly: prompt=instruction+context)
  completion=F[+G...]   the assistant turn, joined alike

"" (the default) reads the record's own `messages`, or `prompt` and `completion` fields, as the
JSONL source does. Splits: config.data.tfds_split, and config.data.tfds_val_split (""
splits validation off the training split by a stable hash, as for files).
"""

from __future__ import annotations

import numpy as np

from llmjax.data import chat_rows
from llmjax.data.sources import tfds_labelled_sources
from llmjax.errors import ConfigError, DataError

ROLES = ("messages", "system", "prompt", "completion")


def parse_fields(fields: str) -> dict[str, list[str]]:
  """config.data.chat_fields -> {role: [field, ...]}; a ConfigError naming what is wrong."""
  out: dict[str, list[str]] = {}
  for part in filter(None, (p.strip() for p in fields.split(","))):
    role, eq, names = part.partition("=")
    role, names = role.strip(), [n.strip() for n in names.split("+")]
    if not eq or role not in ROLES or role in out or not all(names):
      raise ConfigError(f"config.data.chat_fields={fields!r}: {part!r} is not ROLE=FIELD[+FIELD"
                        f"...] with a new ROLE among {', '.join(ROLES)}")
    out[role] = names
  if out and ("messages" in out) == ("completion" in out or "prompt" in out):
    raise ConfigError(f"config.data.chat_fields={fields!r}: name either messages=FIELD, or "
                      "prompt=FIELD and completion=FIELD (system=FIELD optional)")
  if out and "messages" not in out and not {"prompt", "completion"} <= set(out):
    raise ConfigError(f"config.data.chat_fields={fields!r}: both prompt=FIELD and "
                      "completion=FIELD are needed")
  return out


def plain(value):
  """A tfds value as JSON would hold it: text from bytes, lists from arrays, a Sequence of
  dicts (tfds gives a dict of equally long arrays) as a list of dicts."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray):
    return plain(value.item()) if value.ndim == 0 else [plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, dict):
    columns = {k: plain(v) for k, v in value.items()}
    lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
    if columns and len(lengths) == 1 and -1 not in lengths:
      return [dict(zip(columns, row)) for row in zip(*columns.values())]
    return columns
  return value


def to_row(record: dict, fields: dict[str, list[str]], where: str, name: str) -> dict:
  """A tfds record -> a row of the JSONL format, its fields mapped by `fields`."""
  if not fields:
    return {k: plain(v) for k, v in record.items()}

  def text(role):
    missing = [f for f in fields[role] if f not in record]
    if missing:
      raise DataError(f"tfds dataset {name!r} has no field {missing[0]!r} (config.data."
                      f"chat_fields {role}=...); available: {', '.join(sorted(record))}")
    values = [plain(record[f]) for f in fields[role]]
    if role == "messages":
      return values[0]
    return "\n\n".join(v for v in map(str, values) if v.strip())
  if "messages" in fields:
    return {"messages": text("messages")}
  messages = [{"role": "user", "content": text("prompt")},
              {"role": "assistant", "content": text("completion")}]
  system = text("system") if "system" in fields else ""
  return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def read(d) -> dict[str, list]:
  """{"train": [Conversation], "val": [...] (only with config.data.tfds_val_split)}."""
  fields = parse_fields(d.chat_fields)
  _, splits = tfds_labelled_sources(d)
  out = {}
  for split_name, (_, split, source) in splits.items():
    if split_name == "test":
      continue
    conversations = []
    for i in range(len(source)):
      where = f"tfds {d.tfds_name} {split}[{i}]"
      conversations.append(chat_rows.to_conversation(where, to_row(source[i], fields, where,
                                                                   d.tfds_name)))
    out[split_name] = conversations
  return out
