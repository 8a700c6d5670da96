"""Fine-tuning methods: trainable counts in closed form, frozen parameters bitwise unchanged, zero-
initialised methods start at the base exactly, LoRA merge / scan / sharding / memory, resume of a
LoRA run, generation after prompt and prefix tuning."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
import llmjax.train.rundir
from llmjax import checkpoint, finetune
from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.finetune import lora, partition
from llmjax.generate import generate
from llmjax.models.peft import Peft
from llmjax.models.transformer import Transformer
from llmjax.parallel import sharding
from llmjax.train import init, loop, reporting
from llmjax.train import setup as setuplib

from _task_helpers import experiment

# The tiny llama of _task_helpers.experiment("lm") two layers deep (per-layer methods are counted
# and placed over a stack): H = 8, K = N.
D, L, N, F = 32, 2, 4, 64
H, K = D // N, N


def _setup(tmp_path, method, model=None, mesh=None, devices=None, **ft):
  # Room for a prompt or prefix of up to 16 beyond the 32-token rows.
  sections = dict(model={"max_len": 48, "n_layers": L, **(model or {})},
                  finetune=dict(method=method, **ft))
  if mesh:
    sections["mesh"] = mesh
  return setuplib.prepare(experiment("lm", tmp_path, **sections), None, devices)


def _gpt2(**overrides):
  fields = dict(config_lib.model_section("gpt2", vocab_size=256, d_model=D, n_layers=L,
                                         n_heads=N, d_ff=F, max_len=64))
  return {**fields, **overrides}


# --- counts ------------------------------------------------------------------------------------


def _lora_all_linear(r):
  per_layer = (r * (D + N * H) + 2 * r * (D + K * H) + r * (N * H + D)
               + 2 * r * (D + F) + r * (F + D))
  return L * per_layer


def _bitfit_gpt2():
  per_layer = N * H + 2 * K * H + D + F + D + 2 * D  # q, k, v, o, wi, wo, two norms
  return L * per_layer + D  # and the final norm


LAYER = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D  # one llama block

COUNTS = {
    "lora_qv_r4": (dict(method="lora", lora_rank=4, lora_targets="qv"), None,
                   L * 4 * (2 * D + N * H + K * H)),
    "lora_all_linear_r2": (dict(method="lora", lora_rank=2, lora_targets="all_linear"), None,
                           _lora_all_linear(2)),
    "adapter_8_both": (dict(method="adapter", adapter_dim=8), None, L * 2 * (2 * D * 8)),
    "adapter_8_mlp_block_1": (dict(method="adapter", adapter_dim=8, adapter_placement="mlp",
                                   adapter_layers="1"), None, 2 * D * 8),
    "prompt_5": (dict(method="prompt", prompt_length=5), None, 5 * D),
    "prefix_3": (dict(method="prefix", prefix_length=3), None, L * 2 * 3 * K * H),
    "bitfit_gpt2": (dict(method="bitfit"), _gpt2(), _bitfit_gpt2()),
    "top_1_layer": (dict(method="freeze", presets="top_k_layers=1"), None, LAYER),
    "ffn": (dict(method="freeze", presets="ffn"), None, L * 3 * D * F),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_trainable_parameters_and_optimizer_state_match_the_closed_form(name, tmp_path):
  ft, model, expected = COUNTS[name]
  s = _setup(tmp_path, ft.pop("method"), model, **ft)
  report = finetune.params_report(s.exp, s.abstract_state, None)
  assert report["trainable"] == expected
  assert report["total"] == report["trainable"] + report["frozen"]
  everything = partition.count(init.param_shapes(s.init_variables))
  assert report["total"] == everything
  # AdamW keeps two fp32 moments per trainable value; the rest are a few scalars.
  scalars = partition.nbytes(jax.eval_shape(s.tx.init, {}))
  assert report["optimizer_state_bytes"] == 8 * expected + scalars


def test_adalora_state_adds_two_scores_per_value_and_one_mask_entry_per_triplet(tmp_path):
  s = _setup(tmp_path, "adalora", lora_rank=4, adalora_target_rank=2)
  trainable = partition.count(s.abstract_state.params)
  triplets = L * 2 * 4  # q and v of each layer, rank 4
  assert trainable == L * 4 * (2 * D + N * H + K * H) + triplets
  report = finetune.params_report(s.exp, s.abstract_state, None)
  inner = partition.nbytes(s.abstract_state.opt_state.inner)
  assert inner == 8 * trainable + partition.nbytes(jax.eval_shape(s.tx.init, {}).inner)
  assert report["optimizer_state_bytes"] == inner + 8 * trainable + triplets + 4


def test_adalora_keeps_the_target_budget_of_triplets_once_the_schedule_ends(tmp_path):
  exp = experiment("lm", tmp_path, model=dict(n_layers=L), train=dict(steps=6), finetune=dict(
      method="adalora", lora_rank=4, adalora_target_rank=2, adalora_warmup=1,
      adalora_final=2, adalora_interval=1))
  s = setuplib.prepare(exp)
  _, after = _train(s, 6)
  e = [v for p, v in partition.items(after.params) if p.endswith("/lora/e")]
  assert len(e) == L * 2
  kept = sum(int(np.count_nonzero(v)) for v in e)
  assert kept == 2 * len(e)  # the target rank on average, chosen across modules
  from llmjax.finetune import adalora
  assert sum(sum(r) for r in adalora.kept_ranks(after.params).values()) == kept
  assert int(after.opt_state.step) == 6


@pytest.mark.parametrize("method", ["full", "lora", "adalora"])
def test_an_optimizer_state_made_outside_jit_shares_no_buffer_between_leaves(method, tmp_path):
  """A run from other weights makes its optimizer state eagerly; a leaf appearing twice would be
  donated twice by the first step (AdaLoRA's two score trees once were one)."""
  s = _setup(tmp_path, method)  # as the test below sets up: its init is compiled once
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings,
                          s.trainable)
  opt_state = s.tx.init(state.params)
  leaves = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0)]
  assert len({id(x) for x in leaves}) == len(leaves)
  train_fn, _ = setuplib.compile_steps(s)
  batch = sharding.global_batch(next(loop._data_iterator(s, None)), s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    train_fn(state.replace(opt_state=opt_state), batch)


# --- what changes and what does not ------------------------------------------------------------


def _train(s, steps):
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings,
                          s.trainable)
  before = jax.device_get(state)
  train_fn, _ = setuplib.compile_steps(s)
  iterator = loop._data_iterator(s, None)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for _ in range(steps):
      state, _ = train_fn(state, sharding.global_batch(next(iterator), s.mesh))
  return before, jax.device_get(state)


