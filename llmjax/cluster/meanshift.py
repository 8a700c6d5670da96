"""Mean-shift clustering in JAX, with scikit-learn's semantics (`sklearn.cluster.MeanShift`).

Every seed (each point, or with `bin_seeding` each grid cell of side `bandwidth` that holds at
least `min_bin_freq` points) climbs to the mean of the points within `bandwidth` of it (the flat
kernel; or the Gaussian-weighted mean of all points) until it moves at most 1e-3 * bandwidth or
has taken `max_iter` steps. The converged means, most intense first (the points their last window
held, then their coordinates, both descending), each drop every later mean within `bandwidth`;
every point takes the label of its nearest center (-1 beyond `bandwidth` if not `cluster_all`).

Memory: seeds climb in blocks of `block` against every point, so the distances in flight are
[block, N], never [N, N]. Sharding: with `mesh`, the points are split over all of its devices;
each device sums its own points and one all-reduce per step adds the sums up (shard_map + psum).
Letters: N points, D features, S seeds, B a block of seeds or centers, K centers.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.errors import UserError

KERNELS = ("flat", "gaussian")
# The default block keeps a block's [B, N_local] float32 distances near 16 MiB.
_BLOCK_ELEMENTS = 1 << 22
_MIN_BLOCK, _MAX_BLOCK = 8, 1024
# Distances from differences up to this many features, by matmul beyond (squared_distances).
_DIFFERENCE_MAX_D = 32
# Steps a block of climbing seeds takes before the seeds still climbing are gathered again.
_ROUND_STEPS = 8


class ClusterError(UserError, ValueError):
  """Bad input to clustering (points, bandwidth, an option): a ValueError naming it, which the
  CLI turns into one line and exit code 2."""


# ---------------------------------------------------------------------------------------------
# Checks and seeds (host side).


def checked_points(points_ND, what: str = "points") -> np.ndarray:
  """points as a float [N, D] numpy array (float32 kept, else float64); bad ones raise."""
  x_ND = np.asarray(points_ND)
  if x_ND.dtype.kind not in "biuf":
    raise ClusterError(f"{what} must be numbers, got dtype {x_ND.dtype}")
  if x_ND.dtype != np.float32:
    x_ND = x_ND.astype(np.float64)
  if x_ND.ndim != 2:
    raise ClusterError(f"{what} must be a 2-D array [N points, D features], got shape "
                       f"{x_ND.shape}")
  if x_ND.shape[0] == 0 or x_ND.shape[1] == 0:
    raise ClusterError(f"{what} is empty (shape {x_ND.shape}): nothing to cluster")
  bad = ~np.isfinite(x_ND).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise ClusterError(f"{what} must be finite: {len(rows)} row(s) hold NaN or inf (first: row "
                       f"{rows[0]})")
  return x_ND


def checked_bandwidth(bandwidth) -> float:
  """bandwidth as a float; anything but a finite number > 0 raises."""
  try:
    value = float(bandwidth)
  except (TypeError, ValueError):
    raise ClusterError(f"bandwidth must be a finite number > 0, got {bandwidth!r}") from None
  if not math.isfinite(value) or value <= 0:
    raise ClusterError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
  return value


def _checked_int(name: str, value, least: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
    raise ClusterError(f"{name} must be an int >= {least}, got {value!r}")
  return int(value)


def bin_seeds(points_ND, bin_size: float, min_bin_freq: int = 1) -> np.ndarray:
  """Seeds on a grid of side `bin_size`: the cells holding >= min_bin_freq points
  (sklearn.cluster.get_bin_seeds); the points themselves when every point has a cell of its own."""
  x_ND = np.asarray(points_ND)
  cells_SD, counts_S = np.unique(np.round(x_ND / bin_size), axis=0, return_counts=True)
  seeds_SD = cells_SD[counts_S >= min_bin_freq].astype(np.float32)
  if len(seeds_SD) == len(x_ND):
    warnings.warn(f"binning with bin_size={bin_size:g} gave every point a cell of its own; the "
                  "points are the seeds", stacklevel=2)
    return x_ND
  return seeds_SD * bin_size


# ---------------------------------------------------------------------------------------------
# Placement and blocks.


@functools.lru_cache(maxsize=None)
def _one_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]), ("points",))


def _placed(x_ND: np.ndarray, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """(points, weights) padded to a multiple of the mesh's devices (padding weighs 0), split over
  all of its axes."""
  pad = -len(x_ND) % mesh.size
  x_ND = np.concatenate([x_ND, np.zeros((pad, x_ND.shape[1]), x_ND.dtype)]).astype(np.float32)
  w_N = np.concatenate([np.ones(len(x_ND) - pad), np.zeros(pad)]).astype(np.float32)
  split = NamedSharding(mesh, P(mesh.axis_names))
  return jax.device_put(x_ND, split), jax.device_put(w_N, split)


def _block_size(block: int | None, n_local: int, rows: int) -> int:
  """`block`, or the largest power of two whose [block, n_local] distances fit the budget."""
  if block is None:
    block = 2 ** int(math.log2(max(1, _BLOCK_ELEMENTS // max(1, n_local))))
    block = min(max(block, _MIN_BLOCK), _MAX_BLOCK)
  return max(1, min(block, rows))


def _blocks(rows_RD: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
  """rows as [R / block, block, D] (zero-padded) and which of them are real."""
  pad = -len(rows_RD) % block
  valid_R = np.concatenate([np.ones(len(rows_RD), bool), np.zeros(pad, bool)])
  rows_RD = np.concatenate([rows_RD, np.zeros((pad, rows_RD.shape[1]), rows_RD.dtype)])
  return (rows_RD.astype(np.float32).reshape(-1, block, rows_RD.shape[1]),
          valid_R.reshape(-1, block))


def squared_distances(a_AD: jax.Array, b_DB: jax.Array) -> jax.Array:
  """[A, B] squared Euclidean distances between the rows of a and the columns of b_DB.

  Up to _DIFFERENCE_MAX_D features: from differences, one feature at a time (exact as float32
  goes, and XLA:CPU fuses it into one pass; a [A, B, D] broadcast ran ~8x slower). Beyond, the
  matmul form |a|^2 + |b|^2 - 2ab, whose rounding grows with |a|^2 (the points are centered)."""
  if a_AD.shape[1] <= _DIFFERENCE_MAX_D:
    return sum(jnp.square(a_AD[:, d, None] - b_DB[d, None, :]) for d in range(a_AD.shape[1]))
  ab_AB = jnp.dot(a_AD, b_DB, precision=jax.lax.Precision.HIGHEST)
  d2_AB = jnp.sum(jnp.square(a_AD), axis=1)[:, None] + jnp.sum(jnp.square(b_DB), axis=0)[None, :]
  return jnp.maximum(d2_AB - 2.0 * ab_AB, 0.0)


# ---------------------------------------------------------------------------------------------
# The climb (jitted; one program per mesh, kernel and block, shapes aside).


def _window_sums(x_DN, xw_NE, mean_BD, bandwidth, kernel: str, axes):
  """(kernel mass [B], kernel-weighted sum of points [B, D]) around each mean, over all devices.

  xw_NE holds each point times its weight, then the weight (E = D + 1): one matmul gives both
  sums, and padding (weight 0) adds nothing."""
  d2_BN = squared_distances(mean_BD, x_DN)
  if kernel == "flat":
    k_BN = (d2_BN <= bandwidth * bandwidth).astype(jnp.float32)
  else:
    k_BN = jnp.exp(d2_BN * (-0.5 / (bandwidth * bandwidth)))
  sums_BE = jax.lax.psum(jnp.dot(k_BN, xw_NE, precision=jax.lax.Precision.HIGHEST), axes)
  return sums_BE[:, -1], sums_BE[:, :-1]


def _step(x_DN, xw_NE, seeds, bandwidth, max_iter, kernel: str, axes):
  """One mean-shift step of a block of seeds (mean [B, D], mass [B], steps [B], done [B]), each
  stopping on its own as sklearn's `_mean_shift_single_seed` does: after a move of at most
  1e-3 * bandwidth, after `max_iter` moves, or at an empty window (mass 0: no center)."""
  mean_BD, mass_B, steps_B, done_B = seeds
  new_mass_B, sum_BD = _window_sums(x_DN, xw_NE, mean_BD, bandwidth, kernel, axes)
  empty_B = new_mass_B <= 0
  new_BD = sum_BD / jnp.where(empty_B, 1.0, new_mass_B)[:, None]
  shift_B = jnp.sqrt(jnp.sum(jnp.square(new_BD - mean_BD), axis=-1))
  stop_B = empty_B | (shift_B <= 1e-3 * bandwidth) | (steps_B >= max_iter)
  active_B = ~done_B
  mean_BD = jnp.where((active_B & ~empty_B)[:, None], new_BD, mean_BD)
  mass_B = jnp.where(active_B, jnp.where(empty_B, 0.0, new_mass_B), mass_B)
  steps_B = jnp.where(active_B & ~stop_B, steps_B + 1, steps_B)
  return mean_BD, mass_B, steps_B, done_B | stop_B


def _climb_all(x_ND, w_N, seeds_SD, valid_S, bandwidth, max_iter, *, block: int, kernel: str,
               axes):
  """(means [S], mass [S]) of every seed. In rounds: the seeds still climbing are sorted to the
  front and only their blocks take up to `_ROUND_STEPS` steps, so a few seeds that need many
  steps (flat-kernel means can cycle until max_iter) cost their own blocks only."""
  xw_NE = jnp.concatenate([x_ND * w_N[:, None], w_N[:, None]], axis=1)
  step = functools.partial(_step, x_ND.T, xw_NE, bandwidth=bandwidth, max_iter=max_iter,
                           kernel=kernel, axes=axes)

  def block_steps(j, seeds):
    at = j * block
    mine = tuple(jax.lax.dynamic_slice_in_dim(a, at, block) for a in seeds)
    _, mine = jax.lax.while_loop(lambda c: (c[0] < _ROUND_STEPS) & ~jnp.all(c[1][3]),
                                 lambda c: (c[0] + 1, step(c[1])), (0, mine))
    return tuple(jax.lax.dynamic_update_slice_in_dim(a, b, at, 0) for a, b in zip(seeds, mine))

  def one_round(carry):
    seeds, index_S = carry
    order_S = jnp.argsort(seeds[3], stable=True)  # still climbing first
    seeds, index_S = tuple(a[order_S] for a in seeds), index_S[order_S]
    climbing = jnp.sum(~seeds[3])
    return jax.lax.fori_loop(0, (climbing + block - 1) // block, block_steps, seeds), index_S

  zeros_S = jnp.zeros(valid_S.shape, jnp.float32)
  start = ((seeds_SD, zeros_S, zeros_S.astype(jnp.int32), ~valid_S),
           jnp.arange(valid_S.shape[0]))
  (mean_SD, mass_S, _, _), index_S = jax.lax.while_loop(lambda c: ~jnp.all(c[0][3]), one_round,
                                                        start)
  back_S = jnp.argsort(index_S)
  return mean_SD[back_S], mass_S[back_S]


@functools.lru_cache(maxsize=None)
def _climb_fn(mesh: Mesh, kernel: str, block: int):
  axes = mesh.axis_names
  climb = functools.partial(_climb_all, block=block, kernel=kernel, axes=axes)
  return jax.jit(jax.shard_map(climb, mesh=mesh, in_specs=(P(axes), P(axes), P(), P(), P(), P()),
                               out_specs=(P(), P())))


def _climb(x_ND, w_N, seeds_SD: np.ndarray, bandwidth: float, kernel: str, max_iter: int,
           block: int | None, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """(means [S, D], mass [S]) of every seed; mass 0 where a seed's window held no point."""
  block = _block_size(block, x_ND.shape[0] // mesh.size, len(seeds_SD))
  seeds_nBD, valid_nB = _blocks(seeds_SD, block)
  means_SD, mass_S = _climb_fn(mesh, kernel, block)(
      x_ND, w_N, seeds_nBD.reshape(-1, seeds_SD.shape[1]), valid_nB.reshape(-1),
      np.float32(bandwidth), np.int32(max_iter))
  return np.asarray(means_SD)[:len(seeds_SD)], np.asarray(mass_S)[:len(seeds_SD)]


def unique_centers(means_SD: np.ndarray, mass_S: np.ndarray, bandwidth: float) -> np.ndarray:
  """The means of seeds that found points, most intense first (then by coordinates, descending,
  as sklearn sorts), each dropping every later mean within `bandwidth` of it."""
  found_S = mass_S > 0
  means_UD, inverse = np.unique(means_SD[found_S], axis=0, return_inverse=True)
  mass_U = np.zeros(len(means_UD))
  np.maximum.at(mass_U, inverse.reshape(-1), mass_S[found_S])
  order = np.lexsort(tuple(means_UD[:, ::-1].T) + (mass_U,))[::-1]
  sorted_UD = means_UD[order]
  exact_UD = sorted_UD.astype(np.float64)
  alive_U = np.ones(len(sorted_UD), bool)
  kept, i = [], 0
  while i < len(sorted_UD):
    kept.append(i)
    alive_U &= np.sum(np.square(exact_UD - exact_UD[i]), axis=1) > bandwidth * bandwidth
    later = np.flatnonzero(alive_U[i + 1:])
    if not len(later):
      break
    i += 1 + int(later[0])
  return sorted_UD[kept]


# ---------------------------------------------------------------------------------------------
# Labels: the nearest center, centers taken a block at a time.


@functools.lru_cache(maxsize=None)
def _label_fn(mesh: Mesh):
  axes = mesh.axis_names

  def per_device(x_ND, centers_nBD, valid_nB, radius2):
    block = centers_nBD.shape[1]

    def nearer(carry, blk):
      best_d2_N, best_N = carry
      centers_BD, valid_B, first = blk
      d2_NB = jnp.where(valid_B[None, :], squared_distances(x_ND, centers_BD.T), jnp.inf)
      d2_N, at_N = jnp.min(d2_NB, axis=1), jnp.argmin(d2_NB, axis=1).astype(jnp.int32)
      better_N = d2_N < best_d2_N  # ties keep the earlier (more intense) center
      return (jnp.where(better_N, d2_N, best_d2_N), jnp.where(better_N, first + at_N, best_N)), None

    firsts = jnp.arange(centers_nBD.shape[0], dtype=jnp.int32) * block
    start = jax.lax.pcast((jnp.full(x_ND.shape[:1], jnp.inf, jnp.float32),
                           jnp.zeros(x_ND.shape[:1], jnp.int32)), axes, to="varying")
    (d2_N, label_N), _ = jax.lax.scan(nearer, start, (centers_nBD, valid_nB, firsts))
    return jnp.where(d2_N <= radius2, label_N, -1)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(), P(), P()),
                               out_specs=P(axes)))


