"""`llmjax --help`, `llmjax help`, and every verb's `--help`/`-h`: usage and all of its own flags.

The flags a verb should list are read from its source (every DEFINE_* call), not from absl, so a
flag the help forgets fails here. Each command is a real subprocess (absl's FLAGS are global, and
one process can import only one verb); they cost a fraction of a second each, as none imports jax.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from llmjax.cli.main import VERBS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, module="llmjax.cli.main"):
  # -X importtime lists every module imported, on stderr: how the tests see that jax is not.
  return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def _imported(stderr):
  return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
          if line.startswith("import time:") and "|" in line}


def _defined_flags(verb):
  """{name: (default, help)} for each flags.DEFINE_*/config_flags.DEFINE_* call in the verb."""
  path = os.path.join(ROOT, "llmjax", "cli", f"{verb}.py")
  found = {}
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE_"):
      kw = {k.arg: k.value for k in node.keywords}
      help_at = 3 if node.func.attr == "DEFINE_enum" else 2
      default = node.args[1] if len(node.args) > 1 else kw.get("default")
      text = node.args[help_at] if len(node.args) > help_at else (kw.get("help")
                                                                  or kw.get("help_string"))
      found[ast.literal_eval(node.args[0])] = (ast.literal_eval(default),
                                               ast.literal_eval(text))
  return found


def _flag_blocks(help_text):
  """{flag name: its lines of the help, joined and whitespace-normalised}."""
  blocks, name = {}, None
  for line in help_text.split("\nflags:\n", 1)[1].splitlines():
    match = re.match(r"  --(?:\[no\])?([\w.]+)", line)
    if match:
      name = match.group(1)
      blocks[name] = ""
    if name:
      blocks[name] += " " + line
  return {k: " ".join(v.split()) for k, v in blocks.items()}


def _shown(value):
  return str(value).lower() if isinstance(value, bool) else str(value)


def _assert_lists_verbs(text):
  assert "usage: llmjax VERB" in text
  for verb, line in VERBS.items():
    assert re.search(rf"^  {verb} +{re.escape(line)}$", text, re.M), (verb, text)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"]])
def test_top_level_help_lists_the_verbs(args):
  result = _run(*args)
  assert result.returncode == 0, result.stderr
  _assert_lists_verbs(result.stdout)
  assert "jax" not in _imported(result.stderr)


def test_no_verb_and_unknown_verb_list_the_verbs_on_stderr_with_exit_2():
  for args, message in [([], ""), (["frobnicate"], "error: unknown verb 'frobnicate'"),
                        (["--workdir=x"], "error: expected a verb before --workdir=x")]:
    result = _run(*args)
    assert result.returncode == 2, (args, result.stdout)
    assert result.stdout == ""
    assert message in result.stderr
    _assert_lists_verbs(result.stderr)


def test_the_verb_table_names_every_verb_module():
  modules = {name[:-3] for name in os.listdir(os.path.join(ROOT, "llmjax", "cli"))
             if name.endswith(".py") and name not in ("__init__.py", "main.py", "common.py")}
  assert set(VERBS) == modules


@pytest.mark.parametrize("verb", list(VERBS))
def test_verb_help_shows_usage_and_every_flag(verb):
  long, short = _run(verb, "--help"), _run(verb, "-h")
  for result in (long, short):
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown command line flag" not in result.stdout + result.stderr
    assert "jax" not in _imported(result.stderr)  # help stays fast: no heavy imports
  assert short.stdout == long.stdout
  source = open(os.path.join(ROOT, "llmjax", "cli", f"{verb}.py")).read()
  usage = ast.get_docstring(ast.parse(source)).splitlines()[0]
  assert usage.startswith(f"llmjax {verb} ")
  assert long.stdout.startswith(f"usage: {usage}\n")
  blocks = _flag_blocks(long.stdout)
  defined = _defined_flags(verb)
  assert defined, verb
  for name, (default, text) in defined.items():
    assert name in blocks, (name, long.stdout)
    assert " ".join(text.split()) in blocks[name], (name, blocks[name])
    if default is not None:
      assert f"(default: {_shown(default)})" in blocks[name], (name, blocks[name])
  if verb == "export":  # the Hugging Face form shows in `llmjax --help` too
    assert "--out=hf:PATH [--merge]" in usage and "--out=hf:PATH [--merge]" in VERBS[verb]
  if verb == "train":
    assert "--config=FILE[:ARG]" in long.stdout
    assert "config.SECTION.KEY" in blocks and "--config.train.steps=100" in blocks[
        "config.SECTION.KEY"]


def test_help_verb_direct_module_and_flag_values():
  help_train = _run("help", "train")
  assert help_train.returncode == 0, help_train.stderr
  assert help_train.stdout == _run("train", "--help").stdout
  direct = _run("--help", module="llmjax.cli.train")  # python -m llmjax.cli.train --help
  assert direct.returncode == 0, direct.stderr
  assert set(_defined_flags("train")) <= set(_flag_blocks(direct.stdout))
  # `--prompt -h` gives --prompt the value "-h", as absl parses it: not a request for help.
  as_value = _run("generate", "--prompt", "-h")
  assert as_value.returncode == 2 and "usage:" not in as_value.stdout
  assert "--checkpoint" in as_value.stderr
  unknown = _run("export", "--bogus")
  assert unknown.returncode == 2
  assert "Unknown command line flag 'bogus'; --help lists this verb's flags" in unknown.stderr


def test_every_verb_keeps_its_flags_to_itself():
  """Each verb defines its flags in its own FlagValues (`FLAGS` of its module), so verbs that
  share flag names import side by side in one process and run there (tests/_cli.py)."""
  import importlib

  from absl import flags
  for verb in VERBS:
    module = importlib.import_module(f"llmjax.cli.{verb}")
    assert isinstance(getattr(module, "FLAGS", None), flags.FlagValues), verb
    leaked = [f.name for f in flags.FLAGS.get_flags_for_module(module)]
    assert not leaked, f"llmjax.cli.{verb} defines {leaked} in absl's global FLAGS: pass " \
                       "flag_values=FLAGS"
    assert module.FLAGS.get_flags_for_module(module), verb


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_gc_threshold_is_one_line_exit_2_before_the_verb_runs(value):
  done = subprocess.run([sys.executable, "-m", "llmjax.cli.main", "train", "--help"], cwd=ROOT,
                        env={**os.environ, "LLMJAX_GC_THRESHOLD": value}, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 2 and done.stdout == "", done
  assert done.stderr.strip().splitlines() == [
      f"error: LLMJAX_GC_THRESHOLD must be a positive integer (new objects between cycle "
      f"collections), got {value!r}"]


def test_the_gc_threshold_applies_to_the_process_s_own_command_line_only():
  code = ("import gc, sys\nfrom llmjax.cli import main\nsys.argv = ['llmjax', 'train', '--help']\n"
          "try:\n  main.main(['llmjax', 'train', '--help'])\nexcept SystemExit:\n  pass\n"
          "print('threshold', gc.get_threshold()[0])\ntry:\n  main.main()\nexcept SystemExit:\n"
          "  pass\nprint('threshold', gc.get_threshold()[0])\n")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "LLMJAX_GC_THRESHOLD": "12345"}, timeout=60)
  assert done.returncode == 0, done.stderr
  # A call with its own argv (a test, a notebook) leaves the collector alone; the command line
  # of the process sets it.
  assert re.findall(r"^threshold (\d+)$", done.stdout, re.M) == ["700", "12345"]