ZERO_INIT = ("lora", "adalora", "adapter")


@pytest.mark.parametrize("method", ["lora", "adalora", "adapter", "prompt", "prefix", "bitfit"])
def test_frozen_parameters_stay_bitwise_and_only_the_method_trains(method, tmp_path):
  s = _setup(tmp_path, method, _gpt2() if method == "bitfit" else None)
  before, after = _train(s, 3)
  assert before.frozen and partition.count(before.frozen) > partition.count(before.params)
  jax.tree.map(np.testing.assert_array_equal, before.frozen, after.frozen)
  for path, value in partition.items(before.params):
    assert not np.array_equal(value, dict(partition.items(after.params))[path]), path
  if method in ZERO_INIT:  # at step 0 the model computes exactly what its base does
    tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    params = finetune.merge(before.params, before.frozen)
    ours = jax.jit(s.model.apply)({"params": params}, tokens_BL)
    base = jax.jit(Transformer(s.exp.model).apply)({"params": before.frozen}, tokens_BL)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(base))


# --- LoRA: merge, scan, shardings, memory ------------------------------------------------------


def _random_lora(tmp_path, scan=False):
  exp = experiment("lm", tmp_path, model=dict(scan_layers=scan, n_layers=L))
  peft = Peft(lora_targets=finetune.spec.LORA_TARGETS["all_linear"], lora_rank=4)
  model = Transformer(exp.model, peft)
  tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens_BL)["params"])
  rng = np.random.default_rng(1)  # B starts at zero; make every update count
  params = partition.nest({p: (rng.normal(0, 0.05, v.shape).astype(np.float32)
                               if p.endswith("lora/b") else v)
                           for p, v in partition.items(params)})
  return exp, peft, model, params, tokens_BL


