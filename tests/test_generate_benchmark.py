"""benchmarks/generate.py --tiny: a well-formed table and JSON, same tokens; no speed asserted."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_generate_benchmark_tiny(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location("benchmarks_generate", BENCHMARKS / "generate.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  out = tmp_path / "generate.json"
  returned = script.main(["--tiny", "--batches=1,2", f"--json={out}"])
  written = json.loads(out.read_text())
  assert written == json.loads(json.dumps(returned))
  assert written["benchmark"] == "generate"
  assert written["environment"]["versions"]["jax"] == jax.__version__
  assert [r["batch"] for r in written["rows"]] == [1, 2]
  for row in written["rows"]:
    assert row["same_tokens"] is True  # both systems did the same work
    for key in ("llmjax_tokens_per_s", "torch_tokens_per_s", "ratio"):
      assert math.isfinite(row[key]) and row[key] > 0
  table = capsys.readouterr().out
  assert "llmjax tok/s" in table and "torch tok/s" in table and "ratio" in table
