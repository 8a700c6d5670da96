"""Early stopping: the pure decision on scripted metric sequences, a tiny run that stops early,
a preempted run whose resume keeps the counter and stops at the same step with the same losses,
and a metric the task does not report refused before anything is written.

The run is a masked-LM run with next-sentence prediction stopping on its `nsp_accuracy`: it is
also the NSP run whose export must load in transformers as BertForPreTraining (one tiny run
shared by both features; tests/test_nsp.py has the rest of NSP)."""

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np

import pytest

import llmjax.train
from _task_helpers import experiment
from llmjax import checkpoint
from llmjax.errors import ConfigError
from llmjax.train import early_stop, preemption, setup
from llmjax.train.early_stop import Tracker, update


def first_stop(values, **rule):
  """(the 1-based evaluation the run stops at or None, the tracker then) over `values`."""
  tracker = Tracker()
  for at, value in enumerate(values, start=1):
    tracker = update(tracker, value, at, **rule)
    if tracker.stopped:
      return at, tracker
  return None, tracker


def test_the_decision_stops_at_the_expected_evaluation_on_scripted_sequences():
  # min: 3.99 is not better than 4 by more than min_delta, so it is the second bad evaluation
  at, t = first_stop([5.0, 4.0, 4.05, 3.99, 1.0], patience=2, mode="min", min_delta=0.02)
  assert (at, t) == (4, Tracker(4.0, 2, 2, True))
  # without min_delta 3.99 improves and the counter starts again
  at, t = first_stop([5.0, 4.0, 4.05, 3.99, 4.5, 4.5], patience=2, mode="min", min_delta=0.0)
  assert (at, t.best, t.best_step) == (6, 3.99, 4)
  # max, with a NaN (never an improvement) in the middle; 0.31 resets the counter
  sequence = [0.1, 0.3, math.nan, 0.29, 0.31, 0.2, 0.2, 0.2]
  at, t = first_stop(sequence, patience=3, mode="max", min_delta=0.0)
  assert (at, t) == (8, Tracker(0.31, 5, 3, True))
  assert first_stop(sequence[:7], patience=3, mode="max", min_delta=0.0)[0] is None
  # a first value that is not finite sets no best
  at, t = first_stop([math.inf, math.nan], patience=2, mode="min", min_delta=0.0)
  assert (at, t) == (2, Tracker(None, None, 2, True))
  # patience 1: the first evaluation that does not improve stops
  assert first_stop([2.0, 2.0], patience=1, mode="min", min_delta=0.0)[0] == 2


def test_a_metric_is_a_key_of_the_val_record_or_task_slash_key_of_a_val_task_record():
  class TwoTasks:  # a config.tasks run's records (llmjax/tasks/multitask.py)
    def split_records(self, split, report):
      return {split: {"loss": report["loss"]},
              **{f"{split}/{head}": r for head, r in report["tasks"].items()}}
  report = {"loss": 1.5, "tasks": {"cls": {"loss": 0.5, "accuracy": 0.75}, "mt": {"bleu": 9.0}}}
  assert early_stop.lookup(TwoTasks(), report, "loss") == 1.5
  assert early_stop.lookup(TwoTasks(), report, "cls/accuracy") == 0.75
  assert early_stop.lookup(TwoTasks(), report, "mt/bleu") == 9.0
  assert early_stop.lookup(TwoTasks(), report, "accuracy") is None
  assert early_stop.lookup(TwoTasks(), report, "lm/loss") is None


def _nsp_exp(tmp_path):
  """Masked LM + NSP stopping on nsp_accuracy with a min_delta no accuracy moves by: evaluation 1
  is the best and the run stops at evaluation 4 (patience 3), whatever the values are."""
  exp = experiment("mlm", tmp_path, train=dict(
      steps=8, eval_every=1, log_every=1, checkpoint_every=100, keep_checkpoints=1, keep_best=1,
      async_checkpoint=False, eval_batches=1, early_stop_patience=3,
      early_stop_metric="nsp_accuracy", early_stop_mode="max", early_stop_min_delta=100.0))
  return dataclasses.replace(exp, task=dataclasses.replace(exp.task, pair_objective="nsp"))


def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _losses(records, split):
  return {r["step"]: r["loss"] for r in records if r["split"] == split}


