"""benchmarks/generate.py --tiny: a well-formed table and JSON, same tokens; no speed asserted."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import _xla

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
    for key in ("llmjax_tokens_per_s", "torch_tokens_per_s", "ratio", "llmjax_prefill_s",
                "weight_streaming_bound_s"):
      assert math.isfinite(row[key]) and row[key] > 0
    assert row["llmjax_decode_step_s"] >= 0
    # The bound is the model's float32 weights over the measured bandwidth.
    n_params = written["rows"][0]["weight_bytes"] // 4
    assert row["weight_bytes"] == 4 * n_params > 0
    assert math.isclose(row["weight_streaming_bound_s"],
                        row["weight_bytes"] / written["memory_bandwidth"]["bytes_per_s"])
    config = written["config"]["model"]
    head_dim = config["n_embd"] // config["n_head"]
    assert row["cache_bytes_at_end"] == (2 * config["n_layer"] * row["batch"] * head_dim
                                         * config["n_head"] * 4 * (4 + 8))  # --tiny: 4 + 8
  bandwidth = written["memory_bandwidth"]
  assert set(bandwidth["by_kernel"]) == {"sum", "matvec"}
  assert bandwidth["bytes_per_s"] == max(bandwidth["by_kernel"].values()) > 0
  table = capsys.readouterr().out
  assert "llmjax tok/s" in table and "torch tok/s" in table and "ratio" in table
  assert "fraction of bound" in table and "read bandwidth" in table


def test_generate_benchmark_llmjax_only_runs_without_torch_or_the_data_stack(tmp_path):
  """--llmjax_only is what a GPU image runs: no torch, grain, tensorflow-datasets, orbax or
  llmjax.data may be imported (transformers, for the config, is there, and with it tqdm);
  bf16 weights halve the bytes the bound counts; --quant=int8 (gpu_run.sh's int8 row) decodes
  the same weights with int8 kernels in the same run, bounded by its own bytes."""
  absent = ["grain", "tensorflow_datasets", "tensorflow", "orbax", "orbax.checkpoint", "torch",
            "llmjax.data"]
  out = tmp_path / "g.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla.xla_flags())
  code = ("import sys; [sys.modules.__setitem__(m, None) for m in sys.argv[2].split(',')]; "
          "sys.path.insert(0, sys.argv[1]); import generate; "
          "generate.main(['--tiny', '--llmjax_only', '--dtype=bfloat16', '--quant=int8', "
          "'--json=' + sys.argv[3]])")
  done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), ",".join(absent), str(out)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  written = json.loads(out.read_text())
  assert written["config"]["llmjax_only"] is True and written["config"]["model"]["dtype"] == \
      "bfloat16"
  for row in written["rows"]:
    assert row["torch_tokens_per_s"] is None and row["same_tokens"] is None
    assert row["llmjax_tokens_per_s"] > 0
    # GPT-2's parameters (token and position tables, per layer 12 D^2 + 13 D, the final norm),
    # 2 bytes each in bfloat16.
    m = written["config"]["model"]
    d = m["n_embd"]
    n_params = (m["vocab_size"] + m["n_positions"]) * d + m["n_layer"] * (12 * d * d + 13 * d) \
        + 2 * d
    assert row["weight_bytes"] == 2 * n_params
    # int8: each layer's 12 D^2 kernel values at 1 byte instead of 2, plus a float32 scale per
    # output channel (q, k, v, o: D each; the MLP's 4 D and D); everything else stays bf16.
    int8 = row["quantized"]["int8"]
    assert int8["weight_bytes"] == 2 * n_params - m["n_layer"] * (12 * d * d - 9 * d * 4)
    assert math.isclose(int8["weight_streaming_bound_s"],
                        int8["weight_bytes"] / written["memory_bandwidth"]["bytes_per_s"])
    assert math.isclose(int8["tokens_per_s_vs_float"],
                        int8["llmjax_tokens_per_s"] / row["llmjax_tokens_per_s"])
    assert int8["llmjax_tokens_per_s"] > 0 and isinstance(int8["same_tokens_as_float"], bool)
  assert written["config"]["quant"] == ["int8"]


def test_generate_benchmark_refuses_a_bad_quant_spec(capsys):
  sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location("benchmarks_generate", BENCHMARKS / "generate.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with pytest.raises(SystemExit) as exit_info:
    script.parse_args(["--quant=int8,int3"])
  assert exit_info.value.code == 2
  assert "--quant='int3'" in capsys.readouterr().err
  assert script.parse_args(["--quant=int8,int4:g32"]).quant == ["int8", "int4:g32"]
