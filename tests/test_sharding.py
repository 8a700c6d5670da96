"""Sharding: rules presets put parameters where they say, a sharded step equals the one-device
step, context parallelism's steps equal one device's, gradient accumulation equals one big batch,
and bad meshes fail naming the config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.models.transformer import Transformer
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding
from llmjax.tasks.lm import LM
from llmjax.train import init, optim
from llmjax.train import setup as setuplib

SEQ, BATCH = 16, 8
MESHES = {  # preset -> 8-device mesh
    "dp": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "tp": dict(data=4, tensor=2),
    "fsdp_tp": dict(data=1, fsdp=4, tensor=2),
}
# What each preset promises for parameters, written out independently of sharding.RULES.
PARAM_PLACEMENT = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "tp": {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    "fsdp_tp": {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                "vocab": "tensor"},
}


def experiment(rules="dp", accum_steps=1, model_overrides=None, **mesh):
  """A tiny Llama-shaped (GQA, untied head) experiment; constant lr, so step 0 really updates.

  One layer: sharding does not depend on depth, and each 8-device compile costs seconds."""
  # attention_block < SEQ: on CPU the blocked attention core runs sharded too.
  model = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
               max_len=SEQ, attention_block=SEQ // 4)
  model.update(model_overrides or {})
  return config_lib.resolve({
      "model": config_lib.model_section("llama", **model).to_dict(),
      "mesh": dict(data=1, fsdp=1, tensor=1, rules=rules) | mesh,
      "optim": dict(lr=1e-3, schedule="constant", warmup_steps=0, accum_steps=accum_steps),
      "data": dict(seq_len=SEQ),
      "train": dict(batch_size=BATCH, steps=10),
  })


def setup_for(exp, devices=None) -> setuplib.Setup:
  """What setuplib.prepare builds, without data: mesh, rules, model, optimiser, shardings."""
  mesh = meshlib.make_mesh(exp.mesh, devices)
  rules = sharding.rules_for(exp.mesh.rules)
  sharding.check_divisible(exp.model, mesh, exp.mesh.rules)
  task = LM(exp)
  model = task.model()
  tx = optim.make_optimizer(exp.optim, exp.train.steps)
  schedule = optim.learning_rate_schedule(exp.optim, exp.train.steps)
  init_variables = init.variables_init(task, model, task.example_batch(1))
  abstract, shardings = init.state_shardings(init_variables, tx, mesh, rules)
  return setuplib.Setup(exp, mesh, rules, task, model, None, tx, schedule, init_variables,
                        abstract, shardings)


def one_step(s: setuplib.Setup, host_state, host_batch):
  """The loop's own jitted train step (compile_steps) on a copy of `host_state` placed in `s`."""
  train_fn, _ = setuplib.compile_steps(s)
  state = jax.device_put(host_state, s.state_shardings)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(host_batch, s.mesh))
  return new_state, jax.device_get(metrics)


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, size=(BATCH, SEQ)).astype(np.int32)
  segment_ids = np.zeros((BATCH, SEQ), np.int32)
  for r in range(BATCH):  # two packed documents, then some padding
    first, pad = rng.integers(3, 9), rng.integers(0, 4)
    segment_ids[r, :first], segment_ids[r, first:SEQ - pad] = 1, 2
  return {"tokens": tokens, "segment_ids": segment_ids}


@pytest.fixture(scope="module")
def initial():
  """A real sharded init (fsdp x tensor): the sharded state and a host copy of it."""
  s = setup_for(experiment("fsdp_tp", **MESHES["fsdp_tp"]))
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings)
  return s, state, jax.device_get(state)


@pytest.fixture(scope="module")
def reference(initial):
  """One step on a one-device mesh: (metrics, host params after the step)."""
  _, _, host_state = initial
  s = setup_for(experiment("dp", data=1), devices=jax.devices()[:1])
  new_state, metrics = one_step(s, host_state, make_batch())
  assert int(new_state.step) == 1
  return metrics, jax.device_get(new_state.params)