def test_an_nsp_run_stops_early_resumes_with_its_counter_and_exports_as_bert_for_pretraining(
    tmp_path, monkeypatch, capsys):
  exp = _nsp_exp(tmp_path)
  whole = tmp_path / "whole"
  result = llmjax.train.run(exp, str(whole))
  assert result["step"] == 4
  assert result["early_stopped"]["best_step"] == 1
  assert result["early_stopped"]["bad_evals"] == 3 and result["early_stopped"]["stopped"]
  assert "early stopping at step 4" in capsys.readouterr().err
  assert 0.0 <= result["nsp_accuracy"] <= 1.0 and result["pairs"] > 0 and result["masked_tokens"]
  assert result["loss"] == pytest.approx(result["masked_lm_loss"] + result["nsp_loss"])
  assert "nsp accuracy" in result["headline"]
  records = _records(whole)
  assert all("nsp_accuracy" in r for r in records if r["split"] == "val")
  assert sorted(_losses(records, "train")) == [1, 2, 3, 4]
  assert [r["step"] for r in records if r["split"] == "val"] == [1, 2, 3, 4]  # no second at 4
  # the new best (step 1) was checkpointed and kept by keep_best beside the newest (the stop)
  assert checkpoint.saved_steps(str(whole / "checkpoints")) == [1, 4]

  # Preempted at step 2 (after its evaluation, which the saved counter includes), then resumed.
  parted = tmp_path / "parted"
  with monkeypatch.context() as m:
    m.setattr(preemption.Listener, "should_stop", lambda self, ckpt, step: step == 2)
    assert llmjax.train.run(exp, str(parted)) == {"step": 2, "preempted": True}
  resumed = llmjax.train.run(exp, str(parted))
  assert resumed["step"] == 4
  assert resumed["early_stopped"] == result["early_stopped"]
  assert _losses(_records(parted), "train") == _losses(records, "train")  # bitwise
  assert _losses(_records(parted), "val") == _losses(records, "val")

  # Running a stopped run again trains no further: it evaluates step 4 again and returns.
  capsys.readouterr()
  again = llmjax.train.run(exp, str(whole))
  assert again["step"] == 4 and again["loss"] == result["loss"]
  assert "stopped early at step 4" in capsys.readouterr().err
  assert _records(whole) == records  # nothing appended, nothing rewritten
  _export_matches_bert_for_pretraining(whole, tmp_path)


def test_a_metric_the_task_does_not_report_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"config.train.early_stop_metric='accuracy': the lm task "
                     r"does not report it; its validation metrics: loss, perplexity, tokens"):
    llmjax.train.run(experiment("lm", tmp_path, train=dict(
        early_stop_patience=2, early_stop_metric="accuracy")), str(workdir))
  assert not workdir.exists()
  # a classifier reports its scalar metrics (not the per-class table or the confusion matrix)
  (tmp_path / "cls").mkdir()
  s = setup.prepare(experiment("classify", tmp_path / "cls", train=dict(
      early_stop_patience=2, early_stop_metric="f1_macro", early_stop_mode="max")))
  names = early_stop.reported_metrics(s)
  assert {"loss", "accuracy", "f1_macro", "top5_accuracy"} <= set(names)
  assert "per_class" not in names and "confusion" not in names


def _export_matches_bert_for_pretraining(workdir, tmp_path):
  """The run's export loads in transformers as BertForPreTraining; both heads' logits to 1e-4."""
  torch = pytest.importorskip("torch")
  import transformers

  from llmjax.cli import export
  from llmjax.hf import convert
  export.export(str(workdir), str(tmp_path / "export"), None)
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "hf"))
  loaded = convert.load_export(str(tmp_path / "export"))
  hf_model = transformers.BertForPreTraining.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = np.random.default_rng(0).integers(5, 256, (2, 16))
  mask = np.ones_like(tokens)
  mask[1, 12:] = 0  # a padded row
  types = (np.arange(16) >= 7).astype(np.int64)[None].repeat(2, 0) * mask
  ours_lm, ours_pair = loaded.model.apply(
      {"params": loaded.params}, jnp.asarray(tokens), attention_mask_BL=jnp.asarray(mask),
      token_types_BL=jnp.asarray(types))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(types))
  real = mask.astype(bool)  # padded positions' outputs are read by nothing (see models.heads)
  np.testing.assert_allclose(np.asarray(ours_lm)[real], theirs.prediction_logits.numpy()[real],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours_pair), theirs.seq_relationship_logits.numpy(),
                             atol=1e-4)
