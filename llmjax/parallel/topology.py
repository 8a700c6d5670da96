"""TPU topologies by name, and the chips' datasheet figures, for compiling without a TPU.

`devices("v5e-16")` gives libtpu's abstract (compile-only) devices of a slice through
`jax.experimental.topologies`; nothing is initialised as a backend, so a CPU run stays a CPU run.
Names: `v5e-16` (Cloud TPU's accelerator type: chips for v5e/v6e, TensorCores for v4/v5p,
whose two cores per chip form one megacore device) or `v5e:4x4` (chips along each ICI axis).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

from llmjax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's datasheet figures (per chip, i.e. per JAX device)."""
  name: str
  hbm_bytes: int
  bf16_flops: float  # dense bf16 FLOP/s
  hbm_bytes_per_s: float
  cores_in_type: int  # TensorCores an accelerator type's number counts per chip
  dims: int  # ICI torus dimensions of a slice (2: v5e/v6e, 3: v4/v5p)
  source: str


# Datasheets: the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p,
# v6e), per chip: HBM capacity, peak bf16 compute, HBM bandwidth.
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 2, 3, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1, 2, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 2, 3, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 1, 2, "https://cloud.google.com/tpu/docs/v6e"),
}

# Slice shapes of the accelerator types by chip count (Cloud TPU's documented slice shapes).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed topology: the chip, libtpu's name for the slice, and its chips."""
  name: str  # as the user wrote it
  chip: Chip
  topology_name: str  # libtpu's `v5e:4x4`
  chips: int


def known() -> list[str]:
  """Every accelerator-type name this module maps (`v5e-16`, ...)."""
  names = []
  for chip in CHIPS.values():
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    names += [f"{chip.name}-{n * chip.cores_in_type}" for n in shapes]
  return names


def _unknown(name: str, why: str) -> ConfigError:
  return ConfigError(f"--topology={name}: {why}; known: {', '.join(known())} (or CHIP:AxB[xC] "
                     f"with CHIP one of {', '.join(CHIPS)})")


def parse(name: str) -> Topology:
  """`v5e-16` or `v5e:4x4` -> Topology; a chip without a CHIPS entry or a shape that is not a
  slice is a ConfigError naming the known ones."""
  typed = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  shaped = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", name)
  if not typed and not shaped:
    raise _unknown(name, "not a TPU topology name")
  chip_name = (typed or shaped).group(1)
  if chip_name not in CHIPS:
    raise ConfigError(f"--topology={name}: no chip entry for {chip_name} (HBM, FLOP/s and "
                      f"bandwidth are known for {', '.join(CHIPS)})")
  chip = CHIPS[chip_name]
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  if typed:
    count = int(typed.group(2))
    if count % chip.cores_in_type or count // chip.cores_in_type not in shapes:
      raise _unknown(name, f"{chip_name} slices come in {', '.join(known_for(chip))}")
    chips = count // chip.cores_in_type
    return Topology(name, chip, f"{chip_name}:{shapes[chips]}", chips)
  dims = [int(d) for d in shaped.group(2).split("x")]
  if len(dims) != chip.dims or 0 in dims:
    raise _unknown(name, f"a {chip_name} slice has {chip.dims} positive ICI dimensions")
  return Topology(name, chip, name, math.prod(dims))


def known_for(chip: Chip) -> list[str]:
  return [n for n in known() if n.startswith(chip.name + "-")]


def devices(topology: Topology, num_slices: int = 1) -> list:
  """libtpu's abstract devices of `num_slices` copies of the slice (compile-only: no backend)."""
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be at least 1")
  # libtpu loads here, at the first topology asked for. Compiling needs no TPU: other processes that hold libtpu's lock file (a TPU job, another
  # compile) must not stop this one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  options = {"chip_config_name": "megacore"} if topology.chip.cores_in_type == 2 else {}
  try:
    found = topologies.get_topology_desc(platform="tpu", topology_name=topology.topology_name,
                                         num_slices=num_slices, **options)
  except RuntimeError as e:  # libtpu missing or refusing the shape
    raise ConfigError(f"--topology={topology.name}: libtpu cannot describe "
                      f"{topology.topology_name} ({' '.join(str(e).split())[:200]}); "
                      "install the tpu extra: pip install -e '.[tpu]'") from e
  return list(found.devices)


def slice_index(device) -> int:
  """The slice a device belongs to (0 on a single slice)."""
  return getattr(device, "slice_index", 0) or 0
