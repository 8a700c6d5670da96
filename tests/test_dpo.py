"""The dpo task: losses and metrics against numpy, the reference's kinds (a frozen copy, adapters
off, precomputed), exact resume, 8 devices == 1, and bad input."""

import dataclasses
import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib, finetune, flops
from llmjax.errors import ConfigError, DataError, UserError
from llmjax.objectives import dpo as objective
from llmjax.objectives.distill import TEACHER
from llmjax.parallel import sharding
from llmjax.train import loop, setup
from llmjax.tasks.dpo import DPO, REF_CHOSEN, REF_REJECTED
from llmjax.train.state import loss_variables

from _task_helpers import with_mesh

WORDS = "open file save close print edit view help".split()


def write_pairs(path, n=24, seed=0):
  """Pairs whose chosen completion repeats the word the prompt asks for."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(n):
      word, other = rng.choice(WORDS, 2, replace=False)
      f.write(json.dumps({"prompt": f"say {word} {i}:", "chosen": f" {word}!",
                          "rejected": f" {other}?"}) + "\n")
  return str(path)


def dpo_experiment(tmp, lora=False, model=None, **task):
  c = config_lib.base_config()
  c.model = config_lib.model_section("llama", **(model or dict(
      vocab_size=256, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=16)))
  c.task.name = "dpo"
  c.task.update({"completions": 0, **task})
  c.data.update(dict(source="files", files=write_pairs(tmp / "train.jsonl"),
                     val_files=write_pairs(tmp / "val.jsonl", 8, seed=1), tokenizer="byte",
                     seq_len=16))
  c.train.update(dict(steps=4, batch_size=8, log_every=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2, async_checkpoint=False, progress=False))
  c.optim.update(dict(lr=0.01, warmup_steps=1))
  if lora:
    c.finetune.update(dict(method="lora", lora_rank=2, lora_targets="all_linear"))
  return config_lib.resolve(c)


def numpy_losses(pc, pr, rc, rr, beta, loss_type, eps):
  """TRL's DPOTrainer.dpo_loss, written out in numpy."""
  h = (pc - pr) - (rc - rr)
  logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
  losses = {"sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2, "hinge": np.maximum(0.0, 1 - beta * h)}[loss_type]
  return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                           ("hinge", 0.0)])
