"""LoRA and AdaLoRA factors as data: the update each module adds, and merging it into the base.

A module at path M holds `M/kernel` [*lead, *in, *out] and `M/lora/a` [*lead, *in, r],
`M/lora/b` [*lead, r, *out] (+ `M/lora/e` [*lead, r] for AdaLoRA); `*lead` is the layer axis of
a scanned stack or nothing. Its update is `scale * a . diag(e) . b`, contracted over r.
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


def merged(params, peft: Peft) -> dict:
  """The parameters with every LoRA update folded into its kernel (in float32, cast back) and
  the factors gone: a plain model of the base's architecture."""
  flat = dict(partition.items(params))
  for module in modules(params):
    kernel = flat[module + "/kernel"]
    update = delta(flat.pop(module + "/lora/a"), flat.pop(module + "/lora/b"),
                   flat.pop(module + "/lora/e", None), peft.lora_scale(), kernel.shape)
    flat[module + "/kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
  return partition.nest(flat)


def merge_jitted(params, peft: Peft, shardings):
  """`merged` under jit: each merged kernel lands in its base kernel's sharding."""
  flat_where = dict(partition.items(shardings))
  out = partition.nest({p: s for p, s in flat_where.items() if "/lora/" not in p})
  return jax.jit(lambda p: merged(p, peft), out_shardings=out)(params)