def logical_names(s: setuplib.Setup):
  """Parameter path -> logical axis names, from the model's own annotations."""
  boxed = jax.eval_shape(s.model.init, jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return {jax.tree_util.keystr(path): leaf.names for path, leaf in leaves}


def assert_placed(params, names_by_path, mesh, placement):
  """Every parameter's spec and per-device shard shape are what the preset promises."""
  for path, arr in jax.tree_util.tree_leaves_with_path(params):
    key = jax.tree_util.keystr(path)
    expected_axes = tuple(placement.get(n) for n in names_by_path[key])
    spec = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
    assert spec == expected_axes, key
    shard = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(arr.shape, expected_axes))
    assert {s.data.shape for s in arr.addressable_shards} == {shard}, key
    assert len(arr.addressable_shards) == len(jax.devices())


def test_init_state_is_sharded_as_the_preset_says(initial):
  s, state, _ = initial
  names = logical_names(s)
  assert_placed(state.params, names, s.mesh, PARAM_PLACEMENT["fsdp_tp"])
  wi = state.params["layer_0"]["mlp"]["wi"]["kernel"]
  assert wi.shape == (32, 64) and wi.addressable_shards[0].data.shape == (32 // 4, 64 // 2)
  # Adam moments live exactly where their parameters live.
  param_sharding = {jax.tree_util.keystr(p): a.sharding
                    for p, a in jax.tree_util.tree_leaves_with_path(state.params)}
  moments = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    key = jax.tree_util.keystr(path)
    for tag in (".mu", ".nu"):
      if tag in key:
        moments += 1
        assert leaf.sharding.is_equivalent_to(param_sharding[key.split(tag, 1)[1]], leaf.ndim)
  assert moments == 2 * len(param_sharding)
  # Real values, not placeholders: weights random, norm scales one.
  assert float(jnp.std(wi)) > 0.01
  np.testing.assert_array_equal(state.params["final_norm"]["scale"], 1.0)


@pytest.mark.parametrize("preset", list(MESHES))
def test_sharded_step_equals_one_device_step(preset, initial, reference):
  _, _, host_state = initial
  ref_metrics, ref_params = reference
  s = setup_for(experiment(preset, **MESHES[preset]))
  assert s.mesh.devices.size == 8
  new_state, metrics = one_step(s, host_state, make_batch())
  assert_placed(new_state.params, logical_names(s), s.mesh, PARAM_PLACEMENT[preset])
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  assert metrics["weight"] == ref_metrics["weight"] and metrics["nonfinite"] == 0
  params = jax.device_get(new_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params,
               ref_params)
  # The step really moved the weights (by ~lr), so equality above is not vacuous.
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, host_state.params)
  assert max(jax.tree.leaves(moved)) > 5e-4


def test_context_parallel_steps_equal_one_device_steps(initial):
  """context=4 x fsdp=2: activations split along the sequence, the same losses as 1 device."""
  _, _, host_state = initial
  batches = [make_batch(0)] * 3  # one batch again: the loss must fall

  def run(s):
    train_fn, _ = setuplib.compile_steps(s)
    state, losses = jax.device_put(host_state, s.state_shardings), []
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      for batch in batches:
        state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
        losses.append(float(metrics["loss"]))
    return losses, state

  s = setup_for(experiment("fsdp", fsdp=2, context=4))
  assert dict(s.mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 2, "expert": 1, "context": 4,
                                "tensor": 1}
  losses, state = run(s)
  want, _ = run(setup_for(experiment("dp", data=1), devices=jax.devices()[:1]))
  np.testing.assert_allclose(losses, want, rtol=2e-6)
  assert losses[2] < losses[0]  # the steps really trained
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):  # the sequence really is split
    logits = jax.jit(lambda p, t: s.model.apply({"params": p}, t))(
        state.params, jnp.asarray(batches[0]["tokens"]))
  assert logits.sharding.shard_shape(logits.shape)[:2] == (BATCH // 2, SEQ // 4)
  exp = experiment("fsdp", fsdp=2, context=4)
  exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, seq_len=18))
  with pytest.raises(ConfigError, match=r"^config.data.seq_len=18 must be divisible by the "
                     r"context-parallel size \(config.mesh.context=4\)$"):
    setuplib.check_batch(exp, s.mesh)


