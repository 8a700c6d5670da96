"""Checkpointer guarantees: integrity (corruption detected, named, fallen back from), retention,
restore across meshes, structure mismatch, failed saves, export.

The corruption and export tests work on copies of one real run of the CLI (the session's reference
run, see _ckpt_helpers); the others on tiny states in this process (8 simulated devices).
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _ckpt_helpers as h
from llmjax import checkpoint
from llmjax.checkpoint import CheckpointError, Checkpointer
from llmjax.errors import UserError


# ---- integrity ----

def _data_files(step_dir: str) -> list[str]:
  """The array data files of a step (orbax's OCDBT layout: state/**/d/<hash>), biggest first."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, f"no array data files under {step_dir}/state: {os.listdir(step_dir)}"
  return sorted(files, key=os.path.getsize, reverse=True)


def _truncate(step_dir: str) -> None:
  path = _data_files(step_dir)[0]
  os.truncate(path, os.path.getsize(path) // 2)


def _delete(step_dir: str) -> None:
  os.remove(_data_files(step_dir)[0])


def _flip(path: str, offset: int, bit: int) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


@pytest.fixture(scope="module")
def reference():
  """(workdir, its committed steps, abstract state + shardings on 1 device, pristine restores)."""
  workdir = h.reference_run()
  steps = h.committed_steps(os.path.join(workdir, "checkpoints"))
  assert len(steps) >= 3, steps
  setup = h.model_setup(workdir)
  pristine = {s: h.restore(os.path.join(workdir, "checkpoints"), s, setup) for s in steps}
  return workdir, steps, setup, pristine


def _copy_checkpoints(reference, tmp_path) -> str:
  target = tmp_path / "checkpoints"
  shutil.copytree(os.path.join(reference[0], "checkpoints"), target)
  return str(target)


def _meta_checksums(step_dir: str) -> dict:
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    return json.load(f)["checksums"]


# orbax leaves coroutines of a failed read to the garbage collector; they warn, harmlessly.
quiet_orbax = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@quiet_orbax
@pytest.mark.parametrize("corrupt", [_truncate, _delete], ids=["truncate", "delete"])
def test_damaged_array_file_is_reported_and_the_previous_step_restored(
    reference, tmp_path, capsys, corrupt):
  _, steps, setup, pristine = reference
  directory = _copy_checkpoints(reference, tmp_path)
  newest, previous = steps[-1], steps[-2]
  corrupt(os.path.join(directory, str(newest)))

  ckpt = Checkpointer(directory, keep=100)
  found = ckpt.restore_latest_good(*setup)
  warnings = capsys.readouterr().err
  assert found is not None and found[0] == previous, warnings
  assert f"checkpoint step {newest}" in warnings
  state, data_state, _ = found[1]
  h.assert_trees_equal(state, pristine[previous][0], "fallback state")
  assert data_state == pristine[previous][1]
  assert checkpoint.checksums(state) == _meta_checksums(os.path.join(directory, str(previous)))
  # The bad step is moved aside (for inspection), not deleted and not left to be restored again.
  assert newest not in ckpt.all_steps()
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints_corrupt", str(newest)))

  # With every remaining step damaged too there is nothing good left: a clear error, not a
  # silent fresh start.
  for step in ckpt.all_steps():
    corrupt(os.path.join(directory, str(step)))
  with pytest.raises(CheckpointError) as error:
    Checkpointer(directory, keep=100).restore_latest_good(*setup)
  for step in steps[:-1]:
    assert f"step {step}" in str(error.value)
  assert "no valid checkpoint" in str(error.value)


def _unverified_restore(directory: str, step: int, setup):
  """What plain orbax returns for the state item (no checksums), or the exception it raises."""
  import orbax.checkpoint as ocp

  abstract, shardings = setup
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  try:
    with ocp.CheckpointManager(directory, item_names=checkpoint.ITEMS) as manager:
      return manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target))).state
  except Exception as e:  # noqa: BLE001 - any failure is "orbax noticed"
    return e


