"""LoRA and AdaLoRA factors as data: the update each module adds, and merging it into the base.

A module at path M holds `M/kernel` [*lead, *in, *out] and `M/lora/a` [*lead, *in, r],
`M/lora/b` [*lead, r, *out] (+ `M/lora/e` [*lead, r] for AdaLoRA); `*lead` is the layer axis of
a scanned stack or nothing. Its update is `scale * a . diag(e) . b`, contracted over r.
Stacked experts (models/moe_lora.py) hold `X/N` [*lead, E, in, out] with `X/lora/N_a`
[*lead, E, in, r] and `X/lora/N_b` [*lead, E, r, out]: the expert axis leads like a layer axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.finetune import partition
from llmjax.models.peft import Peft


def modules(params) -> list[str]:
  """Module paths that carry LoRA factors ('layer_0/attn/q')."""
  return sorted(p[:-len("/lora/a")] for p, _ in partition.items(params)
                if p.endswith("/lora/a"))


def delta(a, b, e, scale: float, kernel_shape) -> jax.Array:
  """The kernel-shaped update scale * a diag(e) b, in float32."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)  # layer axes shared by a, b and the kernel
  lead_shape, r = a.shape[:lead], a.shape[-1]
  a2 = a.astype(jnp.float32).reshape(lead_shape + (-1, r))
  b2 = b.astype(jnp.float32).reshape(lead_shape + (r, -1))
  if e is not None:
    a2 = a2 * e.astype(jnp.float32)[..., None, :]
  return (scale * a2 @ b2).reshape(kernel_shape)


def _factor_sets(flat: dict) -> list[tuple[str, str, str, str | None]]:
  """(kernel, a, b, e) paths of every LoRA pair: DenseGeneral modules and stacked experts."""
  out = [(m + "/kernel", m + "/lora/a", m + "/lora/b", m + "/lora/e")
         for m in sorted(p[:-len("/lora/a")] for p in flat if p.endswith("/lora/a"))]
  for p in sorted(flat):
    head, sep, name = p.rpartition("/lora/")
    if sep and name.endswith("_a") and f"{head}/{name[:-2]}" in flat:
      out.append((f"{head}/{name[:-2]}", p, p[:-2] + "_b", None))
  return out


def merged(params, peft: Peft) -> dict:
  """The parameters with every LoRA update folded into its kernel (in float32, cast back) and
  the factors gone: a plain model of the base's architecture."""
  flat = dict(partition.items(params))
  for kernel_path, a, b, e in _factor_sets(flat):
    kernel = flat[kernel_path]
    update = delta(flat.pop(a), flat.pop(b), flat.pop(e, None) if e else None,
                   peft.lora_scale(), kernel.shape)
    flat[kernel_path] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
  return partition.nest(flat)


def merge_jitted(params, peft: Peft, shardings):
  """`merged` under jit: each merged kernel lands in its base kernel's sharding."""
  flat_where = dict(partition.items(shardings))
  out = partition.nest({p: s for p, s in flat_where.items() if "/lora/" not in p})
  return jax.jit(lambda p: merged(p, peft), out_shardings=out)(params)
