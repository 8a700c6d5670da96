"""Zero-/few-shot classification with a causal LM: score each label after a prompt, pick the best.

The prompt of an example is K shots, each `template` filled with a shot's text, SEPARATOR, the
shot's gold label and SHOT_END, followed by `template` filled with the example's text. Label l is
scored as the continuation SEPARATOR + l (the template "Review: {text}\\nSentiment:" reads on as
"Sentiment: positive", so a template normally ends without a space) by summed log-probability
or, with `length_normalize`, the mean per token; the highest wins (the first label on a tie).
`{text}` is replaced literally, so other braces in a template are kept as they are.

Shots come from a separate labelled pool, never from the examples being classified; each example
gets its own K distinct shots drawn with `numpy.random.default_rng((seed, index))`, so the prompts
depend only on the seed and the example's position.

Tokenization follows lm-evaluation-harness for decoders: the choice tokens of label l are
plain(prompt + continuation) past plain(prompt), plain being the tokenizer without special
tokens, so the model sees exactly the tokenization of the whole text (SentencePiece's dummy
prefix, BPE merges); the context also gets the tokenizer's leading special tokens (BOS) but
never a trailing one (EOS, SEP) between context and choice. Where a tokenizer merges across the
prompt/label boundary the context is cut at the longest prefix every continuation shares.
"""

from __future__ import annotations

import inspect
import json
from typing import Sequence

import numpy as np

from llmjax.errors import UserError
from llmjax.eval import metrics, scoring

SEPARATOR = " "  # between a filled template and its label
SHOT_END = "\n"  # after each shot's label


class Example(tuple):
  """(text, label) read from `source` ("FILE:LINE"); unpacks and compares as a plain pair."""

  def __new__(cls, text: str, label: str, source: str | None = None):
    example = super().__new__(cls, (text, label))
    example.source = source
    return example