@quiet_orbax
def test_bit_flips_are_detected_with_the_array_path_or_are_harmless(reference, tmp_path, capsys):
  """Seeded single-bit flips in the newest step's biggest array file (compressed chunks).

  Plain orbax is the oracle: where it restores different values, our restore must refuse the
  step and name a changed array; where orbax itself fails, the step must be refused too; a flip
  that changes no value (padding, unused bytes) may restore, with the saved values.
  """
  _, steps, setup, pristine = reference
  newest, previous = steps[-1], steps[-2]
  rng = random.Random(11)
  outcomes = []
  for trial in range(6):
    directory = _copy_checkpoints(reference, tmp_path / str(trial))
    path = _data_files(os.path.join(directory, str(newest)))[0]
    offset, bit = rng.randrange(os.path.getsize(path)), rng.randrange(8)
    _flip(path, offset, bit)
    plain = _unverified_restore(directory, newest, setup)
    if isinstance(plain, Exception):
      changed = None
    else:
      saved = h.flat(pristine[newest][0])
      changed = {p for p, x in h.flat(plain).items() if x.tobytes() != saved[p].tobytes()}

    found = Checkpointer(directory, keep=100).restore_latest_good(*setup)
    warnings = capsys.readouterr().err
    where = f"flip at byte {offset} bit {bit} of {os.path.basename(path)}: {warnings}"
    if changed == set():
      outcomes.append("harmless")
      if found[0] == newest:
        h.assert_trees_equal(found[1][0], pristine[newest][0], where)
      continue
    assert found[0] == previous, where
    assert f"checkpoint step {newest}" in warnings, where
    h.assert_trees_equal(found[1][0], pristine[previous][0], where)
    if changed is None:
      outcomes.append("orbax error")
    else:
      named = re.search(r"array (\S+) fails its checksum", warnings)
      assert named and named.group(1) in changed, (where, changed)
      outcomes.append("checksum")
  print(f"\nbit flips: {outcomes}")
  assert "checksum" in outcomes  # at least one flip changed array values and was caught by us


def test_bit_flip_in_the_saved_data_iterator_state_is_not_restored_silently(
    reference, tmp_path, capsys):
  """The iterator position is part of exact resume: a flipped digit would skip or repeat data."""
  _, steps, setup, pristine = reference
  directory = _copy_checkpoints(reference, tmp_path)
  newest = steps[-1]
  path = os.path.join(directory, str(newest), "data", "metadata")
  with open(path, "rb") as f:
    raw = f.read()
  position = str(h.batches_consumed(pristine[newest][1])).encode()  # "next_index"
  offset = raw.index(b": " + position) + 2 + len(position) - 1  # its last digit
  _flip(path, offset, 0)  # e.g. '3' <-> '2': still valid JSON, another position
  found = Checkpointer(directory, keep=100).restore_latest_good(*setup)
  warnings = capsys.readouterr().err
  assert found is not None
  if found[0] == newest:
    assert found[1][1] == pristine[newest][1], (
        f"step {newest} restored with a corrupted iterator state and no warning: "
        f"{found[1][1]} != {pristine[newest][1]}")
  else:
    assert f"checkpoint step {newest}" in warnings


@quiet_orbax
def test_cli_resume_after_corruption_continues_from_the_previous_step(reference, tmp_path):
  workdir, steps, setup, pristine = reference
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  newest, previous = steps[-1], steps[-2]
  _delete(os.path.join(copy, "checkpoints", str(newest)))
  before = h.train_records(h.read_records(copy))

  rc, out, err = h.run(h.train_cmd(copy), str(tmp_path / "log"))
  assert rc == 0, err[-3000:]
  assert f"checkpoint step {newest}" in err
  assert os.path.isdir(os.path.join(copy, "checkpoints_corrupt", str(newest)))
  after = h.train_records(h.read_records(copy))
  # Steps up to the fallback are kept exactly as written (not re-run from scratch); the steps
  # after it are re-run and equal the original's.
  assert {s: r for s, r in after.items() if s <= previous} == \
      {s: r for s, r in before.items() if s <= previous}
  assert sorted(after) == sorted(before)
  for step in range(previous + 1, newest + 1):
    assert h.deterministic(after[step]) == h.deterministic(before[step])
  state, data_state, _ = h.restore(os.path.join(copy, "checkpoints"), newest, setup)
  h.assert_trees_equal(state, pristine[newest][0], "re-made newest step")
  assert data_state == pristine[newest][1]


# ---- retention ----

def _metric(step: int):
  """A worsening metric with NaN, +-inf and missing values mixed in."""
  if step == 1 or step % 5 == 0:
    return float("nan")
  if step % 7 == 0:
    return float("inf")
  if step == 13:
    return float("-inf")
  if step % 11 == 0:
    return None
  return float(step)