def _nearest(x_ND, n: int, centers_KD: np.ndarray, radius: float | None, block: int | None,
             mesh: Mesh) -> np.ndarray:
  """[n] index of each point's nearest center; -1 beyond `radius` (None: no limit)."""
  centers_nBD, valid_nB = _blocks(centers_KD, _block_size(block, x_ND.shape[0] // mesh.size,
                                                          len(centers_KD)))
  radius2 = np.float32(np.inf if radius is None else radius * radius)
  return np.asarray(_label_fn(mesh)(x_ND, centers_nBD, valid_nB, radius2))[:n]


# ---------------------------------------------------------------------------------------------
# The public functions.


def mean_shift(points_ND, bandwidth=None, *, kernel: str = "flat", bin_seeding: bool = False,
               min_bin_freq: int = 1, max_iter: int = 300, cluster_all: bool = True,
               block: int | None = None, mesh: Mesh | None = None):
  """(centers [K, D], labels [N] int32) as sklearn.cluster.MeanShift, or with a Gaussian kernel.

  bandwidth None: `estimate_bandwidth(points)` (quadratic in N; pass one for large sets).
  block: seeds (and centers) per block, default sized to the points; mesh: split the points over
  all of its devices (default: one device). Centers have the points' float dtype."""
  x_ND = checked_points(points_ND)
  if kernel not in KERNELS:
    raise ClusterError(f"kernel={kernel!r} is not a kernel; allowed: {', '.join(KERNELS)}")
  max_iter = _checked_int("max_iter", max_iter, 0)
  min_bin_freq = _checked_int("min_bin_freq", min_bin_freq, 1)
  block = None if block is None else _checked_int("block", block, 1)
  if bandwidth is None:
    bandwidth = estimate_bandwidth(x_ND, block=block)
    if bandwidth <= 0:
      raise ClusterError("bandwidth=None: estimate_bandwidth gave 0 (most points coincide); "
                         "pass a bandwidth > 0")
  bandwidth = checked_bandwidth(bandwidth)
  seeds_SD = bin_seeds(x_ND, bandwidth, min_bin_freq) if bin_seeding else x_ND
  if not len(seeds_SD):
    raise ClusterError(f"min_bin_freq={min_bin_freq}: no cell of side bandwidth={bandwidth:g} "
                       "holds that many points, so there is no seed; lower it")
  mesh = _one_device_mesh() if mesh is None else mesh
  offset_D = x_ND.mean(axis=0, dtype=np.float64)  # float32 sums stay small around the origin
  x_placed, w_placed = _placed(x_ND - offset_D, mesh)
  means_SD, mass_S = _climb(x_placed, w_placed, seeds_SD - offset_D, bandwidth, kernel, max_iter,
                            block, mesh)
  centers_KD = unique_centers(means_SD, mass_S, bandwidth)
  if not len(centers_KD):
    raise ClusterError(f"bandwidth={bandwidth:g}: no point lies within it of any seed; raise it "
                       "or seed from the points (bin_seeding=False)")
  labels_N = _nearest(x_placed, len(x_ND), centers_KD, None if cluster_all else bandwidth, block,
                      mesh)
  return (centers_KD + offset_D).astype(x_ND.dtype), labels_N


