"""Device mesh with axes (dcn, data, fsdp, expert, context, tensor) built from MeshConfig.

`dcn` spans TPU slices (data-center network between them, ICI within one): the devices of one
slice share a dcn index, and the batch splits over it like data parallelism. It is 1 (a leading
axis of size one) unless config.mesh.dcn says otherwise.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh

from llmjax.config import MeshConfig
from llmjax.errors import ConfigError

AXES = ("dcn", "data", "fsdp", "expert", "context", "tensor")
ICI_AXES = AXES[1:]  # within one slice
# The batch is split over all of these: FSDP is data parallel too, so is every slice, and
# outside the experts' own matmuls so is expert parallelism (tokens reach the experts by an
# all-to-all, docs/moe.md).
BATCH_AXES = ("dcn", "data", "fsdp", "expert")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
  """(data, fsdp, expert, context, tensor) within one of config.mesh.dcn slices: a -1 entry fills the
  slice's devices; raise if the product is not their count."""
  if n_devices % cfg.dcn:
    raise ConfigError(f"config.mesh.dcn={cfg.dcn} does not divide the {n_devices} devices")
  n_devices //= cfg.dcn
  sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.context, cfg.tensor]
  # Named in messages only when used, so a dense run's messages read as they always have.
  shown = [a for a in ICI_AXES if a not in ("expert", "context") or getattr(cfg, a) != 1]
  def named(values):
    return {a: v for a, v in zip(ICI_AXES, values) if a in shown}
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
      raise ConfigError(f"config.mesh sizes {named(sizes)} cannot fill {n_devices} "
                        f"devices: {known} does not divide {n_devices}")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    where = f"devices per slice (config.mesh.dcn={cfg.dcn})" if cfg.dcn > 1 else "devices"
    raise ConfigError(f"config.mesh {'*'.join(shown)} = {math.prod(sizes)} "
                      f"({named(sizes)}) but there are {n_devices} {where}; "
                      "set one of them to -1 to fill")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  try:
    if cfg.dcn > 1:  # slices along dcn, each slice's devices laid out by its ICI topology
      grid = mesh_utils.create_hybrid_device_mesh((1, *shape), (cfg.dcn,) + (1,) * len(shape),
                                                 devices)
    else:
      grid = mesh_utils.create_device_mesh(shape, devices).reshape((1, *shape))
  except (ValueError, AssertionError, NotImplementedError, AttributeError):
    grid = np.asarray(devices).reshape((cfg.dcn, *shape))  # CPU and odd topologies: plain order
  return Mesh(grid, AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
