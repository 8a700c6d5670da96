"""`llmjax compile`: a tiny experiment's steps compiled for TPU slices with libtpu's compiler on
abstract devices (no TPU, nothing allocated): memory, FSDP's cut, the loop's own shardings and
donation, the "does not fit" exit, and each bad input."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

import _xla
from llmjax import config as config_lib
from llmjax.cli import compile as compile_cli
from llmjax.parallel import mesh as meshlib, sharding, topology
from llmjax.train import aot, aot_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "lm", "stdlib_gpt.py")
TINY = dict(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_len=16)


def _tiny(**mesh):
  c = config_lib.experiment_module("stdlib_gpt.py", EXPERIMENT).get_config("smoke")
  c.model.update(TINY)
  c.data.update(seq_len=16, max_bytes=20_000)
  c.mesh.update(mesh)
  return config_lib.resolve(c)


def test_topology_names():
  assert topology.parse("v5e-16").topology_name == "v5e:4x4"
  assert topology.parse("v5p-8").topology_name == "v5p:2x2x1"  # 8 TensorCores, 4 chips
  assert topology.parse("v6e-8").topology_name == "v6e:2x4"
  assert topology.parse("v4-32").chips == 16
  assert topology.parse("v5e:4x4").chips == 16
  devices = topology.devices(topology.parse("v5p-8"))
  assert len(devices) == 4 and devices[0].platform == "tpu"
  assert len(topology.devices(topology.parse("v5e:2x2"), num_slices=2)) == 8


def test_two_slices_split_the_batch_over_dcn():
  options = aot.Options("v5e:2x2", num_slices=2, steps=("train",))
  _, s = aot.assemble(_tiny(), options)
  assert s.mesh.shape["dcn"] == 2 and s.mesh.shape["data"] == 4
  # Each dcn index is one slice: the slowest network joins whole slices.
  assert [{d.slice_index for d in row.flat} for row in s.mesh.devices] == [{0}, {1}]
  report = aot.compile_run(_tiny(), options)
  assert report["fits"] and report["steps"]["train"]["collectives"]


def test_tiny_run_compiles_for_v5e_and_fsdp_quarters_the_parameters():
  dp = aot.compile_run(_tiny(), aot.Options("v5e:2x2"))
  assert dp["fits"] and dp["devices"] == 4 and dp["mesh"]["data"] == 4
  assert set(dp["steps"]) == {"train", "eval", "prefill", "decode"}
  for name, step in dp["steps"].items():
    mem = step["memory"]
    assert step["fits"] and 0 < mem["peak"] < mem["hbm"] == 16 * 2**30, name
    assert mem["arguments"] > 0 and step["cost"]["flops"] > 0, name
  train = dp["steps"]["train"]
  # Data parallel: the gradients are summed across the 4 chips, once per step.
  assert train["collectives"]["all-reduce"]["bytes"] > 0
  assert 0 < train["roofline"]["mfu_upper_bound"] <= 1
  assert train["memory"]["aliased"] > 0  # the donated state
  fsdp4 = aot.compile_run(_tiny(rules="fsdp", data=1, fsdp=4), aot.Options("v5e:2x2", steps=("train",)))
  assert fsdp4["fits"] and fsdp4["mesh"]["fsdp"] == 4
  ratio = fsdp4["per_device_state_bytes"]["params"] / dp["per_device_state_bytes"]["params"]
  assert 0.24 < ratio < 0.3, ratio  # a quarter of the parameters (norms and biases stay whole)
  assert fsdp4["steps"]["train"]["memory"]["arguments"] < 0.5 * train["memory"]["arguments"]
  assert {"all-gather", "reduce-scatter"} & set(fsdp4["steps"]["train"]["collectives"])


def test_the_compiled_train_step_is_the_loops():
  """The lowered step's parameters carry the loop's state shardings, batch split, donation."""
  exp = _tiny(rules="fsdp", data=1, fsdp=4)
  _, s = aot.assemble(exp, aot.Options("v5e:2x2"))
  with jax.set_mesh(s.mesh):
    lowered = aot.lowered_steps(s, aot.Options("v5e:2x2", steps=("train",)))["train"]()
  state = aot.abstract(s.abstract_state, s.state_shardings)
  batch = s.task.example_batch(exp.train.batch_size)
  expected = jax.tree.leaves(s.state_shardings.checkpointed()) + jax.tree.leaves(
      s.state_shardings.kept()) + [sharding.batch_sharding(s.mesh)] * len(batch)
  shapes = (jax.tree.leaves(state.checkpointed()) + jax.tree.leaves(state.kept())
            + list(batch.values()))
  got = aot.parameter_shardings(lowered)
  # jit leaves out arguments the step never reads (jax's own record of which it kept).
  kept = sorted(lowered._lowered._lowering.compile_args["kept_var_idx"])
  want = [aot.spec_axes(expected[i], len(shapes[i].shape)) for i in kept]
  assert len(got) == len(want) and got == want
  assert ("fsdp",) in {dim for arg in got for dim in arg}  # FSDP shards over the 4 chips
  assert got[-1][0] == meshlib.BATCH_AXES  # the batch
  donated = len(re.findall(r"tf.aliasing_output|jax.buffer_donor", lowered.as_text()))
  assert donated == len([i for i in kept if i < len(jax.tree.leaves(state.checkpointed()))])
  assert len(kept) > 0.9 * len(expected)


def test_collectives_count_loop_bodies_once_per_iteration_and_a_transfer_once():
  hlo = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}, to_apply=%add
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ag = (bf16[4]{0}, bf16[16]{0}) all-gather-start(bf16[4]{0} %y), dimensions={0}
}
"""
  found = aot_report.collectives(hlo)
  assert found == {"all-reduce": {"count": 5, "bytes": 5 * 32},
                   "all-gather": {"count": 1, "bytes": 32}}
  # XLA:TPU's form: no known trip count (the condition's bound instead), and a reduce-scatter
  # as a fusion calling an all-reduce-scatter computation.
  tpu = """HloModule m
%cond.1 (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
}
%all-reduce-scatter.2 (x: f32[64]) -> f32[16] {
  %ar = f32[64]{0} all-reduce(f32[64]{0} %x), to_apply=%add
}
%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %f = f32[16]{0} fusion(%y), kind=kCustom, calls=%all-reduce-scatter.2
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond.1, body=%body.1
}
"""
  assert aot_report.collectives(tpu) == {"reduce-scatter": {"count": 3, "bytes": 3 * 64}}
  # XLA:TPU's async collective fusions: one transfer started before the layer loop (flag_start
  # -1) and carried through it by continuation fusions holding the same all-gather: counted
  # once, not once per continuation per iteration. A windowed einsum's loop counts in u32 and
  # steps by 2: `i < 8` runs 4 times.
  fused = """HloModule m
%start.1 (p: bf16[2,4]) -> (bf16[2,4], bf16[8,4]) {
  %ag.1 = bf16[8,4]{1,0} all-gather(%p), channel_id=7, dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"-1","flag_end":"-1"}}
  ROOT %cc = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}
%continue.1 (p: bf16[2,4]) -> bf16[8,4] {
  ROOT %ag.2 = bf16[8,4]{1,0} all-gather(%p), channel_id=7, dimensions={0}, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
}
%wcond (p: (u32[], bf16[4])) -> pred[] {
  %c8 = u32[]{:T(128)} constant(8)
  %p = (u32[], bf16[4]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c8), direction=LT
}
%wbody (p: (u32[], bf16[4])) -> (u32[], bf16[4]) {
  %one = u32[]{:T(128)} constant(1)
  %two = u32[]{:T(128)} constant(2)
  %p = (u32[], bf16[4]) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  %x = bf16[4]{0} get-tuple-element(%p), index=1
  %cp = (bf16[4]{0}, bf16[4]{0}, u32[], u32[]) collective-permute-start(%x), channel_id=9
  %y = bf16[4]{0} collective-permute-done(%cp)
  %next = u32[]{:T(128)} add(%i, %two)
  ROOT %t = (u32[], bf16[4]) tuple(%next, /*index=1*/%y)
}
%lcond (p: (s32[], bf16[4])) -> pred[] {
  %n = s32[]{:T(128)} constant(3)
  %p = (s32[], bf16[4]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}
%lbody (p: (s32[], bf16[4])) -> (s32[], bf16[4]) {
  %f = bf16[8,4]{1,0} fusion(%a), kind=kCustom, calls=%continue.1
  %w = (u32[], bf16[4]) while(%t0), condition=%wcond, body=%wbody
}
ENTRY %main (a: bf16[2,4]) -> bf16[8,4] {
  %s = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) fusion(%a), kind=kCustom, calls=%start.1
  %l = (s32[], bf16[4]) while(%t), condition=%lcond, body=%lbody
}
"""
  assert aot_report.collectives(fused) == {
      "all-gather": {"count": 1, "bytes": 64},
      "collective-permute": {"count": 3 * 4, "bytes": 3 * 4 * 8}}
  refusal = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 30.78G of 15.75G hbm. Exceeded hbm capacity by 15.03G.")
  parsed = aot_report.exhausted(refusal, 16 * 2**30)
  assert parsed["peak"] == int(30.78 * 2**30) and parsed["available"] == int(15.75 * 2**30)


