"""The size rule of the house style, read from the source with ast: no module under llmjax/ over
400 lines, no function (or method) over 60. Today's offenders are listed, each a strict expected
failure, so the lists only shrink; anything not listed fails at once."""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

KNOWN_LONG_MODULES: dict = {}  # path -> why, each a strict expected failure (none today)
KNOWN_LONG_FUNCTIONS: dict = {}  # "path:function" -> why (none today)


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


def _known(table):
  """Parameters for the strict expected failures of a KNOWN_* table."""
  return [pytest.param(key, marks=pytest.mark.xfail(strict=True, reason=why), id=key)
          for key, why in table.items()]


def test_modules_are_at_most_400_lines():
  new = {m: n for m, n in long_modules().items() if m not in KNOWN_LONG_MODULES}
  assert not new, f"modules over {MAX_MODULE_LINES} lines (split them): {new}"


if KNOWN_LONG_MODULES:  # one strict expected failure per entry; none once the table is empty
  @pytest.mark.parametrize("module", _known(KNOWN_LONG_MODULES))
  def test_known_long_module_is_split(module):
    assert module not in long_modules(), f"{module}: {long_modules()[module]} lines"


def test_functions_are_at_most_60_lines():
  new = {f: n for f, n in long_functions().items() if f not in KNOWN_LONG_FUNCTIONS}
  assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split them): {new}"


if KNOWN_LONG_FUNCTIONS:  # one strict expected failure per entry; none once the table is empty
  @pytest.mark.parametrize("function", _known(KNOWN_LONG_FUNCTIONS))
  def test_known_long_function_is_split(function):
    assert function not in long_functions(), f"{function}: {long_functions()[function]} lines"