def test_gradient_accumulation_equals_one_big_batch(initial, reference):
  _, _, host_state = initial
  ref_metrics, ref_params = reference
  s = setup_for(experiment("tp", accum_steps=2, **MESHES["tp"]))
  new_state, metrics = one_step(s, host_state, make_batch())
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  assert metrics["weight"] == ref_metrics["weight"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
               jax.device_get(new_state.params), ref_params)


@pytest.mark.parametrize("preset,rows_per_device", [("dp", 1), ("fsdp_tp", 2)])
def test_global_batch_splits_rows_over_data_parallel_axes(preset, rows_per_device):
  mesh = meshlib.make_mesh(config_lib.MeshConfig(**MESHES[preset]))
  batch = sharding.global_batch(make_batch(), mesh)
  for x in batch.values():
    shards = x.addressable_shards
    assert {sh.data.shape for sh in shards} == {(rows_per_device, SEQ)}
    # Devices that differ only in the tensor axis hold the same rows.
    rows = {(sh.index[0].start, sh.index[0].stop) for sh in shards}
    assert len(rows) == BATCH // rows_per_device
  np.testing.assert_array_equal(batch["tokens"], make_batch()["tokens"])


@pytest.mark.parametrize("mesh", [dict(data=3), dict(data=2, fsdp=2, tensor=1),
                                  dict(data=-1, fsdp=3), dict(data=16)])
def test_mesh_that_does_not_fit_the_devices_names_config_mesh(mesh):
  with pytest.raises(ConfigError, match=r"config\.mesh"):
    meshlib.make_mesh(config_lib.MeshConfig(**mesh))


def test_mesh_minus_one_fills_the_devices():
  mesh = meshlib.make_mesh(config_lib.MeshConfig(data=-1, tensor=2))
  assert dict(mesh.shape) == {"dcn": 1, "data": 4, "fsdp": 1, "expert": 1, "context": 1,
                              "tensor": 2}
  assert meshlib.batch_parallelism(mesh) == 4


@pytest.mark.parametrize("rules,mesh,overrides,names", [
    ("fsdp", dict(data=1, fsdp=8), dict(d_model=36, head_dim=8), ("embed=36", "fsdp=8")),
    ("tp", dict(data=4, tensor=2), dict(d_model=48, n_heads=3, n_kv_heads=0), ("heads=3",
                                                                               "tensor=2")),
    ("tp", dict(data=4, tensor=2), dict(n_kv_heads=1), ("kv_heads=1", "tensor=2")),
    ("fsdp_tp", dict(data=1, fsdp=4, tensor=2), dict(vocab_size=65), ("vocab=65", "tensor=2")),
])
def test_model_dim_not_divisible_by_its_mesh_axis(rules, mesh, overrides, names):
  exp = experiment(rules, model_overrides=overrides, **mesh)
  with pytest.raises(ConfigError) as err:
    sharding.check_divisible(exp.model, meshlib.make_mesh(exp.mesh), rules)
  for name in names:
    assert name in str(err.value)
  # The same model on a mesh that divides it is fine.
  sharding.check_divisible(exp.model, meshlib.make_mesh(config_lib.MeshConfig(data=8)), "dp")


def test_unknown_rules_preset_is_a_config_error():
  with pytest.raises(ConfigError, match="config.mesh.rules"):
    sharding.rules_for("zero3")