def test_a_model_too_big_for_the_chip_exits_3(tmp_path):
  out = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla.xla_flags())
  result = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.main", "compile", f"--config={EXPERIMENT}:smoke",
       "--topology=v5e-4", "--steps=train", f"--output={out}", "--config.model.d_model=8192",
       "--config.model.d_ff=32768", "--config.model.n_heads=64", "--config.model.n_layers=2",
       "--config.model.scan_layers=True", "--config.data.max_bytes=20000"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 3, result.stderr[-2000:]
  assert re.search(r"does not fit: train needs [0-9.]+ GiB per device, the v5e chip has "
                   r"16.00 GiB of HBM", result.stderr), result.stderr[-2000:]
  report = json.loads(out.read_text())
  train = report["steps"]["train"]
  assert not report["fits"] and train["memory"]["peak"] > train["memory"]["hbm"]


@pytest.mark.parametrize("args, message", [
    (["--topology=v9z-8"], r"--topology=v9z-8: no chip entry for v9z"),
    (["--topology=v3:2x2"], r"no chip entry for v3 \(HBM, FLOP/s and bandwidth are known for "
                            r"v4, v5e, v5p, v6e\)"),
    (["--topology=v5e-12"], r"v5e slices come in v5e-1, v5e-4, .*; known: v4-8,"),
    (["--topology=pod"], r"--topology=pod: not a TPU topology name; known: v4-8, "),
    (["--topology=v5e-4", "--config.mesh.data=3"],
     r"config.mesh data\*fsdp\*tensor = 3 .* but there are 4 devices"),
    (["--topology=v5e-4", "--num_slices=2", "--config.mesh.dcn=3"],
     r"config.mesh.dcn=3 but --num_slices=2"),
    (["--topology=v5e-4", "--steps=train,backward"], r"unknown backward; allowed: train, eval"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
  out = tmp_path / "report.json"
  with pytest.raises(SystemExit) as exit_:
    compile_cli.main(["llmjax compile", f"--config={EXPERIMENT}:smoke", f"--output={out}",
                      *args])
  err = capsys.readouterr().err.strip()
  assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
  assert re.search(message, err), err
  assert not out.exists() and not list(tmp_path.iterdir())


def test_a_cpu_host_with_libtpu_installed_never_starts_the_tpu_runtime():
  """libtpu is installed here (for `llmjax compile`) and there is no TPU chip: with JAX_PLATFORMS
  unset, as a user runs, importing llmjax keeps jax on the CPU (llmjax/platforms.py) and libtpu
  prints nothing, also where jax was imported first (the benchmark scripts); jax alone would
  start it and print a screen of errors."""
  env = dict(os.environ, XLA_FLAGS=_xla.xla_flags())
  env.pop("JAX_PLATFORMS")
  code = "import {}; print(jax.devices()[0].platform)"
  for imports in ("llmjax, jax", "jax, llmjax"):
    ours = subprocess.run([sys.executable, "-c", code.format(imports)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0 and ours.stdout.split() == ["cpu"], ours.stderr[-2000:]
    assert "TPU" not in ours.stderr and "InitGoogle" not in ours.stderr, ours.stderr[-2000:]
  plain = subprocess.run([sys.executable, "-c", code.format("jax")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
  assert "TPU_ACCELERATOR_TYPE" in plain.stderr  # what the check above would otherwise see
