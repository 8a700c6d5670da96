"""`python -m llmjax.data.instruct`: stdlib functions and gettext messages as instruction rows,
in deterministic, disjoint splits."""

import json
import textwrap

import polib

from llmjax.data import instruct

SOURCE = textwrap.dedent('''
    def add(a, b, *, c=0):
      """Sum of a, b and c."""
      return a + b + c


    def only_doc():
      """Nothing else."""


    class Box:
      def get(self, key):
        """The value at key."""
        return self.data[key]

      @property
      def size(self):
        """How many."""
        return 3
    ''')


def test_functions_are_asked_by_signature_and_docstring_and_answered_with_source():
  functions = instruct._functions_of("m.py", SOURCE)
  assert [(f.name, f.arity) for f in functions] == [("m.py:add", 3), ("m.py:Box.get", 2)]
  get = functions[1]
  assert get.header == 'def get(self, key):\n  """The value at key."""'
  assert get.source == get.header + "\n  return self.data[key]"
  user, assistant = instruct.function_messages(get)
  assert user["content"].endswith(get.header) and assistant["content"] == get.source


def test_gettext_rows_split_disjointly_and_deterministically(tmp_path):
  po = polib.POFile()
  po.metadata = {"Content-Type": "text/plain; charset=UTF-8"}
  for i in range(40):
    po.append(polib.POEntry(msgid=f"Open file number {i}", msgstr=f"Datei Nummer {i} öffnen"))
  (tmp_path / "de" / "LC_MESSAGES").mkdir(parents=True)
  po.save_as_mofile(str(tmp_path / "de" / "LC_MESSAGES" / "x.mo"))
  args = ["--source=gettext", f"--locale_dir={tmp_path}", "--val_fraction=0.2",
          "--test_fraction=0.2"]
  assert instruct.main([f"--out={tmp_path / 'a'}", *args]) == 0
  assert instruct.main([f"--out={tmp_path / 'b'}", *args]) == 0
  rows = {}
  for split in instruct.SPLITS:
    text = (tmp_path / "a" / f"{split}.jsonl").read_text()
    assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()
    rows[split] = [json.loads(line) for line in text.splitlines()]
  names = [{r["name"] for r in rs} for rs in rows.values()]
  assert all(names) and sum(map(len, names)) == 40 == len(set().union(*names))
  first = rows["train"][0]["messages"]
  assert first[0]["content"].startswith("Translate to German: Open file number ")
  assert first[1]["content"].startswith("Datei Nummer ")
  manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
  assert {s: m["rows"] for s, m in manifest["splits"].items()} == {
      s: len(r) for s, r in rows.items()}
  assert instruct.main([f"--out={tmp_path / 'c'}", "--source=web"]) == 2
  assert not (tmp_path / "c").exists()
