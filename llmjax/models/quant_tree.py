"""Whole parameter trees quantized and back: which kernels a quantized model stores quantized,
and a float tree turned into that model's tree (and a quantized tree into floats again).

Which kernels, and how many of their leading axes are inputs, is read from the quantized model
itself: its abstract init runs (shapes only) with every DenseGeneral and QuantConv call
intercepted, so every family, scanned layers (a leading `layers` axis, quantized layer by layer),
LoRA-hooked projections and image models' convolutions are covered without a table. Embeddings,
norms, biases, MoE experts and LoRA factors stay float.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax import treepaths
from llmjax.errors import UserError
from llmjax.models import quant as quantlib
from llmjax.models.layers import DenseGeneral
from llmjax.models.quant_conv import N_IN as CONV_IN, PACK_AXIS as CONV_PACK, QuantConv

PARTS = ("kernel", "kernel_scale", "kernel_zero")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One quantized projection: its module path, spec, input axes and whether it is scanned."""
  path: str
  spec: quantlib.QuantSpec
  n_in: int
  rank: int  # the float kernel's rank, a scanned stack's layer axis excluded
  pack_axis: int = 0  # 4 bits: the axis values pack two per byte along (a conv's: its outputs)


def layouts(abstract_init: Callable[[], dict]) -> dict[str, Layout]:
  """{module path: Layout} of every quantized DenseGeneral and QuantConv that `abstract_init` (the
  model's abstract init, e.g. hf.api.abstract_variables) creates. It must trace the model
  afresh: jax reuses the trace of a function object it has traced before, running no module."""
  found: dict[str, Layout] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, (DenseGeneral, QuantConv))
        and module.quant):
      path = "/".join(module.path)
      if isinstance(module, DenseGeneral):
        found[path] = Layout(path, quantlib.parse(module.quant), len(module.axis),
                             len(module.axis) + len(module.features))
      else:
        found[path] = Layout(path, quantlib.parse(module.quant), CONV_IN, CONV_IN + 1, CONV_PACK)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    abstract_init()
  if not found:
    raise UserError("no quantized dense kernel was traced: the model has none, or "
                    "`abstract_init` reused a cached trace")
  return found


def quantize_tree(params: dict, found: dict[str, Layout]) -> dict:
  """`params` (float) with each of `found`'s kernels replaced by its stored parts (one jit)."""
  flat = dict(treepaths.items(params))
  missing = [f"{p}/kernel" for p in found if f"{p}/kernel" not in flat]
  if missing:
    raise UserError(f"no float kernel to quantize at {missing[0]} (is the model already "
                    "quantized?)")
  kernels = {p: flat.pop(f"{p}/kernel") for p in found}
  for path, w in kernels.items():
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise UserError(f"{path}/kernel is {w.dtype}: already quantized; quantize a float model")

  def every(kernels):
    out = {}
    for path, w in kernels.items():
      layout = found[path]
      one = lambda k, layout=layout: quantlib.quantize(k, layout.n_in, layout.spec, layout.path,
                                                       layout.pack_axis)
      out[path] = (jax.vmap(one) if w.ndim == layout.rank + 1 else one)(w)
    return out

  for path, parts in jax.jit(every)(kernels).items():
    flat.update({f"{path}/{name}": v for name, v in parts.items()})
  return treepaths.nest(flat)


def dequantize_tree(params: dict, found: dict[str, Layout], dtype=jnp.float32) -> dict:
  """A quantized tree's float equivalent: every stored kernel back to `dtype` (one jit)."""
  flat = dict(treepaths.items(params))
  stored = {p: {n: flat.pop(f"{p}/{n}") for n in PARTS if f"{p}/{n}" in flat} for p in found}

  def every(stored):
    out = {}
    for path, parts in stored.items():
      layout = found[path]
      one = lambda p, layout=layout: quantlib.dequantize(p, layout.spec, dtype, layout.pack_axis)
      out[path] = (jax.vmap(one) if parts["kernel"].ndim == layout.rank + 1 else one)(parts)
    return out

  for path, w in jax.jit(every)(stored).items():
    flat[f"{path}/kernel"] = w
  return treepaths.nest(flat)


def float_shape(stored: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
  """The float kernel's shape from its stored values' (4 bits: the packed axis doubled)."""
  if layout.spec.bits == 8:
    return tuple(stored)
  axis = len(stored) - layout.rank + layout.pack_axis  # a scanned stack's layer axis first
  return stored[:axis] + (stored[axis] * 2,) + tuple(stored[axis + 1:])


def as_float(tree: dict, found: dict[str, Layout], kernel, shapes_of=None) -> dict:
  """`tree` (quantized; or, with `shapes_of` the quantized params, a tree of the same paths such
  as their shardings) with each stored kernel's parts replaced by `kernel(float shape)`."""
  flat = dict(treepaths.items(tree))
  shapes = dict(treepaths.items(tree if shapes_of is None else shapes_of))
  for path, layout in found.items():
    for name in PARTS:
      flat.pop(f"{path}/{name}", None)
    flat[f"{path}/kernel"] = kernel(float_shape(tuple(shapes[f"{path}/kernel"].shape), layout))
  return treepaths.nest(flat)


def relative_errors(params: dict, quantized: dict, found: dict[str, Layout]) -> dict[str, float]:
  """{kernel path: ||W - deq(Q)|| / ||W||} per quantized kernel (Frobenius norms)."""
  flat_w = dict(treepaths.items(params))
  flat_q = dict(treepaths.items(dequantize_tree(quantized, found)))
  out = {}
  for layout in found.values():
    w = np.asarray(flat_w[f"{layout.path}/kernel"], np.float64)
    d = np.asarray(flat_q[f"{layout.path}/kernel"], np.float64)
    out[f"{layout.path}/kernel"] = float(np.linalg.norm(w - d) / max(np.linalg.norm(w), 1e-30))
  return out


def nbytes(tree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree)))
