"""Logical->mesh rules presets, and state shardings from logical annotations (abstractly)."""

from __future__ import annotations

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.parallel import axes
from llmjax.parallel.mesh import BATCH_AXES, batch_parallelism

# Activations: the batch is always split over data and fsdp; tensor parallelism adds heads/MLP.
# Context parallelism (mesh.context > 1) splits the sequence of every activation but attention's
# keys and values, which each shard gathers whole (a no-op on a mesh whose context axis is 1).
_ACTIVATIONS = ((axes.BATCH, BATCH_AXES), (axes.LENGTH, "context"), (axes.KV_LENGTH, None),
                (axes.ACT_EMBED, None))
_TENSOR = ((axes.VOCAB, "tensor"), (axes.MLP, "tensor"), (axes.HEADS, "tensor"),
           (axes.KV_HEADS, "tensor"), (axes.ACT_MLP, "tensor"), (axes.ACT_HEADS, "tensor"),
           (axes.ACT_KV_HEADS, "tensor"), (axes.ACT_VOCAB, "tensor"))
_FSDP = ((axes.EMBED, "fsdp"),)
# Mixture of experts: without expert parallelism every device holds every expert and the tokens
# in expert slots split over the batch axes like any activation; with it (the *_ep presets) the
# expert dim of the kernels and of the slotted tokens splits over `expert`, and the batch of the
# slotted tokens over the remaining batch axes: moving tokens there is an all-to-all.
_NO_EP = ((axes.EXPERT, None), (axes.ACT_EXPERT, None), (axes.EXPERT_BATCH, BATCH_AXES))
_EP = ((axes.EXPERT, "expert"), (axes.ACT_EXPERT, "expert"),
       (axes.EXPERT_BATCH, tuple(a for a in BATCH_AXES if a != "expert")))
# Image-model parameters stay replicated under every preset. jit rejects a dimension that does
# not divide its mesh axis, and static rules cannot shard only the kernels whose channels divide
# the fsdp size; a ResNet-152 (60M parameters) fits every device anyway. Under fsdp the batch
# still splits over data x fsdp, so fsdp acts as data parallelism for these models.
_IMAGE = tuple((name, None) for name in (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.CONV_OUT,
                                         axes.FEATURES, axes.HIDDEN, axes.CLASSES))
# Recurrent weights stay replicated too: every time step reads all of them, so sharding them
# would gather them again at each of the L steps (the embedding still shards under fsdp).
_IMAGE += tuple((name, None) for name in (axes.RNN_IN, axes.RNN_STATE, axes.RNN_HIDDEN,
                                          axes.RNN_OUT))

RULES = {
    "dp": _ACTIVATIONS + _IMAGE + _NO_EP,
    "fsdp": _ACTIVATIONS + _FSDP + _IMAGE + _NO_EP,
    "tp": _ACTIVATIONS + _TENSOR + _IMAGE + _NO_EP,
    "fsdp_tp": _ACTIVATIONS + _FSDP + _TENSOR + _IMAGE + _NO_EP,
    "ep": _ACTIVATIONS + _IMAGE + _EP,
    "fsdp_ep": _ACTIVATIONS + _FSDP + _IMAGE + _EP,
    "fsdp_tp_ep": _ACTIVATIONS + _FSDP + _TENSOR + _IMAGE + _EP,
}


def rules_for(name: str):
  if name not in RULES:
    raise ConfigError(f"config.mesh.rules={name!r} is not one of {', '.join(RULES)}")
  return RULES[name]


def check_divisible(model: ModelConfig, mesh: Mesh, rules_name: str) -> None:
  """Every sharded dimension must split evenly over its mesh axis; name the one that does not."""
  sizes = {axes.EMBED: model.d_model, axes.MLP: model.d_ff, axes.HEADS: model.n_heads,
           axes.KV_HEADS: model.kv_heads, axes.VOCAB: model.vocab_size,
           axes.EXPERT: model.n_experts}
  for logical, mesh_axis in rules_for(rules_name):
    if logical in sizes and mesh_axis and sizes[logical] % mesh.shape[mesh_axis]:
      raise ConfigError(f"model dimension {logical}={sizes[logical]} is not divisible by mesh "
                        f"axis {mesh_axis}={mesh.shape[mesh_axis]} (config.mesh.rules="
                        f"{rules_name!r})")


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules) -> object:
  """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned boxes)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  # A box around an empty subtree (optax's MaskedNode, where multi_transform leaves a parameter
  # group out of another group's state) gets a sharding but unboxes to no arrays: keep the empty
  # subtree, so the shardings have the structure of the unboxed tree they describe.
  return jax.tree.map(lambda s, a: a if s is not None and not jax.tree.leaves(a) else s,
                      shardings, nn.unbox(abstract_boxed_tree),
                      is_leaf=lambda x: x is None or isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch this process's devices hold (all of them on one process).

  With the batch split over (data, fsdp) they are a contiguous block; a mesh axis that replicates
  the batch across processes (tensor parallelism over hosts) makes the block larger, never split.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  starts = [index[0].start or 0 for index in indices.values()]
  stops = [batch_size if index[0].stop is None else index[0].stop for index in indices.values()]
  rows = slice(min(starts), max(stops))
  covered = sum(stop - start for start, stop in {(a, b) for a, b in zip(starts, stops)})
  if covered != rows.stop - rows.start:
    raise ConfigError(f"this process's devices hold rows {sorted(set(zip(starts, stops)))} of "
                      "the batch, not one block; order the mesh so each process's devices are "
                      "adjacent along (data, fsdp)")
  return rows


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """Assemble this process's rows (`process_rows`) into global jax.Arrays split over the batch."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(host_batch, sharding)
  shards = batch_parallelism(mesh)
  held = process_rows(mesh, shards)  # this process's share of the batch, in shards
  def assemble(x):
    global_shape = (x.shape[0] * shards // (held.stop - held.start),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(assemble, host_batch)
