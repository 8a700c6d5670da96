"""Logical->mesh rules presets, and state shardings from logical annotations (abstractly)."""

from __future__ import annotations

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.parallel import axes
from llmjax.parallel.mesh import BATCH_AXES

# Activations: the batch is always split over data and fsdp; tensor parallelism adds heads/MLP.
_ACTIVATIONS = ((axes.BATCH, BATCH_AXES), (axes.LENGTH, None), (axes.ACT_EMBED, None))
_TENSOR = ((axes.VOCAB, "tensor"), (axes.MLP, "tensor"), (axes.HEADS, "tensor"),
           (axes.KV_HEADS, "tensor"), (axes.ACT_MLP, "tensor"), (axes.ACT_HEADS, "tensor"),
           (axes.ACT_KV_HEADS, "tensor"), (axes.ACT_VOCAB, "tensor"))
_FSDP = ((axes.EMBED, "fsdp"),)

RULES = {
    "dp": _ACTIVATIONS,
    "fsdp": _ACTIVATIONS + _FSDP,
    "tp": _ACTIVATIONS + _TENSOR,
    "fsdp_tp": _ACTIVATIONS + _FSDP + _TENSOR,
}


def rules_for(name: str):
  if name not in RULES:
    raise ConfigError(f"config.mesh.rules={name!r} is not one of {', '.join(RULES)}")
  return RULES[name]


def check_divisible(model: ModelConfig, mesh: Mesh, rules_name: str) -> None:
  """Every sharded dimension must split evenly over its mesh axis; name the one that does not."""
  sizes = {axes.EMBED: model.d_model, axes.MLP: model.d_ff, axes.HEADS: model.n_heads,
           axes.KV_HEADS: model.kv_heads, axes.VOCAB: model.vocab_size}
  for logical, mesh_axis in rules_for(rules_name):
    if logical in sizes and mesh_axis and sizes[logical] % mesh.shape[mesh_axis]:
      raise ConfigError(f"model dimension {logical}={sizes[logical]} is not divisible by mesh "
                        f"axis {mesh_axis}={mesh.shape[mesh_axis]} (config.mesh.rules="
                        f"{rules_name!r})")


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned boxes)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """Assemble per-process host arrays into global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(host_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)
