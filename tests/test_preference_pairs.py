"""`python -m llmjax.data.preference_pairs` (gettext and stdlib pairs in disjoint, deterministic
splits) and the chat-template rendering of preference rows."""

import json
import textwrap

import polib

from llmjax.data import chat, instruct, preference, preference_pairs
from llmjax.data.tokenizers import ByteTokenizer

SOURCE = textwrap.dedent('''
    def add(a, b):
      """Sum of a and b."""
      return a + b


    def pick(items, key):
      """The item at key."""
      value = items[key]
      return value
    ''')


def test_gettext_pairs_reject_the_nearest_other_translation(tmp_path):
  po = polib.POFile()
  po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
  for i in range(30):
    po.append(polib.POEntry(msgid=f"Open file number {i}", msgstr=f"Datei Nummer {i} öffnen"))
  (tmp_path / "de" / "LC_MESSAGES").mkdir(parents=True)
  po.save_as_mofile(str(tmp_path / "de" / "LC_MESSAGES" / "x.mo"))
  args = ["--source=gettext", f"--locale_dir={tmp_path}", "--val_fraction=0.2",
          "--test_fraction=0.2"]
  assert preference_pairs.main([f"--out={tmp_path / 'a'}", *args]) == 0
  assert preference_pairs.main([f"--out={tmp_path / 'b'}", *args]) == 0
  rows = {}
  for split in instruct.SPLITS:
    text = (tmp_path / "a" / f"{split}.jsonl").read_text()
    assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()
    rows[split] = [json.loads(line) for line in text.splitlines()]
  names = [{r["name"] for r in rs} for rs in rows.values()]
  assert all(names) and sum(map(len, names)) == 30 == len(set().union(*names))
  memory = {r["chosen"] for r in rows["train"]}
  for split_rows in rows.values():
    for r in split_rows:
      english = r["prompt"][0]["content"].removeprefix("Translate to German: ")
      assert r["chosen"] == f"Datei Nummer {english.split()[-1]} öffnen"
      assert r["rejected"] != r["chosen"] and r["rejected"] in memory
      preference._pair("row", r)  # a valid dpo row
  assert preference_pairs.main([f"--out={tmp_path / 'c'}", "--source=web"]) == 2
  assert not (tmp_path / "c").exists()


def test_stdlib_pairs_swap_in_a_same_arity_body(monkeypatch):
  monkeypatch.setattr(instruct, "stdlib_functions",
                      lambda: instruct._functions_of("m.py", SOURCE))
  rows = preference_pairs.build(["stdlib"], "de", "", 1000, 0.0, 0.0, 0)["train"]
  by_name = {r["name"]: r for r in rows}
  assert set(by_name) == {"stdlib:m.py:add", "stdlib:m.py:pick"}
  add = by_name["stdlib:m.py:add"]
  assert add["chosen"].endswith("return a + b")
  assert add["rejected"] == ('def add(a, b):\n  """Sum of a and b."""\n  value = items[key]\n'
                             '  return value')


def test_rows_render_with_the_chat_template():
  """A completion is the answer plus the template's end-of-turn marker; the prompt ends with the
  generation prompt; the loss mask covers exactly the completion's tokens."""
  pair = preference._pair("row 1", {"prompt": [{"role": "user", "content": "Hi"}],
                                    "chosen": "Hallo", "rejected": "Tschüss"})
  render = preference.templated(chat.load_template("byte", "byte"))
  prompt, chosen, rejected = render(pair)
  assert prompt == "### User:\nHi\n\n### Assistant:\n"
  assert (chosen, rejected) == ("Hallo\x04", "Tschüss\x04")
  arrays, cut = preference.tokenize([pair], ByteTokenizer(), 48, render)
  tokens, loss = arrays["chosen_tokens"][0], arrays["chosen_loss"][0]
  targets = tokens[1:][loss[:-1] == 1]
  assert bytes(targets.tolist()).decode() == "Hallo\x04" and cut == 0
