"""Chat templates and the assistant mask (llmjax/data/chat.py), instruction rows and packing
(llmjax/data/chat_rows.py): four families' template formats, offline tokenizers."""

import json

import numpy as np
import pytest

from _chat_helpers import FAMILIES, model_dir
from llmjax.data import chat, chat_rows, tokenizers
from llmjax.errors import DataError

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "Grüße? 日本"},
         {"role": "assistant", "content": "  Hallo — 日本語!  "},
         {"role": "user", "content": "again"}, {"role": "assistant", "content": "Yes."}]
TRIMS = {"llama3", "gemma"}  # their templates trim each message


def _runs(ids, mask):
  """Contiguous runs of masked ids."""
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_assistant_mask_of_each_family(tmp_path, family):
  from transformers import AutoTokenizer  # the reference renderer
  template_src, _, _, marker = FAMILIES[family]
  path = model_dir(tmp_path, family)
  messages = ([SYSTEM] if family in ("llama3", "qwen2.5") else []) + TURNS
  template = chat.load_template("", f"hf:{path}")
  tokenizer = tokenizers.get_tokenizer(f"hf:{path}")
  reference = AutoTokenizer.from_pretrained(path)
  assert template.source == template_src
  assert template.render(messages) == reference.apply_chat_template(messages, tokenize=False)
  assert (template.render(messages[:-1], add_generation_prompt=True) ==
          reference.apply_chat_template(messages[:-1], tokenize=False,
                                        add_generation_prompt=True))
  ids, mask = chat.render_masked(template, tokenizer, messages)
  ref_ids = reference.apply_chat_template(messages, tokenize=True)
  ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
  assert ids.tolist() == list(ref_ids)
  hf = reference.backend_tokenizer if hasattr(reference, "backend_tokenizer") else None
  decode = lambda r: hf.decode(r, skip_special_tokens=False)
  contents = [m["content"].strip() if family in TRIMS else m["content"]
              for m in messages if m["role"] == "assistant"]
  assert [decode(r) for r in _runs(ids, mask)] == [c + marker for c in contents]
  # last_assistant: only the final turn; all: every token
  _, last = chat.render_masked(template, tokenizer, messages, "last_assistant")
  assert [decode(r) for r in _runs(ids, last)] == [contents[-1] + marker]
  _, every = chat.render_masked(template, tokenizer, messages, "all")
  assert every.all()
  eot = chat.end_of_turn_ids(template, tokenizer)
  assert [decode([i]) for i in eot] == [marker]


def test_byte_template_mask_and_prompt():
  template = chat.load_template("byte", "byte")
  tokenizer = tokenizers.ByteTokenizer()
  ids, mask = chat.render_masked(template, tokenizer, [SYSTEM] + TURNS)
  assert tokenizer.decode(ids[mask == 1]) == "  Hallo — 日本語!  \x04Yes.\x04"
  assert chat.end_of_turn_ids(template, tokenizer) == [4]
  prompt, reference = chat.prompt_and_reference(template, [SYSTEM] + TURNS)
  assert prompt.endswith("### User:\nagain\n\n### Assistant:\n") and reference == "Yes."


def test_rows_formats_and_packing(tmp_path, monkeypatch):
  import pyarrow as pa  # Parquet as HF datasets writes it
  import pyarrow.parquet as pq
  rows = [{"messages": [SYSTEM] + TURNS},
          {"prompt": "2+2?", "completion": "4"},
          {"prompt": [{"role": "user", "content": "hi"}],
           "completion": [{"role": "assistant", "content": "hello"}]}]
  (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
  pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "b.parquet")
  conversations = chat_rows.read_conversations(str(tmp_path / "*"))
  assert [c.messages for c in conversations] == [
      [SYSTEM] + TURNS, [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}],
      [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
  # Errors name the file where it is; the split hashes its name from the glob's directory, so
  # the split stays when the data moves or the glob is relative.
  assert conversations[0].where == f"{tmp_path / 'a.jsonl'}:1"
  names = ["a.jsonl:1", "a.jsonl:2", "b.parquet row 1"]
  assert [c.split_key for c in conversations] == names
  monkeypatch.chdir(tmp_path.parent)
  assert [c.split_key for c in chat_rows.read_conversations(f"{tmp_path.name}/*")] == names
  examples = [(np.arange(1, n + 1), np.ones(n, np.int32)) for n in (5, 4, 9, 3)]
  packed, counts = chat_rows.pack(examples, 8, "cut")
  assert packed["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 4 + [0] * 4, [1] * 8]
  assert packed["tokens"][0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3]
  assert counts == {"conversations": 4, "too_long": 1, "cut": 1, "dropped": 0, "no_loss": 0,
                    "rows": 3}
  packed, counts = chat_rows.pack(examples, 8, "drop")
  assert counts["dropped"] == 1 and packed["segment_ids"].tolist() == [[1] * 5 + [2] * 3,
                                                                      [1] * 4 + [0] * 4]


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user"}]}, "messages[0] needs `role` and `content`"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    ({"text": "x"}, "needs `messages`, or `prompt` and `completion`")])
def test_bad_rows_name_the_row(tmp_path, row, needle):
  (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" +
                                    json.dumps(row) + "\n")
  with pytest.raises(DataError, match=f"d.jsonl:2: .*{needle}".replace("[", r"\[")
                     .replace("]", r"\]")):
    chat_rows.read_conversations(str(tmp_path / "*.jsonl"))


def test_bad_templates(tmp_path):
  gemma = chat.Template(FAMILIES["gemma"][0], "gemma")
  with pytest.raises(DataError, match="cannot render it .*System role not supported"):
    chat.assistant_spans(gemma, [SYSTEM] + TURNS, where="f.jsonl:3")
  with pytest.raises(DataError, match="has no chat template .*config.data.chat_template"):
    chat.load_template("", "byte")
  with pytest.raises(DataError, match="neither a built-in"):
    chat.load_template(str(tmp_path / "none.jinja"), "byte")
