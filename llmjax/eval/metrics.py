"""Classification metrics: jit-safe integer sums on device, sklearn-convention reports on host.

Shape letters: B batch rows, C classes.

The device functions return plain integer sums (never ratios), so the sums of several batches
or shards equal the sum over their concatenation exactly; ratios are formed once, on the host,
by `classification_report` after all batches have been added up.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["confusion_matrix", "topk_correct", "classification_report", "accuracy"]


def _row_weights(mask_B: jax.Array | None, batch: int) -> jax.Array:
  """Per-row int32 weight: 1 for real rows, 0 for masked-out (padding) rows."""
  if mask_B is None:
    return jnp.ones((batch,), jnp.int32)
  mask_B = jnp.asarray(mask_B)
  if mask_B.shape != (batch,):
    raise ValueError(f"mask_B has shape {mask_B.shape}, expected ({batch},)")
  # `!= 0` accepts bool and 0/1 masks of any dtype alike.
  return (mask_B != 0).astype(jnp.int32)


def confusion_matrix(predictions_B: jax.Array, labels_B: jax.Array, num_classes: int,
                     mask_B: jax.Array | None = None) -> jax.Array:
  """[C, C] int32 counts, rows true labels and columns predictions (sklearn's layout)."""
  predictions_B = jnp.asarray(predictions_B)
  labels_B = jnp.asarray(labels_B)
  if predictions_B.ndim != 1 or predictions_B.shape != labels_B.shape:
    raise ValueError(f"predictions_B {predictions_B.shape} and labels_B {labels_B.shape} must "
                     "be equal 1-D shapes")
  weight_B = _row_weights(mask_B, labels_B.shape[0])
  # A one-hot contraction over B rather than a scatter: under a batch-sharded input XLA lowers
  # it to per-shard partial matmuls plus one all-reduce, and int32 keeps the sum exact.
  # Out-of-range ids (e.g. -1) one-hot to zeros, so such rows are dropped, not mis-counted.
  true_BC = jax.nn.one_hot(labels_B, num_classes, dtype=jnp.int32) * weight_B[:, None]
  pred_BC = jax.nn.one_hot(predictions_B, num_classes, dtype=jnp.int32)
  return jnp.einsum("bt,bp->tp", true_BC, pred_BC, preferred_element_type=jnp.int32)


def topk_correct(logits_BC: jax.Array, labels_B: jax.Array, k: int,
                 mask_B: jax.Array | None = None) -> jax.Array:
  """Scalar int32: rows whose label's logit is >= the k-th largest logit of the row.

  Ties count in the label's favour: a label tied with the k-th largest logit is correct.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  logits_BC = jnp.asarray(logits_BC)
  labels_B = jnp.asarray(labels_B)
  if logits_BC.ndim != 2 or labels_B.shape != logits_BC.shape[:1]:
    raise ValueError(f"logits_BC {logits_BC.shape} and labels_B {labels_B.shape} must be "
                     "[B, C] and [B]")
  weight_B = _row_weights(mask_B, labels_B.shape[0])
  num_classes = logits_BC.shape[1]
  # Out-of-range labels never count as correct, matching their exclusion in confusion_matrix.
  in_range_B = (labels_B >= 0) & (labels_B < num_classes)
  label_logit_B = jnp.take_along_axis(logits_BC, labels_B[:, None], axis=1, mode="clip")[:, 0]
  # "label >= k-th largest" is the same as "fewer than k logits strictly above the label";
  # counting avoids a sort and stays row-local, so batch sharding needs no communication.
  above_B = jnp.sum(logits_BC > label_logit_B[:, None], axis=1)
  correct_B = ((above_B < k) & in_range_B).astype(jnp.int32)
  return jnp.sum(correct_B * weight_B, dtype=jnp.int32)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator with 0 where the denominator is 0 (sklearn's zero_division=0)."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  out = np.zeros(np.broadcast(numerator, denominator).shape, np.float64)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _as_confusion(confusion_CC: Any) -> np.ndarray:
  """Host int64 copy of a square confusion matrix, validated."""
  confusion_CC = np.asarray(jax.device_get(confusion_CC))
  if confusion_CC.ndim != 2 or confusion_CC.shape[0] != confusion_CC.shape[1]:
    raise ValueError(f"confusion_CC must be square 2-D, got shape {confusion_CC.shape}")
  return confusion_CC.astype(np.int64)


def accuracy(confusion_CC: Any) -> float:
  """Fraction of rows on the diagonal; 0.0 for an empty matrix."""
  confusion_CC = _as_confusion(confusion_CC)
  return float(_safe_divide(np.trace(confusion_CC), confusion_CC.sum()))


def classification_report(confusion_CC: Any, names: Sequence[str] | None = None) -> dict:
  """Accuracy and per-class/macro/micro/weighted precision, recall, F1 as JSON-ready Python."""
  confusion_CC = _as_confusion(confusion_CC)
  num_classes = confusion_CC.shape[0]
  if names is not None and len(names) != num_classes:
    raise ValueError(f"names has {len(names)} entries for {num_classes} classes")
  true_pos_C = np.diag(confusion_CC)
  predicted_C = confusion_CC.sum(axis=0)
  support_C = confusion_CC.sum(axis=1)
  total = int(support_C.sum())

  precision_C = _safe_divide(true_pos_C, predicted_C)
  recall_C = _safe_divide(true_pos_C, support_C)
  # sklearn's form 2TP / (2TP + FP + FN): no 0/0 from a zero precision or recall.
  f1_C = _safe_divide(2 * true_pos_C, predicted_C + support_C)

  # Every row lies inside the C x C matrix, so micro totals reduce to accuracy (single-label).
  micro = float(_safe_divide(true_pos_C.sum(), total))
  weights_C = _safe_divide(support_C, total)
  report = {
      "accuracy": micro,
      "precision_macro": float(precision_C.mean()) if num_classes else 0.0,
      "recall_macro": float(recall_C.mean()) if num_classes else 0.0,
      "f1_macro": float(f1_C.mean()) if num_classes else 0.0,
      "precision_micro": micro,
      "recall_micro": micro,
      "f1_micro": micro,
      "precision_weighted": float(np.sum(precision_C * weights_C)),
      "recall_weighted": float(np.sum(recall_C * weights_C)),
      "f1_weighted": float(np.sum(f1_C * weights_C)),
      "support": total,
  }
  report["per_class"] = [
      {"name": str((names[i] if names is not None else None) or i),
       "precision": float(precision_C[i]), "recall": float(recall_C[i]),
       "f1": float(f1_C[i]), "support": int(support_C[i])}
      for i in range(num_classes)
  ]
  return report
