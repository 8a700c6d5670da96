"""The Fréchet distance between two sets of features, each summarised by a Gaussian.

d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Dowson & Landau 1982; the FID of
Heusel et al. 2017 is this on Inception-v3 pool features; llmjax computes it on the features of
a classifier it trained itself, which is *not* Inception FID and not comparable with published
FIDs). Host numpy in float64: it runs once per evaluation on a few thousand feature vectors.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [F], covariance [F, F]) of N feature vectors, the covariance unbiased (N - 1)."""
  x_NF = np.asarray(features_NF, np.float64)
  if x_NF.ndim != 2 or x_NF.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, F], got shape {list(x_NF.shape)}")
  return x_NF.mean(axis=0), np.cov(x_NF, rowvar=False).reshape(x_NF.shape[1], x_NF.shape[1])


def _psd_sqrt(s_FF: np.ndarray) -> np.ndarray:
  """The symmetric square root of a covariance (negative rounding noise clipped to 0)."""
  values, vectors = np.linalg.eigh((s_FF + s_FF.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1_F: np.ndarray, s1_FF: np.ndarray, mu2_F: np.ndarray,
                     s2_FF: np.ndarray) -> float:
  """The squared Fréchet distance between N(mu1, s1) and N(mu2, s2)."""
  # Tr((S1 S2)^(1/2)) = Tr((R S2 R)^(1/2)) with R = S1^(1/2): R S2 R is symmetric PSD, so its
  # eigenvalues are real and >= 0 (scipy's sqrtm of the non-symmetric S1 S2 can turn complex).
  root_FF = _psd_sqrt(np.asarray(s1_FF, np.float64))
  inner_FF = root_FF @ np.asarray(s2_FF, np.float64) @ root_FF
  trace_sqrt = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner_FF + inner_FF.T) / 2),
                                            0.0, None))))
  diff_F = np.asarray(mu1_F, np.float64) - np.asarray(mu2_F, np.float64)
  return float(diff_F @ diff_F + np.trace(s1_FF) + np.trace(s2_FF) - 2.0 * trace_sqrt)


def frechet_distance_of(features_a_NF: np.ndarray, features_b_MF: np.ndarray) -> float:
  """The Fréchet distance between the Gaussians fitted to two feature sets."""
  return frechet_distance(*gaussian_stats(features_a_NF), *gaussian_stats(features_b_MF))
