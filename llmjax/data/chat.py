"""Chat templates and the assistant loss mask: conversations -> rendered text -> token ids + mask.

A template is jinja text rendered with transformers' own chat-template machinery
(`render_jinja_template`, what `tokenizer.apply_chat_template` calls), from the model directory's
`chat_template` (tokenizer_config.json or chat_template.jinja), a file, or a built-in (`byte`
for llmjax's own byte-level runs, `chatml`).

The mask needs no `{% generation %}` tags: each assistant message is found by character offsets
in the rendered text (searched from where the prefix rendered with the generation prompt ends),
its span runs on over the template's end-of-turn marker (what rendering the conversation up to
and including that message adds after the content, trailing whitespace left out), and a token is
trained on when its characters overlap a span. `train_on`: `assistant` (every assistant turn),
`last_assistant`, `all` (every token of the conversation).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jinja2
import numpy as np

from llmjax.errors import DataError

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "all", "last_assistant")

# llmjax's byte-level runs: plain-text headers a base model trained on code and prose can read,
# and one end-of-turn byte (ASCII EOT, which the corpus never holds) that stops generation.
BYTE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### User:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}\x04\n\n"
    "{% else %}{{ raise_exception('role ' + m['role'] + ' is not one of system, user, "
    "assistant') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BUILTIN = {"byte": BYTE_TEMPLATE, "chatml": CHATML_TEMPLATE}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclasses.dataclass(frozen=True)
class Template:
  """A chat template and the special-token strings it may read (bos_token, eos_token, ...)."""
  source: str
  name: str
  special: tuple[tuple[str, str], ...] = ()

  def render(self, messages: list[dict], add_generation_prompt: bool = False,
             where: str = "") -> str:
    """The conversation as text, exactly as `apply_chat_template(..., tokenize=False)` gives it."""
    # deferred: transformers is heavy and only needed when conversations are rendered
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
      rendered, _ = render_jinja_template(
          conversations=[messages], chat_template=self.source,
          add_generation_prompt=add_generation_prompt, **dict(self.special))
    except (jinja2.TemplateError, TypeError, ValueError) as e:
      raise DataError(f"{where or 'a conversation'}: chat template {self.name} cannot render it "
                      f"(roles {', '.join(m['role'] for m in messages)}): "
                      f"{' '.join(str(e).split())[:200]}") from e
    return rendered[0]


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json stores it: a string or {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def model_template(path: str) -> Template | None:
  """The chat template of a Hugging Face model directory, or None if it has none."""
  config_file = os.path.join(path, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  source = config.get("chat_template")
  if isinstance(source, list):  # named templates: transformers uses "default"
    source = {t.get("name"): t.get("template") for t in source}.get("default")
  jinja_file = os.path.join(path, "chat_template.jinja")
  if not source and os.path.isfile(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      source = f.read()
  if not source:
    return None
  special = tuple((k, t) for k in SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None)
  return Template(source, f"of {path}", special)


def load_template(spec: str, tokenizer_spec: str) -> Template:
  """config.data.chat_template (a built-in name, a file, or "" for the tokenizer's own) ->
  Template; a DataError naming the key when there is none."""
  if spec in BUILTIN:
    return Template(BUILTIN[spec], f"{spec!r} (built-in)")
  if spec:
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
      raise DataError(f"config.data.chat_template={spec!r} is neither a built-in "
                      f"({', '.join(BUILTIN)}) nor a file")
    with open(path, encoding="utf-8") as f:
      return Template(f.read(), f"file {spec}")
  template = None
  if tokenizer_spec.startswith("hf:"):
    template = model_template(os.path.expanduser(tokenizer_spec[3:]))
  if template is None:
    raise DataError(f"config.data.tokenizer={tokenizer_spec!r} has no chat template "
                    "(tokenizer_config.json chat_template or chat_template.jinja) and "
                    "config.data.chat_template is not set; allowed: a jinja file or a built-in "
                    f"({', '.join(BUILTIN)})")
  return template


def _prefix_end(template: Template, messages: list[dict], i: int, text: str) -> int | None:
  """Where message i's turn starts its content at the earliest: the end of the conversation
  before it rendered with the generation prompt, when that is a prefix of the full text."""
  if i == 0:
    return 0
  try:
    prefix = template.render(messages[:i], add_generation_prompt=True)
  except DataError:  # a template that refuses partial conversations: search from the last span
    return None
  return len(prefix) if text.startswith(prefix) else None


def _turn_end(template: Template, messages: list[dict], i: int, text: str, content_end: int):
  """The end of message i's end-of-turn marker: the conversation rendered up to it, right-
  stripped, when that is a prefix of the full text; else the content's end."""
  try:
    turn = template.render(messages[:i + 1]).rstrip()
  except DataError:
    return content_end
  return max(content_end, len(turn)) if text.startswith(turn) else content_end


def assistant_spans(template: Template, messages: list[dict], train_on: str = "assistant",
                    where: str = "") -> tuple[str, list[tuple[int, int]]]:
  """(rendered text, character spans [start, end) trained on): assistant contents + markers."""
  text = template.render(messages, where=where)
  if train_on == "all":
    return text, [(0, len(text))]
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if train_on == "last_assistant":
    turns = turns[-1:]
  spans, searched = [], 0
  for i in turns:
    start = _prefix_end(template, messages, i, text)
    start = searched if start is None else max(start, searched)
    content = messages[i]["content"]
    pos = text.find(content, start)
    if pos < 0 and content.strip():  # templates that trim (Llama 3, Gemma)
      content = content.strip()
      pos = text.find(content, start)
    if pos < 0:
      raise DataError(f"{where or 'a conversation'}: chat template {template.name} does not "
                      f"reproduce assistant message {i}'s content verbatim, so its tokens cannot "
                      "be found")
    end = pos + len(content)
    spans.append((pos, _turn_end(template, messages, i, text, end)))
    searched = spans[-1][1]
  return text, spans


def token_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids [T], character offsets [T, 2]) of `text` with no special tokens added (the template
  writes its own, as apply_chat_template does)."""
  if hasattr(tokenizer, "encode_offsets"):
    return tokenizer.encode_offsets(text)
  # a transformers tokenizer (llmjax.hf.tokens.TextTokenizer wraps one as .hf)
  hf = getattr(tokenizer, "hf", tokenizer)
  enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
  return (np.asarray(enc["input_ids"], np.int32),
          np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2))


def mask_tokens(offsets_T2: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
  """[T] int32: 1 where a token's characters overlap a span (a token that straddles the start of
  an assistant message is what the model must produce after the generation prompt)."""
  mask_T = np.zeros(len(offsets_T2), np.int32)
  for start, end in spans:
    mask_T |= (offsets_T2[:, 0] < end) & (offsets_T2[:, 1] > start)
  return mask_T


def render_masked(template: Template, tokenizer, messages: list[dict],
                  train_on: str = "assistant", where: str = "") -> tuple[np.ndarray, np.ndarray]:
  """A conversation -> (token ids [T] int32, assistant mask [T] int32)."""
  text, spans = assistant_spans(template, messages, train_on, where)
  ids_T, offsets_T2 = token_offsets(tokenizer, text)
  return np.asarray(ids_T, np.int32), mask_tokens(offsets_T2, spans)


def prompt_and_reference(template: Template, messages: list[dict],
                         where: str = "") -> tuple[str, str] | None:
  """(the conversation before its last assistant message, rendered with the generation prompt;
  that message's content): what a greedy completion is scored against. None if no assistant."""
  last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
  if last is None:
    return None
  prompt = template.render(messages[:last], add_generation_prompt=True, where=where)
  return prompt, messages[last]["content"]


def end_of_turn_ids(template: Template, tokenizer) -> list[int]:
  """Token ids that end an assistant turn in generation: the first token of the template's
  end-of-turn marker (found on a probe conversation), e.g. <|im_end|>, <|eot_id|>, EOT byte."""
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
  text, spans = assistant_spans(template, messages)
  end = text.find("Yes", spans[-1][0]) + len("Yes")
  ids_T, offsets_T2 = token_offsets(tokenizer, text)
  after = [int(t) for t, (s, e) in zip(ids_T, offsets_T2) if s >= end and e <= spans[-1][1]
           and e > s]
  return after[:1]