def test_losses_and_metrics_equal_numpy(loss_type, eps):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 3, 6).astype(np.float32) for _ in range(4))
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)  # a padded row counts for nothing
  beta = 0.3
  losses, chosen, rejected = objective.pair_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                   label_smoothing=eps)
  want, want_c, want_r = numpy_losses(pc, pr, rc, rr, beta, loss_type, eps)
  np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
  loss_sum, pairs, sums = objective.pair_sums(losses, chosen, rejected, pc, pr, valid)
  report = objective.report({"loss_sum": loss_sum, "weight": pairs, **sums})
  v = valid.astype(bool)
  expected = {"loss": want[v].mean(), "pairs": 5, "reward_accuracy": (want_c > want_r)[v].mean(),
              "reward_margin": (want_c - want_r)[v].mean(), "reward_chosen": want_c[v].mean(),
              "reward_rejected": want_r[v].mean(), "logp_chosen": pc[v].mean(),
              "logp_rejected": pr[v].mean(), "preference_accuracy": (pc > pr)[v].mean()}
  assert set(report) == set(expected)
  for key, value in expected.items():
    assert report[key] == pytest.approx(float(value), rel=1e-5, abs=1e-5), key
  # The sequence log-probability: a masked sum of log-softmax at the targets.
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  got, counts = objective.sequence_logps(logits, targets, mask)
  np.testing.assert_allclose(got, (picked * mask).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(counts, mask.sum(-1))


def _batch(s):
  return sharding.global_batch(s.task.eval_batches(s.data.val, 8, 1)[0], s.mesh)


def test_at_start_policy_is_reference_and_reference_gets_no_gradient(tmp_path):
  """Copy kind: before any step the loss is log 2 and every reward 0; the reference's
  gradient is zero, it holds no optimizer state and it is never checkpointed; the precomputed
  kind's columns are the copy's log-probabilities."""
  s = setup.prepare(dpo_experiment(tmp_path))
  state = loop.fresh_state(s)
  batch = _batch(s)

  @jax.jit
  def check(state, batch):
    variables = loss_variables(state, state.params, state.model_state)
    loss = lambda r: s.task.loss(s.model, {**variables, TEACHER: {**variables[TEACHER],  # noqa
                                                                  "variables": r}},
                                 batch, rng=None, train=False)
    terms = loss(variables[TEACHER]["variables"])
    grads = jax.grad(lambda r: loss(r).loss_sum)(variables[TEACHER]["variables"])
    columns = s.task.reference_columns(s.model, variables[TEACHER]["variables"], batch)
    return terms, grads, columns, s.task.reference_logps(s.model, variables, batch)

  with jax.set_mesh(s.mesh):
    terms, grads, columns, (ref_chosen, ref_rejected) = check(state, batch)
  report = s.task.report({"loss_sum": terms.loss_sum, "weight": terms.weight, **terms.sums})
  assert report["loss"] == pytest.approx(math.log(2), abs=1e-6)
  for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
    assert report[key] == 0.0, key
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  np.testing.assert_array_equal(columns[REF_CHOSEN], ref_chosen)
  np.testing.assert_array_equal(columns[REF_REJECTED], ref_rejected)
  assert state.checkpointed().teacher is None
  n_params = len(jax.tree.leaves(state.params))
  assert len(jax.tree.leaves(state.teacher)) == n_params
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert len(moments) == 2 * n_params  # adam's two moments of the policy, none of the reference


def test_adapters_off_equals_frozen_copy_bitwise(tmp_path):
  """A LoRA run's reference without the adapters equals a frozen copy of its starting policy."""
  copy = setup.prepare(dpo_experiment(tmp_path, lora=True, reference="copy"))
  off = setup.prepare(dpo_experiment(tmp_path, lora=True, reference="adapters_off"))
  state = loop.fresh_state(copy)
  off_state = loop.fresh_state(off)
  assert off_state.teacher is None  # no second copy of the weights
  batch = _batch(copy)

  def reference(s):
    return jax.jit(lambda st, b: s.task.reference_logps(
        s.model, loss_variables(st, st.params, st.model_state), b))
  with jax.set_mesh(copy.mesh):
    want = reference(copy)(state, batch)
    got = reference(off)(off_state, batch)
  np.testing.assert_array_equal(np.asarray(want[0]), np.asarray(got[0]))
  np.testing.assert_array_equal(np.asarray(want[1]), np.asarray(got[1]))
  with pytest.raises(ConfigError, match="reference='adapters_off'"):
    setup.prepare(dpo_experiment(tmp_path, reference="adapters_off"))


def _final(workdir):
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [(r["step"], r["split"], r["loss"]) for r in records]


def test_exact_resume_and_eval(tmp_path):
  """2 steps + resume to 4 == 4 steps in one go: the copied reference is rebuilt from the same
  start (it is in no checkpoint); `llmjax eval` of a copy and a precomputed run reports what
  training logged."""
  import llmjax.train
  exp = dpo_experiment(tmp_path)
  llmjax.train.run(exp, str(tmp_path / "whole"))
  # As if stopped after step 2 (the same experiment: a shorter one would compile another step
  # for its other learning-rate schedule).
  shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
  llmjax.train.run(exp, str(tmp_path / "resumed"))
  assert _final(tmp_path / "whole") == _final(tmp_path / "resumed")
  # `llmjax eval` rebuilds the copied reference (the whole val split is one batch here, so its
  # report is the run's last evaluation); at step 2 the policy is no longer the reference.
  from llmjax.eval.evaluate import evaluate_run
  _evaluates_as_trained(evaluate_run, tmp_path / "whole", 4)
  # A precomputed reference is read back from the workdir's store, or, where the store is gone,
  # computed again from the starting parameters.
  pre = dpo_experiment(tmp_path, reference="precomputed")
  llmjax.train.run(dataclasses.replace(pre, train=dataclasses.replace(pre.train, steps=2)),
                   str(tmp_path / "pre"))
  _evaluates_as_trained(evaluate_run, tmp_path / "pre", 2)
  shutil.rmtree(tmp_path / "pre" / "reference_logps")
  _evaluates_as_trained(evaluate_run, tmp_path / "pre", 2)


def _evaluates_as_trained(evaluate_run, workdir, step):
  """`llmjax eval` of a dpo run's checkpoint `step` reports what training logged there."""
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  want = [r for r in logged if r["split"] == "val" and r["step"] == step][-1]
  got = evaluate_run(str(workdir), step)
  assert got["reward_margin"] != 0.0
  for key in ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "logp_rejected"):
    assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_eight_devices_equal_one(tmp_path):
  """One train step on a data x fsdp = 2 x 4 mesh (fsdp rules) == on one device."""
  exp = dpo_experiment(tmp_path)
  results = []
  for e, devices in ((exp, jax.devices()[:1]), (with_mesh(exp, 2, 4, "fsdp"), None)):
    s = setup.prepare(e, devices=devices)
    train, _ = setup.compile_steps(s)
    with jax.set_mesh(s.mesh):
      state, metrics = train(loop.fresh_state(s), sharding.global_batch(
          s.task.eval_batches(s.data.train, 8, 1)[0], s.mesh))
    results.append((jax.device_get(metrics["loss"]),
                    jax.device_get(finetune.merge(state.params, state.frozen))))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               results[0][1], results[1][1])


