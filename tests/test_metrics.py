"""Metric sums match sklearn/numpy references, sharded == unsharded, no NaN on empty input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.eval import metrics

REPORT_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
               "recall_micro", "f1_micro", "precision_weighted", "recall_weighted",
               "f1_weighted", "per_class", "support"}


def _random_case(seed: int, num_classes: int, batch: int):
  """Labels and predictions where some classes are never predicted and some never labelled."""
  rng = np.random.default_rng(seed)
  # Class 0 is never labelled, the last class never predicted; both stay in labels=range(C).
  labels_B = rng.integers(1, num_classes, size=batch)
  predictions_B = rng.integers(0, num_classes - 1, size=batch)
  # Make some rows right so per-class scores are not all zero.
  right_B = rng.random(batch) < 0.4
  predictions_B = np.where(right_B & (labels_B < num_classes - 1), labels_B, predictions_B)
  return predictions_B.astype(np.int32), labels_B.astype(np.int32)


def _assert_matches_sklearn(report: dict, predictions_B, labels_B, num_classes: int):
  """Every report number equals sklearn's with labels=range(C), zero_division=0."""
  from sklearn import metrics as skm  # imported here: sklearn costs each pytest worker seconds
  labels = list(range(num_classes))
  assert set(report) == REPORT_KEYS
  assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels_B, predictions_B),
                                             abs=1e-6)
  for average in ("macro", "micro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels_B, predictions_B, labels=labels, average=average, zero_division=0)
    got = (report[f"precision_{average}"], report[f"recall_{average}"], report[f"f1_{average}"])
    np.testing.assert_allclose(got, (p, r, f), atol=1e-6, err_msg=average)
  p_C, r_C, f_C, s_C = skm.precision_recall_fscore_support(
      labels_B, predictions_B, labels=labels, average=None, zero_division=0)
  per_class = report["per_class"]
  assert len(per_class) == num_classes
  np.testing.assert_allclose([c["precision"] for c in per_class], p_C, atol=1e-6)
  np.testing.assert_allclose([c["recall"] for c in per_class], r_C, atol=1e-6)
  np.testing.assert_allclose([c["f1"] for c in per_class], f_C, atol=1e-6)
  assert [c["support"] for c in per_class] == s_C.tolist()
  assert report["support"] == len(labels_B)


@pytest.mark.parametrize("seed,num_classes,batch", [(0, 3, 50), (1, 5, 97), (2, 10, 300)])
def test_confusion_and_report_match_sklearn(seed, num_classes, batch):
  from sklearn import metrics as skm  # imported here: sklearn costs each pytest worker seconds
  predictions_B, labels_B = _random_case(seed, num_classes, batch)
  confusion_CC = jax.jit(metrics.confusion_matrix, static_argnums=2)(
      predictions_B, labels_B, num_classes)
  assert confusion_CC.shape == (num_classes, num_classes) and confusion_CC.dtype == jnp.int32
  np.testing.assert_array_equal(
      confusion_CC, skm.confusion_matrix(labels_B, predictions_B, labels=range(num_classes)))
  # The case really has an unpredicted and an unlabelled class, the zero-division paths.
  assert confusion_CC[:, -1].sum() == 0 and confusion_CC[0].sum() == 0
  report = metrics.classification_report(confusion_CC)
  _assert_matches_sklearn(report, predictions_B, labels_B, num_classes)
  assert metrics.accuracy(confusion_CC) == report["accuracy"]
  json.dumps(report)  # plain Python values only


def test_mask_excludes_rows():
  from sklearn import metrics as skm  # imported here: sklearn costs each pytest worker seconds
  num_classes = 6
  predictions_B, labels_B = _random_case(3, num_classes, 80)
  mask_B = np.random.default_rng(4).random(80) < 0.7
  keep = mask_B.nonzero()[0]
  want_CC = skm.confusion_matrix(labels_B[keep], predictions_B[keep], labels=range(num_classes))
  for mask in (mask_B, mask_B.astype(np.int32), mask_B.astype(np.float32)):
    np.testing.assert_array_equal(
        metrics.confusion_matrix(predictions_B, labels_B, num_classes, mask), want_CC)
  report = metrics.classification_report(want_CC, names=[f"c{i}" for i in range(num_classes)])
  _assert_matches_sklearn(report, predictions_B[keep], labels_B[keep], num_classes)
  assert [c["name"] for c in report["per_class"]] == [f"c{i}" for i in range(num_classes)]


def _topk_reference(logits_BC: np.ndarray, labels_B: np.ndarray, k: int) -> int:
  """Label among the k highest logits by argsort (no ties in continuous random logits)."""
  top_BK = np.argsort(-logits_BC, axis=1)[:, :k]
  return int((top_BK == labels_B[:, None]).any(axis=1).sum())


@pytest.mark.parametrize("k", [1, 3])
def test_topk_matches_argsort(k):
  rng = np.random.default_rng(k)
  logits_BC = rng.normal(size=(64, 7)).astype(np.float32)
  labels_B = rng.integers(0, 7, size=64).astype(np.int32)
  mask_B = rng.random(64) < 0.8
  got = jax.jit(metrics.topk_correct, static_argnums=2)(logits_BC, labels_B, k)
  assert got.shape == () and got.dtype == jnp.int32
  assert int(got) == _topk_reference(logits_BC, labels_B, k)
  masked = metrics.topk_correct(logits_BC, labels_B, k, mask_B)
  assert int(masked) == _topk_reference(logits_BC[mask_B], labels_B[mask_B], k)
  if k == 1:
    argmax_B = logits_BC.argmax(axis=1)
    assert int(got) == int((argmax_B == labels_B).sum())


def test_topk_ties_count_as_correct():
  logits_BC = np.array([[1.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [0.0, 5.0, 4.0, 4.0]],
                       np.float32)
  labels_B = np.array([2, 3, 3], np.int32)
  # Row 0: label tied for first; row 1: all tied; row 2: label tied with the 2nd largest.
  assert int(metrics.topk_correct(logits_BC, labels_B, 1)) == 2
  assert int(metrics.topk_correct(logits_BC, labels_B, 2)) == 3
  with pytest.raises(ValueError, match="k must be"):
    metrics.topk_correct(logits_BC, labels_B, 0)


def test_sharded_accumulation_equals_unsharded_reference():
  from sklearn import metrics as skm  # imported here: sklearn costs each pytest worker seconds
  num_classes, k, per_device = 5, 3, 4
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8
  batch = mesh.size * per_device
  rows = NamedSharding(mesh, P("data"))
  rows2d = NamedSharding(mesh, P("data", None))

  @jax.jit
  def sums(logits_BC, labels_B, mask_B):
    predictions_B = jnp.argmax(logits_BC, axis=1)
    return (metrics.confusion_matrix(predictions_B, labels_B, num_classes, mask_B),
            metrics.topk_correct(logits_BC, labels_B, k, mask_B))

  rng = np.random.default_rng(7)
  total_rows = 3 * batch + 11  # the last batch is uneven
  logits_NC = rng.normal(size=(total_rows, num_classes)).astype(np.float32)
  labels_N = rng.integers(0, num_classes, size=total_rows).astype(np.int32)
  confusion_CC = jnp.zeros((num_classes, num_classes), jnp.int32)
  correct = jnp.zeros((), jnp.int32)
  for start in range(0, total_rows, batch):
    logits_BC = logits_NC[start:start + batch]
    labels_B = labels_N[start:start + batch]
    real = len(labels_B)
    # Pad like a training loop, cycling real rows so padding would be counted if unmasked.
    cycle_B = np.arange(batch) % real
    logits_BC, labels_B = logits_BC[cycle_B], labels_B[cycle_B]
    mask_B = np.arange(batch) < real
    args = (jax.device_put(logits_BC, rows2d), jax.device_put(labels_B, rows),
            jax.device_put(mask_B, rows))
    assert len(args[1].sharding.device_set) == 8
    batch_cc, batch_correct = sums(*args)
    confusion_CC = confusion_CC + batch_cc
    correct = correct + batch_correct
  predictions_N = logits_NC.argmax(axis=1)
  np.testing.assert_array_equal(
      confusion_CC, skm.confusion_matrix(labels_N, predictions_N, labels=range(num_classes)))
  assert int(correct) == _topk_reference(logits_NC, labels_N, k)
  _assert_matches_sklearn(metrics.classification_report(confusion_CC), predictions_N, labels_N,
                          num_classes)


def test_empty_confusion_reports_zeros_not_nan():
  report = metrics.classification_report(np.zeros((4, 4), np.int32))
  assert set(report) == REPORT_KEYS
  flat = [v for key, v in report.items() if key != "per_class"]
  flat += [v for c in report["per_class"] for key, v in c.items() if key != "name"]
  assert all(v == 0 and not np.isnan(v) for v in flat)
  assert metrics.accuracy(jnp.zeros((4, 4), jnp.int32)) == 0.0
  assert json.dumps(report)
