"""Magnitude pruning (config.prune, llmjax/finetune/prune.py): masks at exactly the requested
sparsity per layer, globally and 2:4; the cubic schedule; one trained run whose pruned weights
stay exactly zero through AdamW with weight decay, resume exactly, are reported and exported;
each bad input refused in one line with exit code 2 before anything is written."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax.train
from llmjax import treepaths
from llmjax.config_prune import PruneConfig
from llmjax.eval import evaluate
from llmjax.finetune import prune
from llmjax.train import reporting, rundir
from llmjax.train import setup as setuplib

import _cli
from _task_helpers import experiment

SHAPES = {"a/kernel": (16, 8), "b/kernel": (8, 12), "c/kernel": (2, 4, 6)}


def _random_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def _masks(method, sparsity, params, **kw):
  p = PruneConfig(method=method, target=sparsity if method != "nm" else 0.0, **kw)
  ones = {k: jnp.ones(v.shape, bool) for k, v in params.items()}
  return {k: np.asarray(v) for k, v in prune.new_masks(p, params, ones, sparsity).items()}


def test_masks_reach_the_requested_sparsity_per_layer_globally_and_two_of_four():
  params = _random_params()
  absolute = {k: np.abs(np.asarray(v)) for k, v in params.items()}
  for sparsity in (0.5, 0.7, 0.9):
    per_layer = _masks("layer", sparsity, params)
    for k, mask in per_layer.items():  # exactly round(s n) pruned, the smallest |w| of each
      assert (~mask).sum() == round(sparsity * mask.size), (k, sparsity)
      assert absolute[k][mask].min() > absolute[k][~mask].max()
    overall = _masks("global", sparsity, params)
    total = sum(m.size for m in overall.values())
    assert sum((~m).sum() for m in overall.values()) == round(sparsity * total)
    kept = np.concatenate([absolute[k][m] for k, m in overall.items()])
    pruned = np.concatenate([absolute[k][~m] for k, m in overall.items()])
    assert kept.min() > pruned.max()  # one threshold across layers, not one per layer
  for k, mask in _masks("nm", 0.5, params).items():  # groups of 4 along the input axis
    groups = np.moveaxis(mask, -2, -1).reshape(-1, 4)
    values = np.moveaxis(absolute[k], -2, -1).reshape(-1, 4)
    assert (groups.sum(axis=1) == 2).all(), k
    assert (np.sort(values, axis=1)[:, 2:] == np.sort(np.where(groups, values, -1), axis=1)[:, 2:]
            ).all(), k  # the two kept are the group's two largest


def test_the_gradual_schedule_is_zhu_and_gupta_cubic_and_prunes_every_frequency_steps():
  p = PruneConfig(method="layer", initial=0.1, target=0.8, start_step=3, end_step=23,
                  frequency=5)
  for t in range(0, 30):
    expected = 0.8 + (0.1 - 0.8) * (1 - (t - 3) / 20) ** 3 if 3 <= t <= 23 else None
    if expected is not None:
      np.testing.assert_allclose(float(prune.schedule(p, jnp.int32(t))), expected, rtol=1e-6)
    assert bool(prune.due(p, jnp.int32(t))) == (t in (3, 8, 13, 18, 23)), t
  off_grid = dataclasses.replace(p, end_step=21)  # the target is still reached, at end_step
  assert [t for t in range(30) if prune.due(off_grid, jnp.int32(t))] == [3, 8, 13, 18, 21]
  assert float(prune.schedule(off_grid, jnp.int32(21))) == pytest.approx(0.8)
  one_shot = PruneConfig(method="global", target=0.6, start_step=4, frequency=3)
  assert [t for t in range(12) if prune.due(one_shot, jnp.int32(t))] == [4]
  assert float(prune.schedule(one_shot, jnp.int32(4))) == pytest.approx(0.6)


PRUNE = dict(method="layer", initial=0.25, target=0.5, start_step=1, end_step=2, frequency=1)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
  """A tiny LM pruned per layer to 25% by the update of step 1 and 50% by that of step 2, 6
  steps of AdamW with weight decay and momentum, checkpoints at 3 and 6: (experiment, workdir)."""
  tmp = tmp_path_factory.mktemp("pruned_run")
  exp = experiment("lm", tmp, prune=PRUNE, optim=dict(weight_decay=0.1, b1=0.9),
                   train=dict(steps=6, checkpoint_every=3, eval_every=3, log_every=3))
  llmjax.train.run(exp, str(tmp / "run"))
  return exp, tmp / "run"


def _state(workdir, step):
  state = rundir.restore(str(workdir), step).state
  return (jax.device_get(dict(treepaths.items(state.params))),
          jax.device_get(state.opt_state.masks))


def test_pruned_weights_stay_zero_through_adamw_and_reports_and_export_hold_them(pruned_run,
                                                                                 tmp_path):
  exp, workdir = pruned_run
  params3, masks3 = _state(workdir, 3)
  params6, masks6 = _state(workdir, 6)
  assert sorted(masks6) == [k for k in sorted(params6) if k.endswith("/kernel")]
  for k, mask in masks6.items():
    assert (~mask).sum() == round(0.5 * mask.size), k  # the target, reached by step 3
    np.testing.assert_array_equal(mask, masks3[k])  # and kept since
    assert (params6[k][~mask] == 0).all() and (params6[k][mask] != 0).all(), k
    assert (params6[k][mask] != params3[k][mask]).any(), k  # the live weights trained on
  val = [r for r in reporting.read_metrics(workdir / "metrics.jsonl") if r["split"] == "val"]
  assert [r["step"] for r in val] == [3, 6] and all(r["sparsity"] == 0.5 for r in val)
  assert all(val[-1][f"sparsity/{k}"] == 0.5 for k in masks6)
  report = json.loads((workdir / "params.json").read_text())["sparsity"]
  assert report["overall"] == 0.5 and report["layers"] == {k: 0.5 for k in masks6}
  evaluated = evaluate.evaluate_run(str(workdir))  # llmjax eval's JSON reports it too
  assert evaluated["sparsity"] == 0.5 and evaluated[f"sparsity/{sorted(masks6)[0]}"] == 0.5
  result = _cli.run("export", f"--workdir={workdir}", f"--out={tmp_path / 'export'}")
  assert result.returncode == 0, result.stderr
  from llmjax.hf import convert
  exported = dict(treepaths.items(
      jax.device_get(convert.load_export(str(tmp_path / "export")).params)))
  for k, mask in masks6.items():
    np.testing.assert_array_equal(exported[k], params6[k])


def test_a_resumed_pruned_run_equals_the_uninterrupted_one(pruned_run, tmp_path):
  exp, workdir = pruned_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if stopped after step 3
  llmjax.train.run(exp, str(resumed))
  losses = lambda d: [(r["step"], r["loss"]) for r in reporting.read_metrics(
      os.path.join(d, "metrics.jsonl")) if r["split"] == "train"]
  assert losses(resumed) == losses(workdir)
  (params, masks), (params_straight, masks_straight) = _state(resumed, 6), _state(workdir, 6)
  jax.tree.map(np.testing.assert_array_equal, (params, masks), (params_straight, masks_straight))


SMOKE = "--config=experiments/prune/stdlib_gpt.py:smoke"
BAD = {
    "target_of_one": (["--config.prune.target=1.0"], "config.prune.target must be in [0, 1)"),
    "negative_target": (["--config.prune.target=-0.1", "--config.prune.initial=0"],
                        "config.prune.target must be in [0, 1)"),
    "n_m_not_dividing": (["--config.prune.method=nm", "--config.prune.nm=2:3",
                          "--config.prune.target=0"], "input axis (second to last) is not "
                         "divisible by M=3"),
    "regex_matching_nothing": (["--config.prune.params=.*/nothing"],
                               "matches no trained parameter"),
    "end_before_start": (["--config.prune.start_step=5", "--config.prune.end_step=2"],
                         "config.prune.end_step=2 must be 0"),
    "gradual_n_m": (["--config.prune.method=nm", "--config.prune.target=0",
                     "--config.prune.end_step=10"], "N:M pruning is one-shot"),
    "bad_n_m": (["--config.prune.method=nm", "--config.prune.nm=4:2"],
                "config.prune.nm='4:2' must be N:M with 0 < N < M"),
}


def test_each_bad_pruning_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
  for name, (overrides, message) in BAD.items():
    workdir = tmp_path / name
    result = _cli.run("train", SMOKE, f"--workdir={workdir}", *overrides)
    assert result.returncode == 2, (name, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], (name, result.stderr[-2000:])
    assert not workdir.exists(), name


def test_masks_shard_like_their_weights(tmp_path):
  exp = experiment("lm", tmp_path, prune=PRUNE, mesh=dict(rules="fsdp", data=1, fsdp=8))
  shardings = setuplib.prepare(exp, None).state_shardings
  weights = dict(treepaths.items(shardings.params))
  masks = shardings.opt_state.masks
  assert masks and all(masks[k].spec == weights[k].spec for k in masks)
  assert any(s is not None for k in masks for s in masks[k].spec)  # some are split over fsdp