def test_bad_input_one_line_and_nothing_written(tmp_path, lm_run):
  import llmjax.train
  base = dpo_experiment(tmp_path)
  bad_rows = {"empty": ({"prompt": "p", "chosen": " ", "rejected": "x"}, "'chosen' is empty"),
              "same": ({"prompt": "p", "chosen": "x", "rejected": "x"}, "identical")}
  for name, (row, message) in bad_rows.items():
    path = tmp_path / f"{name}.jsonl"
    path.write_text(open(base.data.files).read() + json.dumps(row) + "\n")
    exp = dataclasses.replace(base, data=dataclasses.replace(base.data, files=str(path)))
    with pytest.raises(DataError, match=f"{name}.jsonl:25: .*{message}") as e:
      llmjax.train.run(exp, str(tmp_path / name))
    assert "\n" not in str(e.value) and not (tmp_path / name).exists()
  c = config_lib.base_config()
  c.task.name, c.task.beta = "dpo", 0.0
  c.data.update(dict(source="files", files="x.jsonl"))
  with pytest.raises(ConfigError, match=r"config.task.beta must be > 0, got 0.0"):
    config_lib.resolve(c)
  # The reference (the starting policy: lm_run, a byte-level LM run of _task_helpers' one-layer
  # llama) and a wordpiece-tokenized dataset.
  base = dpo_experiment(tmp_path, model=dict(vocab_size=256, d_model=32, n_layers=1, n_heads=4,
                                             d_ff=64, max_len=32))
  data = dataclasses.replace(base.data, tokenizer="wordpiece:64")
  exp = dataclasses.replace(base, data=data, train=dataclasses.replace(
      base.train, init_from=f"workdir:{lm_run}"))
  with pytest.raises(ConfigError, match="reference model .* vocabulary") as e:
    llmjax.train.run(exp, str(tmp_path / "vocab"))
  assert "\n" not in str(e.value) and not (tmp_path / "vocab").exists()


def test_precomputed_store_is_read_back_only_for_its_manifest(tmp_path):
  from llmjax.train import reference
  columns = {"train": {REF_CHOSEN: np.arange(3, dtype=np.float32)},
             "val": {REF_CHOSEN: np.ones(2, np.float32)}}
  manifest = {"init_from": "", "seed": 0, "rows": {"train": 3, "val": 2}, "rows_sha256": "a"}
  reference._write(str(tmp_path), columns, manifest)
  back = reference._read(str(tmp_path), manifest)
  np.testing.assert_array_equal(back["train"][REF_CHOSEN], columns["train"][REF_CHOSEN])
  np.testing.assert_array_equal(back["val"][REF_CHOSEN], columns["val"][REF_CHOSEN])
  assert reference._read(str(tmp_path), {**manifest, "seed": 1}) is None


