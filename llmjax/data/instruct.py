"""Offline instruction data from text every machine has, written as JSONL `messages` rows.

  python -m llmjax.data.instruct --out=DIR [--source=stdlib,gettext] [--lang=de]
      [--max_chars=300] [--val_fraction=0.05] [--test_fraction=0.05] [--seed=0]

- stdlib: each function of the interpreter's standard library with a docstring (top level or a
  method; no tests): the user asks for a function with its signature and docstring, the
  assistant answers with its source.
- gettext: the machine's gettext catalogs (llmjax/data/gettext_pairs.py): "Translate to German:
  <English>" answered by the human translation.

Each example lands in train, val or test by a stable hash of its name (the function's
`module:qualname`, the English message), so the splits are disjoint and the same on every run;
an example longer than `max_chars` (question plus answer) is left out. DIR/{train,val,test}.jsonl
and DIR/manifest.json (counts and sha256 per split) are written.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import textwrap

from llmjax.data import gettext_pairs, text
from llmjax.data.sources import stdlib_files, stdlib_root
from llmjax.errors import UserError, print_error

LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "sv": "Swedish", "pl": "Polish", "ru": "Russian", "ja": "Japanese"}
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Function:
  """A standard-library function: what the user is shown (header) and its whole source."""
  name: str  # module:qualname
  header: str  # the signature and docstring, as written, dedented
  source: str  # the whole definition, dedented
  arity: int  # positional and keyword parameters, self/cls included


def _functions_of(module: str, source: str) -> list[Function]:
  out = []

  def visit(node, prefix):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.ClassDef):
        visit(child, f"{prefix}{child.name}.")
      elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if ast.get_docstring(child) and not child.decorator_list:
          segment = ast.get_source_segment(source, child, padded=True)
          doc_end = child.body[0].end_lineno - child.lineno + 1
          if segment is not None and len(child.body) > 1:  # a body besides the docstring
            lines = textwrap.dedent(segment).splitlines()
            a = child.args
            arity = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            out.append(Function(f"{module}:{prefix}{child.name}", "\n".join(lines[:doc_end]),
                                "\n".join(lines), arity))
  visit(ast.parse(source), "")
  return out


def stdlib_functions() -> list[Function]:
  """Every documented, undecorated function of the standard library, one per distinct source,
  in module order."""
  root, out, seen = stdlib_root(), [], set()
  for path in stdlib_files():
    try:
      functions = _functions_of(str(path.relative_to(root)), path.read_text("utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):  # a file this parser cannot read
      continue
    for f in functions:
      if f.source not in seen:
        seen.add(f.source)
        out.append(f)
  return out


def function_messages(f: Function) -> list[dict]:
  """The stdlib instruction: signature + docstring asked for, the source answered."""
  return [{"role": "user", "content": f"Write the Python function:\n{f.header}"},
          {"role": "assistant", "content": f.source}]


def translation_messages(english: str, translation: str, lang: str) -> list[dict]:
  """The gettext instruction: translate the English message."""
  return [{"role": "user", "content": f"Translate to {LANGUAGES.get(lang, lang)}: {english}"},
          {"role": "assistant", "content": translation}]


def split_of(name: str, val_fraction: float, test_fraction: float, seed: int) -> str:
  """train, val or test by a stable hash of (seed, name)."""
  u = text.unit_hash(seed, name)
  return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def build(sources: list[str], lang: str, locale_dir: str, max_chars: int, val_fraction: float,
          test_fraction: float, seed: int) -> dict[str, list[dict]]:
  """{split: rows}, each row {"messages", "name", "source"}."""
  named = []
  if "stdlib" in sources:
    named += [(f"stdlib:{f.name}", "stdlib", function_messages(f)) for f in stdlib_functions()]
  if "gettext" in sources:
    pairs, _ = gettext_pairs.gettext_pairs(locale_dir, lang)
    named += [(f"gettext:{e}", "gettext", translation_messages(e, t, lang)) for e, t in pairs]
  out = {s: [] for s in SPLITS}
  for name, source, messages in named:
    if sum(len(m["content"]) for m in messages) <= max_chars:
      out[split_of(name, val_fraction, test_fraction, seed)].append(
          {"messages": messages, "name": name, "source": source})
  return out


def write(rows: dict[str, list[dict]], out_dir: str, settings: dict,
          content=lambda row: json.dumps(row["messages"])) -> dict:
  """DIR/{split}.jsonl and DIR/manifest.json (rows, rows per source and a sha256 over each row's
  name and `content(row)` per split); returns the manifest."""
  os.makedirs(out_dir, exist_ok=True)
  manifest = {"settings": settings, "splits": {}}
  for split, split_rows in rows.items():
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for row in split_rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    manifest["splits"][split] = {
        "rows": len(split_rows),
        "by_source": {s: sum(r["source"] == s for r in split_rows) for s in settings["source"]},
        "sha256": gettext_pairs.pairs_sha256([r["name"], content(r)] for r in split_rows)}
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  return manifest


def command(prog: str, doc: str, sources: tuple[str, ...], build, argv: list[str] | None,
            content=lambda row: json.dumps(row["messages"])) -> int:
  """The command line of a JSONL builder (this module's and preference_pairs'): parses the
  shared flags, calls build(sources, lang, locale_dir, max_chars, val_fraction, test_fraction,
  seed) and writes its splits; bad input is one line and exit 2."""
  p = argparse.ArgumentParser(prog=prog, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--source", default=",".join(sources))
  p.add_argument("--lang", default="de")
  p.add_argument("--locale_dir", default="/usr/share/locale")
  p.add_argument("--max_chars", type=int, default=300)
  p.add_argument("--val_fraction", type=float, default=0.05)
  p.add_argument("--test_fraction", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  chosen = [s for s in args.source.split(",") if s]
  try:
    if not chosen or set(chosen) - set(sources):
      raise UserError(f"--source={args.source!r}: allowed {', '.join(sources)} (one or more, "
                      "comma-separated)")
    if not (0 <= args.val_fraction and 0 <= args.test_fraction
            and args.val_fraction + args.test_fraction < 1):
      raise UserError("--val_fraction and --test_fraction must be >= 0 with a sum below 1")
    rows = build(chosen, args.lang, args.locale_dir, args.max_chars, args.val_fraction,
                 args.test_fraction, args.seed)
  except UserError as e:
    print_error(str(e))
    return 2
  manifest = write(rows, args.out, {**vars(args), "source": chosen}, content)
  print(json.dumps({s: m["rows"] for s, m in manifest["splits"].items()}))
  return 0


def main(argv: list[str] | None = None) -> int:
  """python -m llmjax.data.instruct."""
  return command("python -m llmjax.data.instruct", __doc__, ("stdlib", "gettext"), build, argv)


if __name__ == "__main__":
  sys.exit(main())
