"""Nested parameter dicts as flat `a/b/c` paths and back, and jax key paths as `a/b/c`.

`items` walks mappings only, so any leaf passes through whole: arrays, ShapeDtypeStructs, flax's
boxed `Partitioned` values, shardings.
"""

from __future__ import annotations

from collections.abc import Mapping


def items(tree, prefix: str = ""):
  """(path, leaf) pairs of a nested mapping, depth first."""
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      yield from items(value, path + "/")
    else:
      yield path, value


def nest(flat: dict) -> dict:
  out: dict = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = out
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = leaf
  return out


def path_str(path) -> str:
  """'layer_0/attn/q/kernel' from a jax key path (boxing attributes such as `.value` dropped)."""
  names = []
  for key in path:
    name = getattr(key, "key", None) or getattr(key, "name", None)
    if name is None and hasattr(key, "idx"):
      name = str(key.idx)
    if name is not None and name != "value":
      names.append(str(name))
  return "/".join(names)