def _orpo_batch(chosen_lengths, prompt=5, rejected=10, seq_len=16, seed=0):
  """Random tokens: one row per pair (prompt, then completion) and a padded row (no pair)."""
  rng = np.random.default_rng(seed)
  batch = {}
  for side, lengths in (("chosen", chosen_lengths), ("rejected", [rejected] * 3)):
    tokens = np.zeros((4, seq_len), np.int32)
    segments, mask = np.zeros_like(tokens), np.zeros((4, seq_len), np.float32)
    for row, n in enumerate(lengths):
      tokens[row, :n] = rng.integers(1, 256, n)
      segments[row, :n] = 1
      mask[row, prompt - 1:n - 1] = 1.0  # t predicts completion token t + 1
    batch.update({f"{side}_tokens": tokens, f"{side}_segment_ids": segments,
                  f"{side}_loss": mask})
  return batch


def trl_orpo(logits, batch, beta, nll_tokens, per_pair):
  """TRL's ORPOTrainer loss and metrics, written out in numpy over the 3 real pairs; `per_pair`:
  the NLL averaged per pair, then over pairs (the paper's expectation; llmjax's), else over all
  chosen tokens of the batch (TRL's)."""
  logits = logits.astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tokens = np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])[[0, 1, 2, 4, 5, 6]]
  picked = np.take_along_axis(logp[[0, 1, 2, 4, 5, 6], :-1], tokens[:, 1:, None], -1)[..., 0]
  mask = np.concatenate([batch["chosen_loss"], batch["rejected_loss"]])[[0, 1, 2, 4, 5, 6], :-1]
  mean_logps = (picked * mask).sum(-1) / mask.sum(-1)  # get_batch_logps(average_log_prob=True)
  pc, pr = mean_logps[:3], mean_logps[3:]
  if nll_tokens == "sequence":  # labels: every attended token but the first
    nll_mask = (batch["chosen_segment_ids"][:3, 1:] > 0).astype(np.float64)
  else:
    nll_mask = mask[:3]
  token_nll = -picked[:3] * nll_mask
  nll = (token_nll.sum(-1) / nll_mask.sum(-1)).mean() if per_pair else (
      token_nll.sum() / nll_mask.sum())
  log_odds = (pc - pr) - (np.log1p(-np.exp(pc)) - np.log1p(-np.exp(pr)))
  ratio = np.log(1 / (1 + np.exp(-log_odds)))
  rc, rr = beta * pc, beta * pr
  return {"loss": nll - (beta * ratio).mean(), "nll_loss": nll, "log_odds_ratio": ratio.mean(),
          "log_odds_chosen": log_odds.mean(), "reward_chosen": rc.mean(),
          "reward_rejected": rr.mean(), "reward_margin": (rc - rr).mean(),
          "reward_accuracy": (rc > rr).mean(), "logp_chosen": pc.mean(),
          "logp_rejected": pr.mean(), "preference_accuracy": (pc > pr).mean(), "pairs": 3}


