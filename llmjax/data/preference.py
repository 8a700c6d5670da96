"""Preference pairs: JSONL or Parquet rows {prompt, chosen, rejected} -> token rows of both
completions, each with the prompt before it and a mask of its completion's tokens.

The files are what HF `datasets` writes (`to_json(lines=True)`, `to_parquet`; read by
llmjax/data/chat_rows.py). `prompt` is text or a list of {role, content} messages; `chosen` and
`rejected` are text, or a list holding one assistant message. A pair whose completions are empty
or identical teaches nothing: one DataError naming the file and row.

With a chat template (config.data.chat_template, or any messages prompt: the tokenizer's own;
llmjax/data/chat.py) the prompt is rendered with the generation prompt, and each completion is
what rendering the conversation with that answer adds after it: the answer and the template's
end-of-turn marker (trailing whitespace left out), so the loss scores the turn's end as SFT
trained it. Without one, prompt and completions are the texts as given.

A row is cut to `seq_len` tokens: the prompt loses tokens from its start (down to half the row)
before a completion loses tokens from its end; cut rows are counted. With config.task.share_prompt
the cut pair's prompt is written once for both completions (llmjax/data/preference_shared.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from llmjax.data import chat, chat_rows, preference_shared, text, tokenizers
from llmjax.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: object  # str, or a list of {role, content} messages
  chosen: str
  rejected: str
  where: str  # "FILE:LINE" / "FILE row N": what an error names


@dataclasses.dataclass(frozen=True)
class PreferenceData:
  train: dict  # tokenize's arrays
  val: dict
  tokenizer: object
  info: dict  # tokenizer, vocab_size, pair counts, pairs cut to seq_len
  artifacts: dict  # tokenizer.json of a trained or hf: vocabulary
  val_texts: list  # (prompt as the model reads it, chosen answer) of each validation pair


def _completion(where: str, record: dict, key: str) -> str:
  value = record[key]
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
      and value[0].get("role") == "assistant":
    value = value[0].get("content")
  if not isinstance(value, str):
    raise DataError(f"{where}: {key!r} must be text or a list of one assistant message, got "
                    f"{type(value).__name__}")
  if not value.strip():
    raise DataError(f"{where}: {key!r} is empty; a preference pair needs two non-empty "
                    "completions")
  return value


def _pair(where: str, record: dict) -> Pair:
  if not isinstance(record, dict):
    raise DataError(f"{where}: a preference row must be an object, got {type(record).__name__}")
  missing = [k for k in FIELDS if k not in record]
  if missing:
    raise DataError(f"{where}: no field {', '.join(map(repr, missing))}; a preference row has "
                    f"{', '.join(FIELDS)} (fields here: {', '.join(map(repr, record))})")
  prompt = record["prompt"]
  if not isinstance(prompt, str):
    prompt = chat_rows.check_messages(prompt, where, "prompt")
  chosen, rejected = _completion(where, record, "chosen"), _completion(where, record, "rejected")
  if chosen == rejected:
    raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a preference pair needs "
                    "two different completions")
  return Pair(prompt, chosen, rejected, where)


def _fit(prompt_P: np.ndarray, completion_C: np.ndarray, seq_len: int):
  """(prompt, completion) cut to seq_len together (see module doc); and whether it was cut."""
  if len(prompt_P) + len(completion_C) <= seq_len:
    return prompt_P, completion_C, False
  keep = max(seq_len - len(completion_C), min(len(prompt_P), seq_len // 2))
  prompt_P = prompt_P[len(prompt_P) - keep:]
  return prompt_P, completion_C[:seq_len - len(prompt_P)], True


def tokenize(pairs: list[Pair], tokenizer, seq_len: int, render=None) -> tuple[dict, int]:
  """({"<side>_tokens", "<side>_segment_ids", "<side>_loss"} [N, seq_len] for both sides, the
  number of cut rows). `<side>_loss[t]` is 1 where position t predicts a completion token.

  `render(pair) -> (prompt text, chosen text, rejected text)`: how a chat template writes them
  (None: the texts as given; a messages prompt then needs a template)."""
  arrays = {f"{side}_{k}": np.zeros((len(pairs), seq_len), dt) for side in SIDES
            for k, dt in (("tokens", np.int32), ("segment_ids", np.int32), ("loss", np.float32))}
  cut = 0
  for i, pair in enumerate(pairs):
    prompt_P, *completions = _encode(pair, tokenizer, render)
    row_cut = False
    for side, completion_C in zip(SIDES, completions):
      p, c, was_cut = _fit(prompt_P, completion_C, seq_len)
      row_cut |= was_cut
      n = len(p) + len(c)
      arrays[f"{side}_tokens"][i, :n] = np.concatenate([p, c])
      arrays[f"{side}_segment_ids"][i, :n] = 1
      arrays[f"{side}_loss"][i, max(len(p) - 1, 0):n - 1] = 1.0  # t predicts token t + 1
    cut += row_cut
  return arrays, cut


def _encode(pair: Pair, tokenizer, render) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prompt, chosen, rejected) token ids of one pair."""
  texts = (render or _plain)(pair)
  # a template writes its own special tokens, as apply_chat_template does
  return tuple(np.asarray(tokenizer.encode_batch([text], add_special_tokens=i == 0 and
                                                 render is None)[0], np.int32)
               for i, text in enumerate(texts))