def read_jsonl(path: str, text_key: str = "text", label_key: str = "label") -> list[Example]:
  """One example per non-blank line: a JSON object with a string text and a string/int label."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read: {e}") from e
  examples = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path}:{number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
      raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in (text_key, label_key):
      if key not in record:
        raise UserError(f"{where}: no {key!r} key (keys: {', '.join(map(repr, record))})")
    text, label = record[text_key], record[label_key]
    if not isinstance(text, str):
      raise UserError(f"{where}: {text_key!r} must be a string, got {type(text).__name__}")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
      raise UserError(f"{where}: {label_key!r} must be a string or an integer, got {label!r}")
    examples.append(Example(text, str(label), where))
  if not examples:
    raise UserError(f"{path}: no examples (the file is empty)")
  return examples


def build_prompts(examples: Sequence[tuple[str, str]], labels: Sequence[str], template: str,
                  shots: int = 0, shot_pool: Sequence[tuple[str, str]] | None = None,
                  seed: int = 0) -> list[str]:
  """The prompt (shots, then the filled template) of each example; the label is not included."""
  labels = _check_labels(labels)
  if "{text}" not in template:
    raise UserError(f"template {template!r} has no {{text}} placeholder")
  _check_gold(examples, labels, "example")
  if shots < 0 or seed < 0:
    raise UserError(f"shots and seed must be >= 0, got shots={shots}, seed={seed}")
  if shots:
    if not shot_pool:
      raise UserError(f"shots={shots} needs a shot pool (a separate labelled file, --shot_data)")
    if shots > len(shot_pool):
      raise UserError(f"shots={shots} but the shot pool has only {len(shot_pool)} examples")
    _check_gold(shot_pool, labels, "shot")
  fill = lambda text: template.replace("{text}", text)  # noqa: E731
  prompts = []
  for index, (text, _) in enumerate(examples):
    picked = (np.random.default_rng((seed, index)).choice(len(shot_pool), shots, replace=False)
              if shots else [])
    prefix = "".join(fill(shot_pool[j][0]) + SEPARATOR + shot_pool[j][1] + SHOT_END
                     for j in picked)
    prompts.append(prefix + fill(text))
  return prompts


def encode_pair(tokenizer, context: str, continuations: Sequence[str]):
  """(context ids, [continuation ids]) as the module docstring describes."""
  plain = _plain_encoder(tokenizer)
  context_ids = plain(context)
  wholes = [plain(context + c) for c in continuations]
  keep = min([len(context_ids)] + [_shared_prefix(context_ids, w) for w in wholes])
  return _leading_specials(tokenizer, plain) + context_ids[:keep], [w[keep:] for w in wholes]


def classify(model, params, tokenizer, examples: Sequence[tuple[str, str]],
             labels: Sequence[str], template: str, shots: int = 0,
             shot_pool: Sequence[tuple[str, str]] | None = None, length_normalize: bool = False,
             seed: int = 0, *, max_len: int | None = None, rows_per_batch: int = 8) -> dict:
  """{'predictions': [label], 'scores': [N, C], 'confusion': [[int]], 'report': {...}}."""
  labels = _check_labels(labels)
  prompts = build_prompts(examples, labels, template, shots, shot_pool, seed)
  continuations = [SEPARATOR + label for label in labels]
  contexts, choices = [], []
  limit = min(model.cfg.max_len, max_len or model.cfg.max_len)
  for index, prompt in enumerate(prompts):
    context, ids = encode_pair(tokenizer, prompt, continuations)
    if len(context) + max(map(len, ids)) > limit:
      raise UserError(f"{_where(examples[index], 'example', index)}: the prompt is "
                      f"{len(context)} tokens, too long for a label after it within max_len "
                      f"{limit} (fewer shots or a shorter template would fit)")
    contexts.append(context)
    choices.append(ids)
  scores_NC = scoring.choice_scores(model, params, contexts, choices,
                                    length_normalize=length_normalize, max_len=max_len,
                                    rows_per_batch=rows_per_batch)
  index_of = {label: i for i, label in enumerate(labels)}
  predictions_N = np.argmax(scores_NC, axis=1).astype(np.int32)
  gold_N = np.array([index_of[label] for _, label in examples], np.int32)
  confusion_CC = np.asarray(metrics.confusion_matrix(predictions_N, gold_N, len(labels)))
  return {"predictions": [labels[i] for i in predictions_N], "scores": scores_NC,
          "confusion": confusion_CC.tolist(),
          "report": metrics.classification_report(confusion_CC, labels)}


def _check_labels(labels: Sequence[str]) -> list[str]:
  labels = list(labels)
  if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
    raise UserError(f"labels must be two or more distinct non-empty names, got {labels}")
  return labels


def _check_gold(examples, labels: list[str], kind: str) -> None:
  for index, example in enumerate(examples):
    if example[1] not in labels:
      raise UserError(f"{_where(example, kind, index)}: label {example[1]!r} is not one of "
                      f"the labels {labels}")


def _where(example, kind: str, index: int) -> str:
  return getattr(example, "source", None) or f"{kind} {index}"


def _plain_encoder(tokenizer):
  """text -> token ids without special tokens, for transformers and llmjax tokenizers alike."""
  hf = getattr(tokenizer, "hf", None)  # llmjax.hf.TextTokenizer
  if hf is not None:
    return lambda text: [int(i) for i in hf.encode(text, add_special_tokens=False)]
  if "add_special_tokens" in inspect.signature(tokenizer.encode).parameters:
    return lambda text: [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
  return lambda text: [int(i) for i in tokenizer.encode(text)]


def _leading_specials(tokenizer, plain) -> list[int]:
  """The special tokens `tokenizer.encode` puts before the text (e.g. BOS), found on a probe."""
  full, text = [int(i) for i in tokenizer.encode("a")], plain("a")
  for start in range(len(full) - len(text) + 1):
    if full[start:start + len(text)] == text:
      return full[:start]
  return []


def _shared_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n