@pytest.fixture(scope="module")
def retention_history(tmp_path_factory):
  """50 saves with keep=2, keep_best=2: {step: committed steps right after that save}."""
  directory = str(tmp_path_factory.mktemp("retention") / "checkpoints")
  ckpt = Checkpointer(directory, keep=2, keep_best=2)
  state = {"w": jnp.arange(8.0)}
  history = {}
  for step in range(1, 51):
    ckpt.save(step, jax.tree.map(lambda x: x + step, state), {}, {}, metric=_metric(step))
    ckpt.wait()
    history[step] = ckpt.all_steps()
    assert history[step] == h.committed_steps(directory)  # what the manager says is on disk
  ckpt.close()
  return history


def test_retention_keeps_the_newest_and_the_best_and_bounds_the_count(retention_history):
  for step, kept in retention_history.items():
    assert step in kept and (step == 1 or step - 1 in kept), (step, kept)
    assert len(kept) <= 2 + 2, (step, kept)
    if step >= 5:  # by then steps 2 and 3 hold the two lowest finite metrics, for good
      assert set(kept) == {2, 3, step - 1, step}, (step, kept)


def test_retention_never_keeps_a_nonfinite_metric_as_best(retention_history):
  bad = {step: kept for step, kept in retention_history.items()
         if any(s < step - 1 and not (isinstance(_metric(s), float) and math.isfinite(_metric(s)))
                for s in kept)}
  assert not bad, ("steps with a NaN/inf/missing metric kept outside the newest 2 "
                   f"(so ranked among the best 2): {bad}")


# ---- meshes and structure ----

def _setup(model_overrides: dict, mesh_cfg, devices=None):
  from llmjax.config import ModelConfig, OptimConfig
  from llmjax.models.transformer import Transformer
  from llmjax.parallel import mesh as meshlib, sharding
  from llmjax.tasks.lm import LM
  from llmjax.train import init, optim

  model_cfg = ModelConfig(**{"vocab_size": 256, "d_model": 32, "n_layers": 1, "n_heads": 4,
                             "d_ff": 64, "max_len": 32, **model_overrides})
  model, tx = Transformer(model_cfg), optim.make_optimizer(OptimConfig(), 10)
  mesh = meshlib.make_mesh(mesh_cfg, devices=devices)
  rules = sharding.rules_for(mesh_cfg.rules)
  init_variables = init.variables_init(LM(None), model, {
      "tokens": jax.ShapeDtypeStruct((1, 32), jax.numpy.int32)})
  abstract, shardings = init.state_shardings(init_variables, tx, mesh, rules)
  return model, tx, mesh, rules, abstract, shardings