def _stacked(params):
  """An unrolled tree in the scanned layout: layer_i/x -> layers/x with the layer axis first."""
  flat, out = dict(partition.items(params)), {}
  for path, value in flat.items():
    if path.startswith("layer_0/"):
      rest = path[len("layer_0/"):]
      out["layers/" + rest] = np.stack([flat[f"layer_{i}/{rest}"] for i in range(L)])
    elif not path.startswith("layer_"):
      out[path] = value
  return partition.nest(out)


def test_merged_lora_equals_unmerged_and_scanned_equals_unrolled(tmp_path):
  exp, peft, model, params, tokens_BL = _random_lora(tmp_path)
  # Jitted forwards: one compile each instead of one per operation.
  unmerged = jax.jit(model.apply)({"params": params}, tokens_BL)
  base = jax.jit(Transformer(exp.model).apply)({"params": params}, tokens_BL)
  assert float(jnp.abs(unmerged - base).max()) > 1e-3  # the updates matter
  merged = lora.merged(params, peft)
  assert not any("/lora/" in p for p, _ in partition.items(merged))
  np.testing.assert_allclose(jax.jit(Transformer(exp.model).apply)({"params": merged}, tokens_BL),
                             unmerged, atol=1e-5)
  scanned_cfg = dataclasses.replace(exp.model, scan_layers=True)
  scanned = jax.jit(Transformer(scanned_cfg, peft).apply)({"params": _stacked(params)}, tokens_BL)
  np.testing.assert_allclose(scanned, unmerged, atol=1e-5)
  # Merging a scanned stack is merging each layer.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               lora.merged(_stacked(params), peft), _stacked(merged))


def merged_kernel_sharding(params, module):
  return dict(partition.items(params))[module + "/kernel"].sharding


def _padded(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(spec))


@pytest.mark.parametrize("scan", [False, True])
def test_lora_factors_shard_like_the_projection_they_wrap(scan, tmp_path):
  s = _setup(tmp_path, "lora", dict(scan_layers=scan), lora_targets="attention",
             mesh=dict(data=1, fsdp=2, tensor=4, rules="fsdp_tp"))
  trained = dict(partition.items(s.state_shardings.params))
  frozen = dict(partition.items(s.state_shardings.frozen))
  shapes = init.param_shapes(s.init_variables)
  modules = lora.modules(s.abstract_state.params)
  assert len(modules) == (1 if scan else L) * 4
  lead = 1 if scan else 0
  for module in modules:
    kernel_shape = shapes[module + "/kernel"].shape
    kernel = _padded(frozen[module + "/kernel"].spec, len(kernel_shape))
    assert any(axis is not None for axis in kernel[lead:]), (module, kernel)
    n_in = len(shapes[module + "/lora/a"].shape) - 1 - lead
    a = _padded(trained[module + "/lora/a"].spec, lead + n_in + 1)
    b = _padded(trained[module + "/lora/b"].spec, len(kernel_shape) - n_in + 1)
    assert a == kernel[:lead + n_in] + (None,), (module, a, kernel)
    assert b == kernel[:lead] + (None,) + kernel[lead + n_in:], (module, b, kernel)
  # Merging under jit puts every merged kernel in its base kernel's sharding.
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings,
                          s.trainable)
  with jax.set_mesh(s.mesh):
    merged = lora.merge_jitted(finetune.merge(state.params, state.frozen),
                               finetune.peft_for(s.exp),
                               finetune.merge(s.state_shardings.params, s.state_shardings.frozen))
  for module in modules:
    assert merged_kernel_sharding(merged, module) == frozen[module + "/kernel"]
  # The base keeps its layout: the same paths and shapes as a model without LoRA.
  base = setuplib.prepare(dataclasses.replace(s.exp, finetune=config_lib.FinetuneConfig()))
  assert {p: v.shape for p, v in partition.items(base.abstract_state.params)} == {
      p: v.shape for p, v in shapes.items() if "/lora/" not in p}


def _compiled_bytes(s):
  train_fn, _ = setuplib.compile_steps(s)
  batch = sharding.global_batch(next(loop._data_iterator(s, None)), s.mesh)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    memory = train_fn.lower(s.abstract_state, batch).compile().memory_analysis()
  return memory.argument_size_in_bytes + memory.temp_size_in_bytes


