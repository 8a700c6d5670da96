"""Device mesh with axes (data, fsdp, expert, tensor) built from MeshConfig."""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh

from llmjax.config import MeshConfig
from llmjax.errors import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")
# The batch is split over all three: FSDP is data parallel too, and outside the experts' own
# matmuls so is expert parallelism (tokens reach the experts by an all-to-all, docs/moe.md).
BATCH_AXES = ("data", "fsdp", "expert")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int, int]:
  """Resolve a -1 entry to fill the devices; raise if the product is not the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
  # Named in messages only when used, so a dense run's messages read as they always have.
  shown = [a for a in AXES if a != "expert" or cfg.expert != 1]
  def named(values):
    return {a: v for a, v in zip(AXES, values) if a in shown}
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
      raise ConfigError(f"config.mesh sizes {named(sizes)} cannot fill {n_devices} "
                        f"devices: {known} does not divide {n_devices}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"config.mesh {'*'.join(shown)} = {math.prod(sizes)} "
                      f"({named(sizes)}) but there are {n_devices} devices; "
                      "set one of them to -1 to fill")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)  # CPU and odd topologies: plain order
  return Mesh(grid, AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