def tokenize_shared(pairs: list[Pair], tokenizer, seq_len: int, row_len: int,
                    pairs_per_row: int, render=None) -> tuple[dict, int, int]:
  """(llmjax/data/preference_shared.py's rows of the pairs, pairs cut, pairs dropped): each pair
  cut as `tokenize` cuts it, then its prompt shared by both completions in one row."""
  trees = [preference_shared.tree(*_encode(pair, tokenizer, render), seq_len, _fit)
           for pair in pairs]
  arrays, dropped = preference_shared.pack(trees, row_len, pairs_per_row)
  return arrays, sum(t[2] for t in trees), dropped


def _read(pattern: str, key: str) -> list[Pair]:
  pairs = [_pair(where, row) for where, row in chat_rows.read_rows(pattern, f"config.data.{key}")]
  if not pairs:
    raise DataError(f"config.data.{key}={pattern!r}: its files hold no preference pairs")
  return pairs


def templated(template: chat.Template):
  """`tokenize`'s render: (prompt with the generation prompt, chosen turn, rejected turn)."""
  def render(pair: Pair) -> tuple[str, str, str]:
    messages = pair.prompt if isinstance(pair.prompt, list) else [
        {"role": "user", "content": pair.prompt}]
    prompt = template.render(messages, add_generation_prompt=True, where=pair.where)
    out = [prompt]
    for answer in (pair.chosen, pair.rejected):
      full = template.render(messages + [{"role": "assistant", "content": answer}],
                             where=pair.where)
      turn = full[len(prompt):].rstrip()
      if not full.startswith(prompt) or answer.strip() not in turn:
        raise DataError(f"{pair.where}: chat template {template.name} does not render the "
                        "prompt (with its generation prompt) as the start of the conversation "
                        "with its answer, so the answer's tokens cannot be found")
      out.append(turn)
    return tuple(out)
  return render


def _split_off_val(exp, pairs: list[Pair]):
  """(train, val) by a stable hash of each prompt; both sides non-empty given two prompts."""
  keys = [json.dumps(p.prompt, sort_keys=True) for p in pairs]
  hashes = {k: text.unit_hash(exp.data.seed, k) for k in keys}
  cut = exp.data.val_fraction
  if len(set(keys)) >= 2:  # a tiny file can hash to one side: move the nearest prompt across
    ordered = sorted(hashes.values())
    cut = min(max(cut, ordered[0] + 1e-12), ordered[-1])
  val = [p for p, k in zip(pairs, keys) if hashes[k] < cut]
  return [p for p, k in zip(pairs, keys) if hashes[k] >= cut], val