def test_a_lora_step_needs_less_memory_than_full_fine_tuning_by_the_base_optimizer_state(
    tmp_path):
  model = dict(d_model=64, d_ff=256, n_layers=2)
  one = jax.devices()[:1]
  full = _setup(tmp_path, "full", model, mesh=dict(data=1), devices=one)
  low_rank = _setup(tmp_path, "lora", model, mesh=dict(data=1), devices=one)
  base_values = partition.count(full.abstract_state.params)
  saved = _compiled_bytes(full) - _compiled_bytes(low_rank)
  assert saved >= 8 * base_values, (saved, 8 * base_values)


# --- resume ------------------------------------------------------------------------------------


def test_lora_resume_reproduces_the_uninterrupted_losses_saves_no_base_and_checks_it(
    lora_lm_run, tmp_path):
  exp, straight = lora_lm_run  # 8 steps, checkpoints at 4 and 8 (shared with test_peft)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)  # the same run (it is read only: this test writes a copy)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))  # as if stopped after step 4
  llmjax.train.run(exp, resumed)
  losses = lambda d: [(r["step"], r["loss"]) for r in reporting.read_metrics(
      os.path.join(d, "metrics.jsonl")) if r["split"] == "train"]
  assert losses(resumed) == losses(straight) and len(losses(straight)) == 8
  saved = checkpoint.saved_param_shapes(os.path.join(resumed, "checkpoints"))
  assert saved and all("/lora/" in p for p in saved), sorted(saved)
  # The base is rebuilt on resume and must be the one the checkpoints were trained on.
  other_base = dataclasses.replace(exp, train=dataclasses.replace(exp.train, seed=1, steps=12))
  config = (tmp_path / "resumed" / "config.json").read_text()
  with pytest.raises(checkpoint.CheckpointError, match="frozen base"):
    llmjax.train.run(other_base, resumed)
  assert (tmp_path / "resumed" / "config.json").read_text() == config  # nothing rewritten




def test_lora_classifier_from_an_lm_run_freezes_its_weights_and_trains_lora_and_the_head(
    lm_run, tmp_path, capfd):
  # lm_run: experiment("lm") trained for 4 steps once per session (conftest), read only. LoRA on
  # every linear: more fresh parameters than the one line that says so lists.
  exp = experiment("classify", tmp_path, decoder=True,
                   finetune=dict(method="lora", lora_targets="all_linear"),
                   train=dict(init_from=f"workdir:{lm_run}", init_new="classifier/.*"))
  workdir = str(tmp_path / "cls")
  llmjax.train.run(exp, workdir)
  run = llmjax.train.rundir.restore(workdir)
  # What started fresh is said at training and again on reopening, each time in a short line.
  said = [line for line in capfd.readouterr().err.splitlines()
          if line.startswith(f"init_from workdir:{lm_run}@4: loaded")]  # the step it started from
  assert len(said) == 2 and all(len(line) < 400 and "more)" in line for line in said), said
  assert {p.split("/")[-2] if "/lora/" in p else p
          for p, _ in partition.items(run.state.params)} == {
      "lora", "classifier/kernel"}  # (the tiny llama has no biases)
  lm = llmjax.train.rundir.restore(str(lm_run))
  frozen = jax.device_get(run.state.frozen)
  assert set(frozen) == set(lm.params) - {"lm_head"}  # a classifier reads no LM head
  jax.tree.map(np.testing.assert_array_equal, frozen,
               {k: jax.device_get(v) for k, v in lm.params.items() if k in frozen})
  assert set(run.params) == set(frozen) | {"classifier"}
  with open(os.path.join(workdir, finetune.PARAMS_FILE)) as f:
    report = json.load(f)
  assert report["base"]["init_from"] == f"{exp.train.init_from}@4"  # the step it started from
  assert report["trainable"] == partition.count(run.state.params)


# --- prompt and prefix tuning ------------------------------------------------------------------


@pytest.mark.parametrize("peft", [Peft(prefix_length=3), Peft(prompt_length=3)],
                         ids=["prefix", "prompt"])
def test_generation_after_prompt_or_prefix_tuning_equals_full_recomputation(peft, tmp_path):
  exp = experiment("lm", tmp_path)
  model = Transformer(exp.model, peft)
  prompt_BP = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), prompt_BP)["params"])
  new_BN = generate(model, params, prompt_BP, max_new_tokens=6)
  # Greedy decoding with the cache == argmax of one full forward over prompt + new tokens at
  # every position that chose a token (causal: position t sees tokens <= t only).
  tokens_BL = jnp.concatenate([prompt_BP, new_BN], axis=1)
  logits_BLV = jax.jit(model.apply)({"params": params}, tokens_BL)
  chosen_BN = jnp.argmax(logits_BLV[:, 4:-1], axis=-1)
  np.testing.assert_array_equal(np.asarray(new_BN), np.asarray(chosen_BN))


