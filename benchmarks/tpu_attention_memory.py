"""Compiled TPU memory of one attention core's forward and backward pass: XLA vs splash.

  JAX_PLATFORMS=cpu python benchmarks/tpu_attention_memory.py [--topology=v5e:2x2] \
      [--lengths=2048,8192] [--batch=4] [--heads=16] [--kv_heads=8] [--head_dim=128]

Needs libtpu (the `.[tpu]` extra), not a TPU (ALLOW_MULTIPLE_LIBTPU_LOAD=1 when another process
holds libtpu): the step is lowered for abstract devices of the
topology (`jax.experimental.topologies`) and compiled by libtpu's compiler, which reports each
chip's temporaries (`memory_analysis()`). What is compiled is llmjax's own core for
attention_impl "xla" and "splash" (models/attention.py, models/splash.py) on bf16 queries, keys
and values of packed documents (segment ids), causal, data parallel over the chips; the loss is
the sum of the outputs, so the backward pass is in the program too. XLA's temporaries grow as
L^2 (the scores and probabilities of every head), splash's as L. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.config import MeshConfig, ModelConfig
from llmjax.models import attention, splash
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding


def core(cfg: ModelConfig):
  """loss(q, k, v, segment ids) through the attention core `cfg.attention_impl`."""
  def loss(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    mask_B1LL = attention.segment_mask(segment_ids_BL)
    if cfg.attention_impl == "splash":
      out = splash.splash_attention(cfg, q_BLNH, k_BLKH, v_BLKH, mask_B1LL,
                                    cfg.dim_per_head**-0.5)
    else:
      out = attention.fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LL, True, "xla", False)
    return out.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


def compiled_memory(cfg: ModelConfig, mesh, batch: int, length: int) -> tuple[int, float]:
  """(temporary bytes per chip, compile seconds) of the core's forward and backward."""
  n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  rows = NamedSharding(mesh, P(meshlib.BATCH_AXES))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=rows)
          for s in ((batch, length, n, h), (batch, length, k, h), (batch, length, k, h))]
  args.append(jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows))
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_for("dp")):
    compiled = jax.jit(core(cfg)).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--lengths", default="2048,8192")
  parser.add_argument("--batch", type=int, default=4, help="global batch (data parallel)")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv_heads", type=int, default=8)
  parser.add_argument("--head_dim", type=int, default=128)
  args = parser.parse_args()
  devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
  mesh = meshlib.make_mesh(MeshConfig(), devices)
  print(f"{args.topology} ({len(devices)} chips, {devices[0].device_kind}), global batch "
        f"{args.batch}, {args.heads} query / {args.kv_heads} key-value heads of {args.head_dim}, "
        "bf16, causal + segment ids, forward + backward\n")
  print("| L | attention_impl | temporaries per chip | compile s |")
  print("|---|---|---|---|")
  for length in (int(x) for x in args.lengths.split(",")):
    for impl in ("xla", "splash"):
      cfg = ModelConfig(n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                        d_model=args.heads * args.head_dim, dtype="bfloat16",
                        attention_impl=impl)
      temp, seconds = compiled_memory(cfg, mesh, args.batch, length)
      print(f"| {length:,} | {impl} | {temp / 2**10:,.0f} KiB | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
  main()
