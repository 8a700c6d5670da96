"""Shared by PEFT export and import: file names, AdapterError, and where a LoRA kernel's entries
land in its HF weight (traced from the architecture's own tensor table; see llmjax/hf/peft.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import linen as nn

from llmjax.errors import UserError
from llmjax.hf import api, mapping
from llmjax.hf.mapping import Tensor
from llmjax.models.peft import Peft

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


class AdapterError(UserError):
  """A PEFT adapter directory that does not fit the model it is loaded into (or cannot be read)."""


# --- layouts: where a kernel's entries land in its HF weight -------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  conv1d: bool  # HF weight is [in, out] (GPT-2 Conv1D) rather than torch Linear's [out, in]
  in_index: np.ndarray  # HF input index -> flat llmjax input index (C order over the in dims)
  out_part: np.ndarray  # HF output index -> which of the Tensor's paths it belongs to
  out_index: np.ndarray  # HF output index -> flat output index within that part


_LAYOUTS: dict = {}


def _layout(t: Tensor, shapes: tuple[tuple[int, ...], ...]) -> Layout:
  """Trace t.to_hf on kernel indices (once per transform and shape: layers share one)."""
  cache_key = (t.to_hf.__code__, t.hf_shape, shapes)
  if cache_key not in _LAYOUTS:
    _LAYOUTS[cache_key] = _trace(t, shapes)
  return _LAYOUTS[cache_key]


def _trace(t: Tensor, shapes) -> Layout:
  if len(t.hf_shape) != 2 or len(set(shapes)) != 1:
    raise AssertionError(f"{t.hf_key}: LoRA needs a 2-d HF weight over equal parts")
  shape, size = shapes[0], math.prod(shapes[0])
  dtype = np.int32 if len(shapes) * size < 2 ** 31 else np.int64
  traced = np.asarray(t.to_hf(*[np.arange(k * size, (k + 1) * size, dtype=dtype).reshape(shape)
                                for k in range(len(shapes))]))
  # Each kernel dim varies along one HF axis (read off the first row and column, verified for
  # every entry below); the input dims lead the kernel, so dim 0's axis is the input axis.
  first = {axis: np.unravel_index(line % size, shape)
           for axis, line in ((1, traced[0]), (0, traced[:, 0]))}
  along = [1 if np.ptp(first[1][j]) else 0 if np.ptp(first[0][j]) else None
           for j in range(len(shape))]
  in_axis = next(a for a in along if a is not None)
  split = next((j for j, a in enumerate(along) if a == 1 - in_axis), len(shape))
  if any(a == in_axis for a in along[split:]):
    raise AssertionError(f"{t.hf_key}: kernel dims {shape} are not [*in, *out] in the HF weight")
  out_size = math.prod(shape[split:])
  ins, outs = (traced[:, 0], traced[0]) if in_axis == 0 else (traced[0], traced[:, 0])
  layout = Layout(conv1d=in_axis == 0, in_index=(ins % size) // out_size,
                   out_part=outs // size, out_index=outs % size % out_size)
  hf_in = layout.in_index * out_size
  hf_out = layout.out_part * size + layout.out_index
  expected = hf_in[:, None] + hf_out[None] if in_axis == 0 else hf_out[:, None] + hf_in[None]
  if not (expected == traced).all():
    raise AssertionError(f"{t.hf_key}: its transform mixes input and output axes")
  return layout


@dataclasses.dataclass(frozen=True)
class Site:
  """One HF module carrying LoRA: its Tensor, llmjax module paths (unscanned), which have LoRA."""
  module: str
  tensor: Tensor
  parts: tuple[str, ...]
  lora: tuple[bool, ...]
  layout: Layout


def unscanned(flat: dict, path: str, scanned: bool):
  dest, layer = mapping.target(path, scanned)
  if dest not in flat:
    return None
  return flat[dest] if layer is None else flat[dest][layer]


def lora_sites(tensors: list[Tensor], flat: dict, scanned: bool, every: bool = False) -> list[Site]:
  """The HF modules with LoRA on some part (`every`: all projections, as if each had LoRA);
  `flat` holds arrays or ShapeDtypeStructs."""
  out = []
  for t in tensors:
    if not all(p.endswith("/kernel") for p in t.paths):
      continue
    parts = tuple(p[:-len("/kernel")] for p in t.paths)
    lora = tuple(every or mapping.target(p + "/lora/a", scanned)[0] in flat for p in parts)
    if any(lora):
      shapes = []
      for p in t.paths:
        dest, layer = mapping.target(p, scanned)
        shapes.append(tuple(flat[dest].shape)[0 if layer is None else 1:])
      out.append(Site(t.hf_key[:-len(".weight")], t, parts, lora, _layout(t, tuple(shapes))))
  return out



def arch_tables(model: nn.Module):
  base = model.clone(peft=Peft())
  arch = api.arch_of(base)  # UnsupportedModelError names why, for models HF cannot express
  return arch, base, arch.tensors(base)
