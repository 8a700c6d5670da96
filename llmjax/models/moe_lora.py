"""LoRA on the expert projections of a mixture of experts (models/moe.py's `Experts`).

An expert kernel is a stacked parameter ([E, in, out]), not a DenseGeneral, so its LoRA factors
are stacked too: `<experts>/lora/{wi,wg,wo}_a` [E, in, r] and `..._b` [E, r, out], one low-rank
update per expert, on each projection whose path ("layer_0/mlp/experts/wi") full-matches
`lora_targets`. B starts at zero (the model computes what its base does), A as PEFT's
kaiming-uniform. The update is applied where the kernel is: grouped by expert (ragged_dot) or on
capacity slots (einsum). No dropout: PEFT's LoRA on parameters has none either (x cannot be
factored out of a per-expert product), so a dropout or AdaLoRA on experts is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.errors import ConfigError
from llmjax.models import peft as peftlib


class ExpertsLora(nn.Module):
  """Per-expert low-rank factors of the targeted projections in `shapes` ({name: (E, in, out)})."""
  peft: peftlib.Peft
  shapes: dict
  logical: dict  # {name: (expert axis, in axis, out axis)}
  param_dtype: str = "float32"

  def setup(self):
    p, r = self.peft, self.peft.lora_rank
    if p.lora_dropout or p.adalora:
      raise ConfigError(f"config.finetune.lora_targets={p.lora_targets!r} reaches expert "
                        f"projections ({', '.join(sorted(self.shapes))}), which take plain LoRA "
                        "only: set config.finetune.lora_dropout=0 and method=lora (PEFT has "
                        "neither on experts)")
    factors = {}
    for name, (e, d_in, d_out) in self.shapes.items():
      if not 0 < r <= min(d_in, d_out):
        raise ConfigError(f"config.finetune.lora_rank={r} must be in [1, {min(d_in, d_out)}] "
                          f"for {'/'.join(self.path[:-1])}/{name} (kernel {[e, d_in, d_out]})")
      ax_e, ax_in, ax_out = self.logical[name]
      bound = d_in ** -0.5
      a_init = lambda key, shape, dtype, b=bound: jax.random.uniform(key, shape, dtype, -b, b)
      factors[name] = (
          self.param(f"{name}_a", nn.with_logical_partitioning(a_init, (ax_e, ax_in, None)),
                     (e, d_in, r), jnp.dtype(self.param_dtype)),
          self.param(f"{name}_b", nn.with_logical_partitioning(
              nn.initializers.zeros, (ax_e, None, ax_out)), (e, r, d_out),
              jnp.dtype(self.param_dtype)))
    self.factors = factors

  def grouped(self, name: str, x_NI, sizes_E):
    """Rows sorted by expert -> each row's update through its expert's factors [N, out]."""
    return grouped_update(self.factors[name], self.peft.lora_scale(), x_NI, sizes_E)

  def slotted(self, name: str, x_BECI):
    """Each expert's capacity slots -> their updates [B, E, C, out]."""
    a, b = (f.astype(x_BECI.dtype) for f in self.factors[name])
    h_BECR = jnp.einsum("BECI,EIR->BECR", x_BECI, a)
    scale = jnp.asarray(self.peft.lora_scale(), x_BECI.dtype)
    return jnp.einsum("BECR,ERO->BECO", h_BECR, b) * scale


def grouped_update(factors, scale: float, x_NI, sizes_E):
  """Rows sorted by expert -> their updates through the (A [E, in, r], B [E, r, out]) factors."""
  a, b = (f.astype(x_NI.dtype) for f in factors)
  h_NR = jax.lax.ragged_dot(x_NI, a, sizes_E)
  return jax.lax.ragged_dot(h_NR, b, sizes_E) * jnp.asarray(scale, x_NI.dtype)


def targets(peft: peftlib.Peft, path: tuple[str, ...], names) -> tuple[str, ...]:
  """The projections of the Experts module at `path` that LoRA reaches."""
  return tuple(n for n in names if peft.lora_on(tuple(path) + (n,)))