def estimate_bandwidth(points_ND, quantile: float = 0.3, n_samples: int | None = None,
                       seed: int = 0, *, block: int | None = None) -> float:
  """sklearn.cluster.estimate_bandwidth: the mean over points of the distance to their
  int(N * quantile)-th nearest point (themselves included), on `n_samples` of them drawn as
  sklearn draws them (numpy RandomState(seed)). Quadratic in N: sample large sets."""
  x_ND = checked_points(points_ND)
  if isinstance(quantile, bool) or not isinstance(quantile, (int, float, np.floating)) \
      or not 0 <= quantile <= 1:
    raise ClusterError(f"quantile must be a number in [0, 1], got {quantile!r}")
  if n_samples is not None:
    n_samples = _checked_int("n_samples", n_samples, 1)
    x_ND = x_ND[np.random.RandomState(seed).permutation(len(x_ND))[:n_samples]]
  k = max(1, int(len(x_ND) * quantile))
  x_ND = (x_ND - x_ND.mean(axis=0, dtype=np.float64)).astype(np.float32)
  block = _block_size(None if block is None else _checked_int("block", block, 1), len(x_ND),
                      len(x_ND))
  queries_nBD, _ = _blocks(x_ND, block)
  kth_N = np.asarray(_kth_fn(k)(jnp.asarray(x_ND), queries_nBD)).reshape(-1)[:len(x_ND)]
  return float(np.sum(kth_N, dtype=np.float64) / len(x_ND))


@functools.lru_cache(maxsize=None)
def _kth_fn(k: int):
  """Each query's distance to its k-th nearest point, a block of queries at a time."""
  def kth(x_ND, queries_nBD):
    x_DN = x_ND.T

    def one(queries_BD):
      d2_BN = squared_distances(queries_BD, x_DN)
      return jnp.sqrt(-jax.lax.top_k(-d2_BN, k)[0][:, k - 1])
    return jax.lax.map(one, queries_nBD)
  return jax.jit(kth)


def purity(labels_N, classes_N) -> float:
  """The fraction of points whose cluster's most common class is their own (orphans, -1, count
  as wrong): 1.0 when every cluster holds one class."""
  labels_N, classes_N = np.asarray(labels_N), np.asarray(classes_N)
  if labels_N.shape != classes_N.shape or labels_N.ndim != 1 or not len(labels_N):
    raise ClusterError(f"labels {labels_N.shape} and classes {classes_N.shape} must be the same "
                       "non-empty [N]")
  _, classes_N = np.unique(classes_N, return_inverse=True)
  right = 0
  for label in np.unique(labels_N[labels_N >= 0]):
    right += np.bincount(classes_N[labels_N == label]).max()
  return right / len(labels_N)
