"""Tiny runs of the benchmark scripts: well-formed tables and JSON (no speed asserted), and the
FSDP memory bound (asserted): device 0 holds <= 1.15 x (params + optimizer state) / 8."""

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


def _script(name: str):
  """Import benchmarks/<name>.py as a module (its main(argv) runs in this process)."""
  sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python -c code BENCHMARKS args...` in a fresh process on the CPU with no XLA flags."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla.xla_flags())
  return subprocess.run([sys.executable, "-c", code, str(BENCHMARKS), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def _run(name: str, argv: list[str], tmp_path, capsys) -> tuple[dict, str]:
  out = tmp_path / f"{name}.json"
  returned = _script(name).main(argv + ["--tiny", f"--json={out}"])
  stdout = capsys.readouterr().out
  written = json.loads(out.read_text())
  assert written["benchmark"] == name == returned["benchmark"]
  assert written["environment"]["versions"]["jax"] == jax.__version__
  return written, stdout


def test_train_throughput_tiny_with_torch(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  result, stdout = _run("train_throughput", ["--compare=hf-torch", "--steps=2", "--warmup=1"],
                        tmp_path, capsys)
  assert "tokens/s" in stdout and "llmjax (jax)" in stdout and "transformers (torch)" in stdout
  assert "jax/torch tokens/s ratio" in stdout
  assert "causal" in result["flop_formula"]
  assert _positive(result["flops_per_step"]) and _positive(result["tokens_per_step"])
  assert _positive(result["ceilings"]["measured_matmul_flops_per_s"])
  assert result["ceilings"]["datasheet_flops_per_s"] is None  # CPUs have no datasheet peak
  for system in ("jax", "hf_torch"):
    r = result[system]
    assert len(r["step_times_s"]) == 2
    for key in ("tokens_per_s", "median_step_s", "achieved_flops_per_s",
                "fraction_of_measured_matmul", "best_step_s", "tokens_per_s_best",
                "median_step_cpu_s", "tokens_per_cpu_s", "fraction_of_matmul_per_cpu_s",
                "final_loss"):
      assert _positive(r[key]), (system, key, r[key])
    assert r["mfu_datasheet"] is None
  assert _positive(result["jax"]["compile_s"])
  assert _positive(result["jax_over_torch_tokens_per_s"])
  assert _positive(result["jax_over_torch_tokens_per_s_best"])
  assert _positive(result["jax_over_torch_tokens_per_cpu_s"])


def test_train_throughput_tiny_with_plain_jax_and_bf16(tmp_path, capsys):
  """--compare=plain-jax,bf16: a flax GPT-2 of the same shapes and llmjax's own step with
  bfloat16 compute take turns with llmjax's float32 step."""
  result, stdout = _run("train_throughput", ["--compare=plain-jax,bf16", "--steps=2",
                                             "--warmup=1", "--matmul_repeats=1"], tmp_path, capsys)
  assert "plain flax GPT (jax)" in stdout and "jax/plain_jax tokens/s ratio" in stdout
  assert "llmjax, bf16 compute" in stdout and "jax/bf16 tokens/s ratio" in stdout
  assert "bfloat16 matmul" in stdout and "losses (first -> last" in stdout
  assert _positive(result["ceilings"]["measured_bf16_matmul_flops_per_s"])
  bf16 = result["jax_bf16"]
  for key in ("tokens_per_s", "tokens_per_cpu_s", "fraction_of_measured_matmul", "compile_s"):
    assert _positive(bf16[key]), key
  assert _positive(result["jax_over_bf16_tokens_per_s"])
  # float32 parameters from the same seed on the same batch: the first losses differ only by
  # bfloat16 rounding of the compute.
  assert bf16["n_params"] == result["jax"]["n_params"]
  assert bf16["first_loss"] != result["jax"]["first_loss"]
  assert abs(bf16["first_loss"] - result["jax"]["first_loss"]) < 0.05
  host = result["environment"]["host"]
  assert result["host_kind"] == host["kind"] and f"host: {host['kind']}" in stdout
  assert host["logical_cpus"] >= 1 and isinstance(host["isa"], dict)
  for system in ("jax", "plain_jax"):
    r = result[system]
    assert len(r["step_times_s"]) == 2
    for key in ("tokens_per_s", "tokens_per_s_best", "tokens_per_cpu_s", "achieved_flops_per_s",
                "fraction_of_measured_matmul", "compile_s", "first_loss", "final_loss"):
      assert _positive(r[key]), (system, key, r[key])
  # The same architecture and shapes on both sides: the same parameters, so the same FLOPs.
  assert result["jax"]["n_params"] == result["plain_jax"]["n_params"]
  for key in ("jax_over_plain_jax_tokens_per_s", "jax_over_plain_jax_tokens_per_s_best",
              "jax_over_plain_jax_tokens_per_cpu_s"):
    assert _positive(result[key]), key
  assert "hf_torch" not in result and "jax_over_torch_tokens_per_s" not in result


def test_plain_jax_gpt_starts_at_chance_and_fits_a_batch():
  """The baseline is a working GPT: loss ln(vocab) at step 0, falling on one fixed batch."""
  sys.path.insert(0, str(BENCHMARKS))
  import plain_jax_gpt as plain
  config = plain.GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=1, n_heads=2, d_ff=64)
  once, info = plain.runner(config, plain.OptConfig(lr=1e-2, warmup_steps=0, total_steps=10),
                            batch_size=2)
  for _ in range(5):
    once()
  losses = info["losses"]
  assert abs(losses[0] - math.log(64)) < 0.1, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_train_throughput_resnet_tiny_with_torch(tmp_path, capsys):
  """The image family: a tiny ResNet-18 and transformers' ResNet of the same shape take turns."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  result, stdout = _run("train_throughput", ["--model=resnet18", "--compare=hf-torch",
                                             "--steps=2", "--warmup=1"], tmp_path, capsys)
  assert "images/s" in stdout and "jax/torch images/s ratio" in stdout
  assert result["unit"] == "images" and result["images_per_step"] == 2
  assert "tokens_per_step" not in result and "convolutions" in result["flop_formula"]
  assert result["config"]["model_name"] == "resnet18"
  assert result["config"]["model"]["arch"] == "resnet"
  assert result["config"]["optim"]["name"] == "sgd" and result["config"]["optim"]["nesterov"]
  assert _positive(result["flops_per_step"])
  assert _positive(result["ceilings"]["measured_matmul_flops_per_s"])
  for system in ("jax", "hf_torch"):
    r = result[system]
    assert len(r["step_times_s"]) == 2
    for key in ("images_per_s", "images_per_s_best", "images_per_cpu_s", "achieved_flops_per_s",
                "fraction_of_measured_matmul", "final_loss"):
      assert _positive(r[key]), (system, key, r[key])
  # The same architecture on both sides: every parameter counted once in each.
  assert result["jax"]["n_params"] == result["hf_torch"]["n_params"]
  for key in ("jax_over_torch_images_per_s", "jax_over_torch_images_per_s_best",
              "jax_over_torch_images_per_cpu_s"):
    assert _positive(result[key]), key


def test_train_throughput_moe_beside_its_dense_twin(tmp_path, capsys):
  """--model=moe: the Mixtral-shaped MoE step (dropless) with the dense step of equal active
  FLOPs, the capacity dispatch and (with torch) transformers' Mixtral as rows beside it; bad MoE
  flags refused."""
  torch = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
  compare = ["--compare=dense,moe-capacity,hf-torch"] if torch else []
  result, stdout = _run("train_throughput", ["--model=moe", "--steps=1", "--warmup=0",
                                             "--block=1", "--matmul_repeats=1"] + compare,
                        tmp_path, capsys)
  assert "8 experts of width 32, top 2" in result["description"]
  assert "llmjax dense, equal active FLOPs" in stdout and "llmjax MoE, capacity dispatch" in stdout
  model = result["config"]["model"]
  assert (model["n_experts"], model["experts_per_token"], model["moe_d_ff"]) == (8, 2, 32)
  for system in ("jax", "jax_dense", "jax_capacity"):
    assert _positive(result[system]["tokens_per_s"]) and math.isfinite(
        result[system]["first_loss"]), system
  # the MoE holds 8 experts where its twin holds one MLP of the active width
  assert result["jax_capacity"]["n_params"] == result["jax"]["n_params"]
  assert result["jax_dense"]["n_params"] < result["jax"]["n_params"]
  assert _positive(result["jax_over_dense_tokens_per_s"])
  assert _positive(result["jax_over_capacity_tokens_per_s"])
  if torch:  # transformers' Mixtral from llmjax's initial weights: the same first loss
    theirs = result["hf_torch"]
    assert theirs["peer"] == "transformers MixtralForCausalLM" and "Mixtral" in stdout
    assert theirs["n_params"] == result["jax"]["n_params"]
    assert abs(theirs["first_loss"] - result["jax"]["first_loss"]) < 1e-4, theirs
    assert _positive(result["jax_over_torch_tokens_per_s"])
  module = _script("train_throughput")
  for argv in (["--model=moe", "--top_k=9"], ["--model=moe", "--d_ff=63"],
               ["--model=moe", "--compare=plain-jax"], ["--compare=dense"]):
    with pytest.raises(SystemExit):
      module.parse_args(argv)


def test_train_throughput_refuses_a_torch_comparison_without_a_counterpart():
  module = _script("train_throughput")
  with pytest.raises(SystemExit):
    module.parse_args(["--model=cnn", "--compare=hf-torch"])
  with pytest.raises(SystemExit):
    module.parse_args(["--preset=llama", "--compare=hf-torch"])
  for argv in (["--preset=llama"], ["--model=resnet18"], ["--mesh=data=-1"],
               ["--n_kv_heads=2"]):
    with pytest.raises(SystemExit):
      module.parse_args(argv + ["--compare=plain-jax"])
  with pytest.raises(SystemExit):
    module.parse_args(["--compare=tf"])
  with pytest.raises(SystemExit):  # bf16 is timed beside float32, not beside itself
    module.parse_args(["--dtype=bfloat16", "--compare=bf16"])
  # llmjax's own step has no counterpart to lack: every model compares with itself in bf16.
  assert module.parse_args(["--model=resnet18", "--compare=bf16"]).compare == ("bf16",)
  assert module.parse_args(["--compare=hf-torch,plain-jax"]).compare == ("hf-torch", "plain-jax")


@pytest.fixture
def no_compilation_cache():
  """Off for this test, as compile_time.py asks, and back on after (conftest's session cache).
  jax decides once per process whether the cache is used, so the flag alone changes nothing
  once something has compiled: reset_cache() makes it look again."""
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


def test_compile_time_tiny(tmp_path, capsys, no_compilation_cache):
  # Two compiles only (XLA:CPU compiles a tiny step in seconds); unrolled is the same code path.
  result, stdout = _run("compile_time", ["--layers=1,2", "--modes=scan", "--no_warmup"],
                        tmp_path, capsys)
  assert "compile s" in stdout and "scan: total(2 layers) / total(1 layers)" in stdout
  assert [(r["n_layers"], r["scan"]) for r in result["rows"]] == [(1, True), (2, True)]
  for row in result["rows"]:
    assert all(_positive(row[k]) for k in ("lower_s", "compile_s", "total_s",
                                           "optimized_hlo_lines"))
  assert _positive(result["scan_ratio"]["total_ratio"]) and result["unrolled_ratio"] is None


def test_memory_fsdp_bound(tmp_path, capsys):
  """Under FSDP on 8 devices, device 0 holds <= 1.15 x total/8 of params + optimizer state."""
  # Device 0's state bytes from the shardings (--no_init saves a compile); the compiled step's
  # argument bytes below are XLA's own per-device count of the same state.
  result, stdout = _run("memory", ["--rules=fsdp", "--remats=none", "--no_init"], tmp_path,
                        capsys)
  assert "argument MiB" in stdout and "FSDP: device 0 holds" in stdout
  (row,) = result["rows"]
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
    assert _positive(row[key]), key
  state = result["state"]["fsdp"]
  bound = 1.15 * state["total_bytes"] / 8
  assert state["device0_bytes"] <= bound, state
  # The compiled step's arguments on a device: that state plus this device's rows of the batch.
  batch_per_device = result["config"]["global_batch_bytes"] / 8
  assert row["argument_size_in_bytes"] <= bound + batch_per_device, (row, state)
  assert result["fsdp_bound"]["ok"]


def test_limit_threads_pins_the_process_before_jax_starts_and_refuses_after():
  """--threads=N: the process runs on N cores (subprocess: pinning is for the whole process)."""
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs at least 2 CPUs to see the pinning")
  done = _python("import os, sys, jax; sys.path.insert(0, sys.argv[1]); import bench_common as c; "
                 "c.limit_threads(1); "
                 "print(len(os.sched_getaffinity(0)), os.environ['XLA_FLAGS']); "
                 "jax.numpy.zeros(2).block_until_ready(); c.limit_threads(1)")
  cores, flags = done.stdout.split(maxsplit=1)
  assert cores == "1" and "--xla_cpu_multi_thread_eigen=false" in flags
  assert done.returncode == 1  # the second call, after JAX started, exits with the reason
  assert "--threads must be applied before JAX initialises its backend" in done.stderr


@pytest.mark.parametrize("model", ["gpt2", "cnn"])
def test_train_throughput_runs_without_the_data_stack(tmp_path, model):
  """The GPU image has jax, flax and optax but no grain or tensorflow-datasets: the benchmark's
  import path must not need them (nor llmjax.data, orbax, torch or tqdm without --compare), for
  text and image models alike."""
  absent = ["grain", "tensorflow_datasets", "tensorflow", "orbax", "orbax.checkpoint", "torch",
            "tqdm", "llmjax.data"]
  out = tmp_path / "t.json"
  done = _python("import sys; [sys.modules.__setitem__(m, None) for m in sys.argv[2].split(',')]; "
                 "sys.path.insert(0, sys.argv[1]); import train_throughput; "
                 "train_throughput.main(['--tiny', '--model=' + sys.argv[4], "
                 "'--json=' + sys.argv[3]])",
                 ",".join(absent), str(out), model)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["jax"][f"{result['unit']}_per_s"] > 0


def test_profile_step_tiny_joins_the_trace_to_the_hlo(tmp_path, capsys):
  """A tiny profiled step: every part's share comes from trace events joined by name to the
  compiled step's instructions, the shares add up, and the model's matmuls are found."""
  result, stdout = _run("profile_step", ["--threads=0"], tmp_path, capsys)
  assert "% of thunk time" in stdout and "coverage" in stdout
  parts = result["parts"]
  assert math.isclose(sum(p["share"] for p in parts.values()), 1.0, rel_tol=1e-6)
  assert math.isclose(sum(p["s_per_step"] for p in parts.values()), result["thunk_s_per_step"],
                      rel_tol=1e-6)
  assert result["instructions_timed"] > 10 and _positive(result["wall_s_per_step"])
  for part in ("MLP matmuls", "attention projections (q, k, v, o)", "logits and embeddings"):
    assert parts[part]["s_per_step"] > 0, part
  assert all(t["opcode"] and t["ms_per_step"] > 0 for t in result["top_instructions"])


def test_profile_step_parts_and_hlo_parsing():
  module = _script("profile_step")
  part = module.part_of
  assert part("dot", "jit(step)/jvp(Transformer)/layer_0/mlp/wi/dot_general") == "MLP matmuls"
  assert part("fusion", "jit(step)/jvp(Transformer)/layer_0/mlp/tanh").startswith("MLP element")
  assert part("dot", "jit(step)/transpose(jvp(Transformer))/layer_3/attn/q/dot_general") \
      .startswith("attention projections")
  assert part("dot", "jit(step)/jvp(Transformer)/layer_0/attn/vmap(BTNH,BSNH->BNTS)/dot_general") \
      .startswith("attention core")
  assert part("fusion", "jit(step)/jvp()/exp").startswith("loss")
  assert part("fusion", "jit(step)/cond/branch_1_fun/mul").startswith("optimizer")
  assert part("dot", "jit(step)/jvp(Transformer)/embed.attend/dot_general").startswith("logits")
  assert part("fusion", "jit(step)/jvp(Transformer)/layer_1/norm2/mul") == "norms"
  assert part("fusion", "") == module.OTHER
  # The optimized HLO of a small jitted function: names, opcodes and op_name metadata, with a
  # fusion inheriting the op_name of the instructions inside it.
  hlo = jax.jit(lambda a, b: jax.numpy.tanh(a @ b) * 2).lower(
      jax.numpy.ones((8, 8)), jax.numpy.ones((8, 8))).compile().as_text()
  found = module.hlo_instructions(hlo)
  assert any(opcode == "dot" and "dot_general" in op_name for opcode, op_name in found.values())
  assert any(opcode == "fusion" and op_name for opcode, op_name in found.values())
  events = [{"name": name, "dur": 10.0, "ph": "X"} for name in found] + \
           [{"name": "not an instruction", "dur": 1e6, "ph": "X"}]
  timed = module.attribute(events, found, steps=2)
  assert math.isclose(sum(timed["by_part"].values()), 5.0 * len(found))


def test_train_throughput_lstm_and_dcgan_tiny_with_torch(tmp_path, capsys):
  """The LSTM LM, the LSTM classifier and the DCGAN step each beside their torch peer, started
  from llmjax's initial weights on the same batch (and, for the GAN, the same first latents):
  the same parameters and the same first loss up to float32 rounding."""
  pytest.importorskip("torch")
  fast = ["--compare=hf-torch", "--steps=1", "--warmup=0", "--block=1", "--matmul_repeats=1"]
  for model, unit, peer in (("rnn", "tokens", "torch nn.LSTM"),
                            ("rnn_classify", "tokens", "torch nn.LSTM"),
                            ("dcgan", "images", "torch DCGAN")):
    result, stdout = _run("train_throughput", [f"--model={model}"] + fast, tmp_path, capsys)
    assert result["unit"] == unit and peer in stdout, model
    assert f"jax/torch {unit}/s ratio" in stdout, model
    ours, theirs = result["jax"], result["hf_torch"]
    assert theirs["peer"] == peer and _positive(result[f"jax_over_torch_{unit}_per_s"])
    assert _positive(result["flops_per_step"]) and _positive(ours[f"{unit}_per_s"]), model
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-5, (model, ours, theirs)
    if model == "dcgan":  # every layer as llmjax's, biases included
      assert ours["n_params"] == theirs["n_params"]
      assert result["config"]["task"]["g_widths"] == "16,8"
    else:  # torch keeps a second LSTM bias, bias_hh: 4 x hidden per layer and direction
      cfg = result["config"]["model"]
      directions = 2 if model == "rnn_classify" else 1
      assert cfg["bidirectional"] == (model == "rnn_classify")
      assert theirs["n_params"] - ours["n_params"] == (
          4 * cfg["rnn_hidden"] * cfg["rnn_layers"] * directions)


def test_moe_layer_tiny_against_transformers_blocks(tmp_path, capsys):
  """llmjax's MoE layer (dropless and with capacity) beside transformers' Mixtral and Qwen2-MoE
  blocks holding the same weights: dropless outputs equal theirs to float32 rounding."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  result, stdout = _run("moe_layer", ["--steps=1", "--warmup=0", "--block=1"], tmp_path, capsys)
  assert "llmjax dropless" in stdout and "transformers" in stdout and "x torch" in stdout
  assert [r["kind"] for r in result["rows"]] == ["mixtral", "qwen2_moe"]
  for row in result["rows"]:
    assert row["dropless_max_abs_diff_vs_torch"] <= 1e-5 * max(row["torch_max_abs_output"], 1e-3)
    for system in ("dropless", "capacity", "torch"):
      assert _positive(row[system]["tokens_per_s"]), (row["kind"], system)
    assert row["dropless"]["n_params"] == row["torch"]["n_params"], row["kind"]
    assert _positive(row["dropless_over_torch_tokens_per_s"])
  assert result["rows"][1]["shared_width"] > 0 and result["rows"][0]["shared_width"] == 0
  assert result["host_kind"] == result["environment"]["host"]["kind"]
  with pytest.raises(SystemExit):
    _script("moe_layer").parse_args(["--kinds=switch"])