def test_orpo_loss_and_metrics_equal_trl_in_numpy(tmp_path):
  """ORPO's loss and metrics from a tiny model's logits equal TRL's formula in numpy (rows of
  equal length, where TRL's batch-token NLL mean is the per-pair one), and the paper's per-pair
  mean for unequal rows; a padded row counts for nothing and gives finite gradients."""
  from llmjax import tasks
  from llmjax.models.apply import apply_model
  beta = 0.25
  exp = dpo_experiment(tmp_path, name="orpo", beta=beta)
  model = tasks.build(exp).model()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
  for nll_tokens, lengths, per_pair in (("sequence", [12, 12, 12], False),
                                        ("completion", [12, 12, 12], False),
                                        ("sequence", [9, 12, 16], True)):
    task = tasks.build(dataclasses.replace(exp, task=dataclasses.replace(
        exp.task, nll_tokens=nll_tokens)))
    batch = _orpo_batch(lengths)

    @jax.jit
    def run(params, batch):
      tokens, segments = (jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
                          for k in ("tokens", "segment_ids"))
      logits, _ = apply_model(model, {"params": params}, tokens, train=False, rng=None,
                              segment_ids_BL=segments, deterministic=True)
      return logits, task.loss(model, {"params": params}, batch, rng=None, train=False)
    logits, terms = run(variables["params"], batch)
    want = trl_orpo(np.asarray(logits), batch, beta, nll_tokens, per_pair)
    got = task.report({"loss_sum": terms.loss_sum, "weight": terms.weight, **terms.sums})
    assert set(got) == set(want)
    for key, value in want.items():
      assert got[key] == pytest.approx(float(value), rel=2e-5, abs=2e-6), (nll_tokens, key)
  grads = jax.jit(jax.grad(lambda p: task.loss(model, {"params": p}, batch, rng=None,
                                               train=False).loss_sum))(variables["params"])
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_orpo_trains_with_no_reference(tmp_path):
  """An orpo run holds no reference (no teacher field, no store) and reports dpo's metrics and
  ORPO's; the experiment's `:orpo` variant resolves; bad options are one line. Also what the
  preference tasks share: throughput counts both rows of a pair (and dpo's reference forward in
  the FLOPs), and each evaluation's completions are appended to completions.txt."""
  exp = dpo_experiment(tmp_path, name="orpo", completions=2)
  s = setup.prepare(exp, devices=jax.devices()[:1])
  train, evaluate = setup.compile_steps(s)
  with jax.set_mesh(s.mesh):
    state = loop.fresh_state(s)
    assert state.teacher is None
    batch = sharding.global_batch(s.task.eval_batches(s.data.train, 8, 1)[0], s.mesh)
    state, metrics = train(state, batch)
    sums = jax.device_get(evaluate(state, batch))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
  report = s.task.report(sums)
  assert {"loss", "reward_accuracy", "reward_margin", "logp_chosen", "preference_accuracy",
          "nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(report)
  assert report["pairs"] == 8 and report["loss"] > report["nll_loss"]
  two_rows = flops.lm_forward(exp.model, 16).scaled(2)
  assert s.task.tokens_per_example() == 2 * 16
  assert s.task.train_flops_per_example() == pytest.approx(3 * two_rows.total)
  for reference, forwards in (("copy", 4), ("precomputed", 3)):  # the reference: forward only
    dpo = DPO(dpo_experiment(tmp_path, reference=reference), {})
    assert dpo.train_flops_per_example() == pytest.approx(forwards * two_rows.total)
  shared = DPO(dpo_experiment(tmp_path, share_prompt=True), {})  # one row of 2 x seq_len
  assert shared.tokens_per_example() == 2 * 16
  assert shared.forward_flops_per_example().total == flops.lm_forward(exp.model, 32).total
  found = s.task.decoded_report(s.model, lambda: jax.device_get(
      finetune.merge(state.params, state.frozen)), s.data, "val")
  assert found["completed"] == 2
  assert s.task.write_decoded(str(tmp_path), 1) == [str(tmp_path / "completions.txt")]
  text = (tmp_path / "completions.txt").read_text()
  assert text.startswith("##### step 1\n") and text.count("=== reference\n") == 2
  root = pathlib.Path(__file__).parents[1]
  variant = config_lib.experiment_module("experiments/instruct/gettext_dpo.py",
                                         str(root / "setup")).get_config("orpo")
  assert config_lib.resolve(variant).task.name == "orpo"
  for key, value, message in (("nll_tokens", "prompt", "allowed: sequence, completion"),
                              ("beta", -1.0, "must be > 0")):
    with pytest.raises(ConfigError, match=f"config.task.{key}.*{message}") as e:
      dpo_experiment(tmp_path, name="orpo", **{key: value})
    assert "\n" not in str(e.value)