def test_prefix_and_prompt_change_the_output_and_prompt_keeps_one_output_per_token(tmp_path):
  exp = experiment("lm", tmp_path)
  # The shapes and methods of the generation tests above: their inits compile once for both.
  tokens_BL = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)))
  base = Transformer(exp.model)
  params = nn.unbox(jax.jit(base.init)(jax.random.PRNGKey(0), tokens_BL)["params"])
  reference = jax.jit(base.apply)({"params": params}, tokens_BL)
  for peft in (Peft(prefix_length=3), Peft(prompt_length=3)):
    model = Transformer(exp.model, peft)
    extra = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens_BL)["params"])
    added = {p: v for p, v in partition.items(extra) if p not in dict(partition.items(params))}
    out = jax.jit(model.apply)({"params": partition.merge(partition.nest(added), params)},
                               tokens_BL)
    assert out.shape == reference.shape
    assert float(jnp.abs(out - reference).max()) > 1e-4


# --- bad input (the CLI's side is in test_config.BAD_INPUTS) ------------------------------------


BAD = {
    "frozen_matches_nothing": (dict(method="full", frozen="nothing/.*"),
                               "config.finetune.frozen"),
    "unknown_preset": (dict(method="freeze", presets="heads"), "unknown preset 'heads'"),
    "top_k_too_many": (dict(method="freeze", presets="top_k_layers=9"), "top_k_layers=9"),
    "adapter_block_missing": (dict(method="adapter", adapter_layers="5"), "block 5"),
    "bad_regex": (dict(method="freeze", trainable="(("), "not a regex"),
    "lora_targets_match_nothing": (dict(method="lora", lora_targets="attn/nope"),
                                   "config.finetune.lora_targets='attn/nope' matches no"),
    "lora_rank_zero": (dict(method="lora", lora_rank=0), "config.finetune.lora_rank must be"),
    "prompt_longer_than_positions_left": (dict(method="prompt", prompt_length=17),
                                          "config.finetune.prompt_length=17 .* = 16"),
    "prefix_longer_than_positions_left": (dict(method="prefix", prefix_length=20),
                                          "config.finetune.prefix_length=20"),
    "adalora_target_above_initial": (dict(method="adalora", lora_rank=4,
                                          adalora_target_rank=6), "adalora_target_rank=6"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_finetune_settings_are_named(name, tmp_path):
  ft, pattern = BAD[name]
  with pytest.raises(ConfigError, match=pattern.replace("((", r"\(\(")):
    _setup(tmp_path, ft.pop("method"), **ft)


def test_bitfit_on_a_model_without_biases_is_named(tmp_path):
  with pytest.raises(ConfigError, match="bitfit.*needs bias parameters.*use_bias=False"):
    _setup(tmp_path, "bitfit", dict(use_bias=False))


# --- the comparison's experiments --------------------------------------------------------------


@pytest.mark.parametrize("name", ["stdlib_tests_lm.py", "stdlib_classify.py"])
def test_every_method_of_the_comparison_experiments_resolves(name):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "finetune", name)
  module = config_lib.experiment_module(name, path)
  methods = config_lib.experiment_module("methods.py", path).METHODS
  for method in methods:
    exp = config_lib.resolve(module.get_config(method))
    assert exp.finetune.method == method and exp.train.init_from.startswith("workdir:runs/")
    smoke = config_lib.resolve(module.get_config(f"{method},smoke"))
    assert smoke.train.init_from == "" and smoke.train.steps == 20
    finetune.peft_for(exp)  # the prompt or prefix fits the positions left
  # `:smoke` alone (and no argument) is the default method's: lora
  assert config_lib.resolve(module.get_config("smoke")) == config_lib.resolve(
      module.get_config("lora,smoke"))
  assert config_lib.resolve(module.get_config(None)).finetune.method == "lora"
  with pytest.raises(ConfigError, match="at most one method"):
    module.get_config("lora,full,smoke")
