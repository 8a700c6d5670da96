"""`llmjax VERB ARGS` run inside the test's process, for tests whose point is not the process
boundary: the same `main(argv)` the console script calls, with its exit code and what it printed.
A subprocess pays about 3 CPU-seconds of imports (jax, tensorflow-datasets, grain) before it
does anything; the tests of signals, exit codes of a whole process, multi-process runs and one
test per verb keep real subprocesses.

The verb runs on the test process's devices (8 simulated CPU devices) and compilation cache."""

import contextlib
import io
import pathlib
import subprocess

from llmjax.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(verb: str, *args, cwd=ROOT) -> subprocess.CompletedProcess:
  """Run `llmjax VERB ARGS` in this process from `cwd`: returncode, stdout and stderr as a
  subprocess.run(..., capture_output=True, text=True) would give them. An exception the verb
  does not turn into an exit code propagates (a subprocess would print its traceback, exit 1)."""
  argv = ["llmjax", verb, *map(str, args)]
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
    try:
      cli_main.main(argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
  return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
