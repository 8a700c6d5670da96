"""Device mesh with axes (data, fsdp, tensor) built from MeshConfig."""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh

from llmjax.config import MeshConfig
from llmjax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """Resolve a -1 entry to fill the devices; raise if the product is not the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
      raise ConfigError(f"config.mesh sizes {dict(zip(AXES, sizes))} cannot fill {n_devices} "
                        f"devices: {known} does not divide {n_devices}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ConfigError(f"config.mesh data*fsdp*tensor = {math.prod(sizes)} "
                      f"({dict(zip(AXES, sizes))}) but there are {n_devices} devices; "
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