def _specs(tree) -> set:
  return {str(x.sharding.spec) for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
  """A state saved under FSDP rules on 8 devices (data=1, fsdp=8), every array made distinct."""
  from llmjax.config import MeshConfig

  assert jax.device_count() == 8
  *_, abstract, shardings = _setup({}, MeshConfig(data=1, fsdp=8, rules="fsdp"))
  rng = np.random.default_rng(0)

  def value(a):  # made on the host and placed shard by shard: nothing to compile
    if np.issubdtype(a.dtype, np.floating):
      return rng.standard_normal(a.shape).astype(a.dtype)
    return rng.integers(0, 1000, a.shape).astype(a.dtype)

  state = jax.tree.map(lambda a, s: jax.device_put(value(a), s), abstract, shardings)
  assert any("fsdp" in s for s in _specs(state.params))
  directory = str(tmp_path_factory.mktemp("mesh") / "checkpoints")
  ckpt = Checkpointer(directory, keep=3)
  ckpt.save(5, state, {"grain": "{}"}, {"name": "fsdp"})
  ckpt.close()
  return directory, h.flat(state)


def test_checksums_by_shard_or_on_the_host_equal_one_program_over_the_whole_arrays():
  """Shard by shard (one process) and by numpy on the host == the whole-array formula that older
  checkpoints recorded, for every layout and dtype a state holds; one flipped bit changes both
  sums."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from llmjax import checksums as checksums_lib

  mesh = jax.make_mesh((4, 2), ("a", "b"))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  rng = np.random.default_rng(0)
  tree = {"rows": put(rng.standard_normal((8, 6), np.float32), P("a")),
          "grid": put(rng.standard_normal((4, 6, 2), np.float32).astype(jnp.bfloat16),
                      P("a", "b")),
          "replicated": put(rng.integers(0, 9, (5,), np.int32), P()),
          "flags": put(rng.random(6) > 0.5, P("b")),
          "step": put(np.int32(7), P()), "rng": jax.random.key(3)}
  whole = jax.device_get(checksums_lib._whole_tree(
      [checksums_lib._key_data(x) for x in jax.tree.leaves(tree)]))
  by_shard = checkpoint.checksums(tree, host_bytes=0)
  assert [v[:2] for v in by_shard.values()] == [[int(a), int(b)] for a, b in whole]
  assert checkpoint.checksums(tree) == by_shard  # small arrays: summed by numpy on the host
  flipped = np.asarray(tree["rows"]).copy()
  flipped.view(np.uint32)[3, 4] ^= 1 << 17
  changed = checkpoint.checksums({"rows": put(flipped, P("a"))})["rows"]
  assert changed[0] != by_shard["rows"][0] and changed[1] != by_shard["rows"][1]


@pytest.mark.parametrize("mesh_kwargs, n_devices, axis", [
    (dict(data=1, rules="dp"), 1, None),
    (dict(data=4, tensor=2, rules="tp"), 8, "tensor"),
], ids=["one-device", "tensor-parallel-4x2"])
def test_restore_onto_another_mesh_gives_equal_values(fsdp_checkpoint, mesh_kwargs, n_devices,
                                                      axis):
  from llmjax.config import MeshConfig

  directory, saved = fsdp_checkpoint
  *_, abstract, shardings = _setup({}, MeshConfig(**mesh_kwargs), jax.devices()[:n_devices])
  ckpt = Checkpointer(directory, keep=3)
  state, data_state, config = ckpt.restore(5, abstract, shardings)
  ckpt.close()
  assert data_state == {"grain": "{}"} and config == {"name": "fsdp"}
  restored = h.flat(state)
  assert restored.keys() == saved.keys()
  for path, value in saved.items():
    assert restored[path].dtype == value.dtype and restored[path].tobytes() == value.tobytes(), path
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    assert len(x.sharding.device_set) == n_devices
  if axis:
    assert any(axis in spec for spec in _specs(state.params))

  params = checkpoint.restore_params(directory, abstract.params, shardings.params)
  for path, value in h.flat(params).items():
    assert value.tobytes() == saved["params/" + path].tobytes(), path


@pytest.mark.parametrize("overrides, expected", [
    # A whole layer and its optimizer state: the first 5 paths (parameters first), then a count
    (dict(n_layers=2), ["missing in checkpoint: params/layer_1/attn/o/kernel (4, 8, 32)",
                        "more)"]),
    (dict(d_ff=128),
     ["shape of params/layer_0/mlp/wi/kernel: checkpoint (32, 64), model (32, 128)",
      "shape of params/layer_0/mlp/wo/kernel: checkpoint (64, 32), model (128, 32)"]),
], ids=["more-layers", "wider-mlp"])
def test_restoring_another_structure_names_the_paths_and_shapes(fsdp_checkpoint, overrides,
                                                                expected, tmp_path):
  from llmjax.config import MeshConfig

  directory = str(tmp_path / "checkpoints")
  shutil.copytree(fsdp_checkpoint[0], directory)
  *_, abstract, shardings = _setup(overrides, MeshConfig(data=1, rules="dp"), jax.devices()[:1])
  ckpt = Checkpointer(directory, keep=3)
  with pytest.raises(UserError) as error:
    ckpt.restore(5, abstract, shardings)
  for text in expected:
    assert text in str(error.value)
  assert "step 5" in str(error.value)
  # A model that changed is the user's mistake, not a corrupt checkpoint: nothing is moved aside.
  with pytest.raises(UserError):
    ckpt.restore_latest_good(abstract, shardings)
  assert ckpt.all_steps() == [5]
  assert not os.path.exists(tmp_path / "checkpoints_corrupt")
  with pytest.raises(UserError) as error:
    checkpoint.restore_params(directory, abstract.params, shardings.params)
  assert expected[0].replace("params/", "", 1).split(":")[0] in str(error.value)


# ---- failed saves ----

def test_checkpoint_directory_under_a_file_raises_checkpoint_error(tmp_path):
  # Tests run as root, so permission bits would not stop a write. A regular file where a
  # directory must be does: creating anything "under" it fails with ENOTDIR, even for root.
  blocker = tmp_path / "not-a-directory"
  blocker.write_text("")
  with pytest.raises(CheckpointError, match="not-a-directory"):
    Checkpointer(str(blocker / "checkpoints"), keep=2)


def _mount_tiny_tmpfs(path) -> bool:
  os.makedirs(path)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def failed_saves(tmp_path_factory):
  """{mode: (output, seconds from its report to its exit, None if not within 10 s)} for the
  modes of _ckpt_helpers.failing_save, each in its own process (side by side): a failed orbax
  save can leave threads behind, and we want to see whether they hold the process."""
  base = tmp_path_factory.mktemp("unwritable")
  modes = ["file", "immutable"]
  if _mount_tiny_tmpfs(base / "full"):
    modes.append("full")
  procs = {m: h.launch(h.cli("failing-save", m, str(base / m)), str(base / f"{m}-log"))
           for m in modes}
  results = {}
  try:
    for mode, proc in procs.items():
      deadline = time.monotonic() + 240
      while "done" not in h.output(proc)[0] and proc.poll() is None:
        assert time.monotonic() < deadline, h.output(proc)
        time.sleep(0.05)
      reported = time.monotonic()
      try:
        proc.wait(timeout=max(1.0, 10 - (time.monotonic() - reported)))
        exit_after = time.monotonic() - reported
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        exit_after = None
      results[mode] = (h.output(proc), exit_after)
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    subprocess.run(["chattr", "-i", str(base / "immutable" / "checkpoints")], capture_output=True)
    subprocess.run(["umount", str(base / "full")], capture_output=True)
  return results


@pytest.mark.parametrize("mode", ["file", "immutable", "full"])
def test_save_into_an_unwritable_location_raises_checkpoint_error(failed_saves, mode):
  if mode not in failed_saves:
    pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN) to fill a disk")
  (out, err), _ = failed_saves[mode]
  errors = [line for line in out.splitlines() if line.startswith("CheckpointError from ")]
  assert len(errors) == 1, out + err[-3000:]
  assert "save failed" in errors[0] and "/checkpoints" in errors[0], errors[0]
  print(f"\n{mode}: {errors[0][:160]}")


def test_a_failed_save_does_not_keep_the_process_from_exiting(failed_saves):
  (out, err), exit_after = failed_saves["immutable"]
  assert "CheckpointError" in out
  assert exit_after is not None, (
      "the process reported the failed save but had not exited 10 s later (orbax threads of the "
      "failed save wait for a signal that never comes)")


# ---- export ----

def test_export_writes_params_only_and_refuses_an_existing_directory(reference, tmp_path):
  from llmjax.config import MeshConfig

  workdir, steps, setup, pristine = reference
  older = steps[-2]
  out, newest_out = str(tmp_path / "export"), str(tmp_path / "newest")
  # --step picks a step; without it, the newest (the two exports run side by side).
  with_step = h.launch(h.cli("export", f"--workdir={workdir}", f"--step={older}", f"--out={out}"),
                       str(tmp_path / "log1"))
  default = h.launch(h.cli("export", f"--workdir={workdir}", f"--out={newest_out}"),
                     str(tmp_path / "log2"))
  for proc, step in ((with_step, older), (default, steps[-1])):
    proc.wait(timeout=300)
    stdout, err = h.output(proc)
    assert proc.returncode == 0, err[-3000:]
    assert f"exported params of step {step}" in stdout

  model_config, params = checkpoint.load_exported(out)
  with open(os.path.join(workdir, "config.json")) as f:
    assert model_config == json.load(f)["model"]
  state_params = {p[len("params/"):]: v for p, v in h.flat(pristine[older][0]).items()
                  if p.startswith("params/")}
  exported = h.flat(params)
  assert exported.keys() == state_params.keys()
  for path, value in state_params.items():
    assert exported[path].tobytes() == value.tobytes(), path
  # No optimizer state anywhere in what was written.
  for path in glob.glob(os.path.join(out, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        content = f.read()
      assert b"opt_state" not in content and b"inner_state" not in content, path
  assert not os.path.exists(out + ".tmp-export")

  # Loaded straight into another mesh's shardings, verified.
  *_, abstract, shardings = _setup(model_config, MeshConfig(data=4, tensor=2, rules="tp"))
  _, placed = checkpoint.load_exported(out, abstract.params, shardings.params)
  assert all(v.tobytes() == state_params[p].tobytes() for p, v in h.flat(placed).items())

  _, newest_params = checkpoint.load_exported(newest_out)
  newest_state = h.flat(pristine[steps[-1]][0])
  assert all(v.tobytes() == newest_state["params/" + p].tobytes()
             for p, v in h.flat(newest_params).items())

  # An existing --out: one line, exit code 2, and the existing export untouched.
  listing = sorted(glob.glob(os.path.join(out, "**"), recursive=True))
  rc, stdout, err = h.run(h.cli("export", f"--workdir={workdir}", f"--out={out}"),
                          str(tmp_path / "log3"))
  assert rc == 2, (rc, err[-3000:])
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in err, err
  assert "already exists" in errors[0] and out in errors[0]
  assert sorted(glob.glob(os.path.join(out, "**"), recursive=True)) == listing
  assert checkpoint.load_exported(out)[1] is not None
