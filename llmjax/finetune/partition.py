"""Parameters apart and together: (trainable, frozen) subtrees of one nested dict, and back.

Paths are `a/b/c`; leaves are whatever the tree holds (arrays, ShapeDtypeStructs, flax's boxed
`Partitioned` values), so the same split serves init, shardings and restores.
"""

from __future__ import annotations

import jax
import numpy as np

from llmjax.treepaths import items, nest


def split(params, trainable: frozenset[str]) -> tuple[dict, dict]:
  """(trainable subtree, frozen subtree); `trainable=None` means everything trains."""
  if trainable is None:
    return params, {}
  flat = dict(items(params))
  return (nest({p: v for p, v in flat.items() if p in trainable}),
          nest({p: v for p, v in flat.items() if p not in trainable}))


def merge(trainable, frozen) -> dict:
  """One parameter tree from the two disjoint halves (a no-op when nothing is frozen)."""
  if not frozen:
    return trainable
  return nest({**dict(items(frozen)), **dict(items(trainable))})


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
  return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                 for leaf in jax.tree.leaves(tree)))