def load(exp, workdir: str | None, render=None) -> PreferenceData:
  """The run's preference rows (config.data.files, val_files or a split of files by a stable
  hash of (seed, prompt): a prompt's pairs never sit on both sides), tokenizer and info."""
  d = exp.data
  train = _read(d.files, "files")
  if d.val_files:
    val = _read(d.val_files, "val_files")
  else:
    train, val = _split_off_val(exp, train)
  if d.max_bytes:  # the first pairs of each split up to about max_bytes of text (smoke runs)
    train, val = _take_bytes(train, d.max_bytes), _take_bytes(val, d.max_bytes)
  if not train or not val:
    raise DataError(f"config.data.files={d.files!r}: {len(train)} training and {len(val)} "
                    "validation pairs; both splits need at least one (set config.data.val_files "
                    "or add pairs with other prompts)")
  template = None
  if d.chat_template or any(not isinstance(p.prompt, str) for p in train + val):
    template = chat.load_template(d.chat_template, d.tokenizer)
  render = templated(template) if template is not None else None
  texts = lambda: [t for p in train for t in (render or _plain)(p)]  # noqa: E731
  tokenizer, artifacts = tokenizers.for_run(d.tokenizer, workdir, texts)
  arrays, cut, dropped = {}, {}, {}
  for name, pairs in (("train", train), ("val", val)):
    if exp.task.share_prompt:
      arrays[name], cut[name], dropped[name] = tokenize_shared(
          pairs, tokenizer, d.seq_len, shared_row_len(exp), exp.task.pairs_per_row, render)
    else:
      arrays[name], cut[name] = tokenize(pairs, tokenizer, d.seq_len, render)
  if cut["train"] or cut["val"]:
    print(f"config.data.seq_len={d.seq_len}: cut {cut['train']} training and {cut['val']} "
          "validation pairs to fit", file=sys.stderr)
  info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
          "pairs": {"train": len(train), "val": len(val)}, "cut_pairs": cut}
  if exp.task.share_prompt:
    _check_dropped(exp, dropped, arrays)
    info.update(dropped_pairs=dropped, rows={k: len(v["tokens"]) for k, v in arrays.items()})
  prompts = [(render or _plain)(p)[0] for p in val]
  if template is not None:
    info.update(chat_template=template.name,
                end_of_turn_ids=chat.end_of_turn_ids(template, tokenizer))
    artifacts = {**artifacts, "chat_template.jinja": template.source}
  return PreferenceData(arrays["train"], arrays["val"], tokenizer, info, artifacts,
                        [(prompt, p.chosen) for prompt, p in zip(prompts, val)])


def shared_row_len(exp) -> int:
  """The slots of a shared-prompt row: config.task.row_len, 0 meaning two rows' worth."""
  return exp.task.row_len or 2 * exp.data.seq_len


def _check_dropped(exp, dropped: dict, arrays: dict) -> None:
  """Say how many pairs did not fit a shared row; refuse a split left with none."""
  if dropped["train"] or dropped["val"]:
    print(f"config.task.row_len={shared_row_len(exp)}: dropped {dropped['train']} training and "
          f"{dropped['val']} validation pairs longer than a row", file=sys.stderr)
  for name, rows in arrays.items():
    if not len(rows["tokens"]):
      raise DataError(f"config.task.row_len={shared_row_len(exp)}: no {name} pair fits a shared "
                      f"row; raise it (0: 2 x data.seq_len = {2 * exp.data.seq_len})")


def _take_bytes(pairs: list[Pair], max_bytes: int) -> list[Pair]:
  total, out = 0, []
  for pair in pairs:
    if total >= max_bytes:
      break
    total += len(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode())
    out.append(pair)
  return out


def _plain(pair: Pair) -> tuple[str, str, str]:
  if not isinstance(pair.prompt, str):
    raise DataError(f"{pair.where}: 'prompt' is a list of messages, which needs a chat template")
  return pair.prompt, pair.chosen, pair.rejected
