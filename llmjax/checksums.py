"""Per-array checksums of a state, equal for equal values on any mesh.

Two position-weighted sums mod 2**32 of the array's bit patterns, with odd weights, so any single
bit flip changes both. Both are sums of per-element terms, so they can be taken in parts and
added. In one process, an array of at most a MiB is copied to the host and summed by numpy, and
a larger one is summed shard by shard on each shard's own device, by one small program per shard
shape and dtype that holds no collective. (One program over the whole tree compiled about as long
as the train step for every new model; one program per whole leaf put a cross-device reduction
in each, and many of those in flight at once beside orbax's own work aborted or hung.) Across
processes the shards a process lacks live elsewhere, so one program over the whole tree sums
every leaf where it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.treepaths import path_str

_MASK = (1 << 32) - 1
# Up to this size an array is copied to the host and summed by numpy: compiling a program for its
# shard shape costs far more than the copy (a tiny model's state is all such arrays, and the
# suite saves hundreds of them); larger arrays are summed where they are.
HOST_BYTES = 1 << 20


def _as_uint32(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32, whatever its dtype (so checksums see every bit)."""
  width = jnp.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _terms(bits, index, xp=jnp):
  """[2] uint32: the two weighted sums of `bits` at flat positions `index` (both uint32), with
  `xp` = jax.numpy on a device or numpy on the host (both wrap mod 2**32)."""
  first = xp.sum(bits * (2 * index + 1), dtype=xp.uint32)
  second = xp.sum((bits ^ (index * xp.uint32(0x9E3779B9))) * xp.uint32(0x85EBCA6B),
                  dtype=xp.uint32)
  return xp.stack([first, second])


def _whole(x: jax.Array) -> jax.Array:
  bits = _as_uint32(x).ravel()
  return _terms(bits, jnp.arange(bits.size, dtype=jnp.uint32))


@jax.jit
def _shard_terms(x: jax.Array, starts: jax.Array, strides: jax.Array) -> jax.Array:
  """The terms of one shard whose first element sits at `starts` of an array with row-major
  `strides` (both uint32 vectors, arguments so one program serves every shard of this shape)."""
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):  # the flat global position, mod 2**32 like the whole-array arange
    position = starts[axis] + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    index = index + position * strides[axis]
  return _terms(_as_uint32(x), index)


_whole_tree = jax.jit(lambda leaves: [_whole(x) for x in leaves])


def _key_data(x: jax.Array) -> jax.Array:
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _strides(shape: tuple[int, ...]) -> np.ndarray:
  strides, step = [], 1
  for size in reversed(shape):
    strides.append(step & _MASK)
    step *= size
  return np.asarray(strides[::-1], np.uint32)


def _by_shard(x: jax.Array) -> list[jax.Array]:
  """The terms of each distinct shard of `x` (one replica of each), still on its device."""
  strides = _strides(x.shape)
  out = []
  for shard in x.addressable_shards:
    if shard.replica_id != 0:
      continue
    starts = np.asarray([(s.start or 0) for s in shard.index] if shard.index else [],
                        np.uint32)
    out.append(_shard_terms(shard.data, starts, strides))
  return out


def _on_host(x) -> np.ndarray:
  """The terms of a small array, computed by numpy (uint32 arithmetic wraps mod 2**32, as XLA's)."""
  x = np.asarray(x)
  width = x.dtype.itemsize
  bits = (x.astype(np.uint32) if x.dtype == np.bool_
          else x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).astype(np.uint32)).ravel()
  return _terms(bits, np.arange(bits.size, dtype=np.uint32), np)


def _added(parts: list[np.ndarray]) -> tuple[int, int]:
  total = np.sum(np.stack(parts).astype(np.uint64), axis=0) & _MASK
  return int(total[0]), int(total[1])


def checksums(tree, host_bytes: int = HOST_BYTES) -> dict[str, list]:
  """{array path: [sum1, sum2, shape, dtype]}; equal for equal values on any mesh. In one
  process, arrays of at most `host_bytes` (and arrays already on the host) are summed by numpy."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [_key_data(leaf) for _, leaf in flat]
  if jax.process_count() == 1:
    small = [not isinstance(x, jax.Array) or x.size * x.dtype.itemsize <= host_bytes
             for x in leaves]  # host arrays are summed where they are
    with jax.set_mesh(None):  # each program runs on one shard's device, whatever mesh is set
      parts = [None if s else _by_shard(x) for x, s in zip(leaves, small)]  # dispatched first
      host = jax.device_get([x if s else None for x, s in zip(leaves, small)])
      parts = [[_on_host(h)] if s else jax.device_get(p) for h, p, s in zip(host, parts, small)]
    sums = [_added(p) for p in parts]
  else:
    sums = [(int(s[0]), int(s[1])) for s in jax.device_get(_whole_tree(leaves))]
  return {path_str(path): [s[0], s[1], list(leaf.shape), str(leaf.dtype)]
          for (path, leaf), s in zip(flat, sums)}
