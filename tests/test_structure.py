"""The size rule of the house style, read from the source with ast: no module under llmjax/ over
400 lines, no function (or method) over 60."""

from __future__ import annotations

import ast
import functools
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


@functools.cache
def long_modules() -> dict[str, int]:
  """Module path -> line count, for modules over MAX_MODULE_LINES."""
  out = {}
  for path in sorted((ROOT / "llmjax").rglob("*.py")):
    n = len(path.read_text().splitlines())
    if n > MAX_MODULE_LINES:
      out[path.relative_to(ROOT).as_posix()] = n
  return out


@functools.cache
def long_functions() -> dict[str, int]:
  """'path:qualified.name' -> line count (def line to last line), for functions over
  MAX_FUNCTION_LINES; nested functions and methods count on their own."""
  out = {}
  for path in sorted((ROOT / "llmjax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          name = prefix + child.name
          if not isinstance(child, ast.ClassDef):
            n = child.end_lineno - child.lineno + 1
            if n > MAX_FUNCTION_LINES:
              out[f"{rel}:{name}"] = n
          visit(child, name + ".")
        else:
          visit(child, prefix)

    visit(ast.parse(path.read_text(), str(path)), "")
  return out


def test_modules_are_at_most_400_lines():
  new = long_modules()
  assert not new, f"modules over {MAX_MODULE_LINES} lines (split them): {new}"


def test_functions_are_at_most_60_lines():
  new = long_functions()
  assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split them): {new}"

