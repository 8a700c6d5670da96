"""Dropless expert parallelism by all-to-all: a `shard_map` over the mesh (models/moe.py's
dropless path when the rules split the experts over a mesh axis of size > 1).

Each device holds the tokens of its batch shard and E / n experts (n = the expert axis size):

  1. it routes its own T tokens, sorts its T * k picks by expert (stable argsort) and cuts them
     into n contiguous runs, run j holding the picks of device j's experts;
  2. one all-to-all sends run j to device j (and one the per-expert counts with it);
  3. each device re-sorts what it received by its local expert and runs one `ragged_dot` per
     projection on its E / n experts;
  4. a second all-to-all sends the results back, where they are unsorted and combined with the
     routing weights exactly as the single-device dropless path does.

Buffers. XLA:CPU has no `ragged_all_to_all` (jax 0.10.2: "HLO opcode ragged-all-to-all is not
supported"), so the exchange is a dense `all_to_all` of fixed slots: dropless means the worst
case fits, and a token sends at most min(k, E / n) picks to one device (its k picks name
distinct experts), so each of the n runs is a buffer of C = T * min(k, E / n) rows. The send and
the receive buffers are each [n, C, D]: n * min(k, E / n) / k times the T * k picks, i.e. n times
when E / n >= k. That is the price of exactness without a ragged exchange; rows past a run's
count are zeros, and a `ragged_dot` leaves rows past its groups at zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from llmjax.parallel import axes


def expert_axis(n_experts: int, batch: int) -> str | None:
  """The mesh axis the rules in effect split the experts over, when the all-to-all path applies
  (a mesh is set, that axis has > 1 devices, and the batch divides over the batch axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  name = nn.logical_to_mesh_axes((axes.EXPERT,))[0]
  if isinstance(name, tuple):  # one mesh axis or none: the presets never map it to several
    name = name[0] if len(name) == 1 else None
  if name is None or mesh.shape[name] == 1 or n_experts % mesh.shape[name]:
    return None
  if batch % math.prod(mesh.shape[a] for a in _names(_token_spec()[0])):
    return None  # GSPMD pads a batch that does not divide; shard_map cannot
  return name


def _names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _token_spec() -> P:
  """Tokens [B, L, ...] where they are: batch and length as the rules split them, the rest whole."""
  return P(*nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH)))


def dropless_all_to_all(grouped, tensors: dict, x_BLD, experts_BLK, weights_BLK,
                        n_experts: int, axis: str) -> jax.Array:
  """y [B, L, D]: each pick through its expert, the experts split over mesh axis `axis`.

  `grouped(tensors, x_ND, sizes_E)` runs rows sorted by expert through the experts whose
  stacked tensors (each with the expert dim first) it is given: here each device's E / n.
  """
  mesh = jax.sharding.get_abstract_mesh()
  n = mesh.shape[axis]
  token_spec = _token_spec()
  tensor_specs = jax.tree.map(lambda _: P(axis), tensors)

  def local(tensors, x_BLD, experts_BLK, weights_BLK):
    """One device: its tokens out to their experts' devices, its experts' rows back."""
    batch, length, d = x_BLD.shape
    k = experts_BLK.shape[-1]
    experts_TK = experts_BLK.reshape(-1, k)
    flat_N = experts_TK.reshape(-1)
    order_N = jnp.argsort(flat_N, stable=True)
    sizes_E = jnp.bincount(flat_N, length=n_experts).astype(jnp.int32)
    x_ND = x_BLD.reshape(-1, d)[order_N // k]
    y_ND = _exchange(grouped, tensors, x_ND, sizes_E, n, axis, slots=batch * length *
                     min(k, n_experts // n))
    y_TKD = jnp.zeros_like(y_ND).at[order_N].set(y_ND).reshape(-1, k, d)
    y_TD = jnp.einsum("TKD,TK->TD", y_TKD, weights_BLK.reshape(-1, k).astype(y_TKD.dtype))
    return y_TD.reshape(batch, length, d)

  return jax.shard_map(local, mesh=mesh, in_specs=(tensor_specs, token_spec, token_spec,
                                                   token_spec),
                       out_specs=token_spec)(tensors, x_BLD, experts_BLK, weights_BLK)


def _exchange(grouped, tensors, x_ND, sizes_E, n: int, axis: str, slots: int):
  """Rows sorted by (global) expert -> their outputs, computed on the experts' devices."""
  picks, d = x_ND.shape
  local_experts = sizes_E.shape[0] // n
  send_n = jnp.sum(sizes_E.reshape(n, local_experts), axis=1)
  start_n = jnp.cumsum(send_n) - send_n
  slot_C = jnp.arange(slots)
  valid_nC = slot_C[None, :] < send_n[:, None]
  row_nC = jnp.where(valid_nC, start_n[:, None] + slot_C[None, :], picks)  # picks: "none"
  send_nCD = jnp.where(valid_nC[..., None], x_ND[jnp.minimum(row_nC, picks - 1)], 0)
  recv_nCD = jax.lax.all_to_all(send_nCD, axis, 0, 0)  # recv[i]: device i's rows for my experts
  counts_nE = jax.lax.all_to_all(sizes_E.reshape(n, local_experts), axis, 0, 0)
  # Within run i the rows are sorted by local expert: row c belongs to the expert whose
  # cumulative count first exceeds c (local_experts: an empty slot, sorted last).
  ends_nE = jnp.cumsum(counts_nE, axis=1)
  expert_nC = jnp.sum(slot_C[None, :, None] >= ends_nE[:, None, :], axis=-1)
  order_M = jnp.argsort(expert_nC.reshape(-1), stable=True)
  out_MD = grouped(tensors, recv_nCD.reshape(-1, d)[order_M], jnp.sum(counts_nE, axis=0))
  back_nCD = jnp.zeros_like(out_MD).at[order_M].set(out_MD).reshape(n, slots, -1)
  mine_nCD = jax.lax.all_to_all(back_nCD, axis, 0, 0)  # mine[j]: my rows, from device j
  return jnp.zeros((picks, mine_nCD.shape[-1]), mine_nCD.dtype).at[row_nC].set(
      mine_nCD, mode="drop")
