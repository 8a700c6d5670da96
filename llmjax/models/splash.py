"""Splash attention: jax's Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
as an attention core (`attention_impl="splash"`).

The kernel walks (query block, key block) tiles and skips the tiles its mask rules out, keeping
only O(L) state per head where XLA's attention materialises L x L scores (docs/tpu_attention.md
measures both). It runs one example at a time on [heads, L, head_dim] arrays, so here it is
mapped over the batch, and under a mesh it runs per shard (`shard_map` over the batch and
head axes that the logical rules in effect give `batch` and `act_heads`).

What it honours: causal or bidirectional attention, packed documents (segment ids), grouped
query attention (K key/value heads for N query heads), a sliding window (`LocalMask`), Gemma 2's
soft-capped scores (`attn_logits_soft_cap`) and `query_pre_attn_scalar` (queries scaled before
the kernel, which does not scale). Its tiles are multiples of 128 keys, so the sequence length
must be one too (refused otherwise, never silently padded or run by another core).

Segment ids: the model hands its cores a [B, 1, L, L] same-segment mask (attention.segment_mask);
the kernel wants per-token ids, and any labelling with equal ids exactly within a segment is
one: the index of the first key in the row's own segment (`segment_ids_from_mask`), which XLA
computes as a fused reduction over the mask's defining comparison without storing L x L.
On CPU the kernel runs only in Pallas interpret mode (`pltpu.force_tpu_interpret_mode()`), the
way the tests check its numerics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.parallel import axes

LANES = 128  # the kernel's key tiles are multiples of the TPU's 128 lanes
_DEFAULT_BLOCK = 512  # the largest tile tried first (MaxText's default for v5e/v5p)


def block_size(cfg: ModelConfig, length: int) -> tuple[int, int]:
  """(query block, key block): config.model.splash_block_q/_kv, or from the length (the largest
  of 512, 256, 128 that divides it)."""
  if length % LANES:
    raise ConfigError(f"config.model.attention_impl='splash' needs a sequence length that is a "
                      f"multiple of {LANES} (the kernel's tiles); got {length}")
  auto = next(b for b in (_DEFAULT_BLOCK, 256, LANES) if length % b == 0)
  out = []
  for key in ("splash_block_q", "splash_block_kv"):
    block = getattr(cfg, key) or auto
    if block % LANES or length % block:
      raise ConfigError(f"config.model.{key}={block} must be a multiple of {LANES} that "
                        f"divides the sequence length {length} (0: chosen from the length)")
    out.append(block)
  return out[0], out[1]


def segment_ids_from_mask(mask_B1LL: jax.Array) -> jax.Array:
  """[B, L] int32: each query's first visible key, a segment id for a same-segment mask."""
  return jnp.argmax(mask_B1LL[:, 0], axis=-1).astype(jnp.int32)


def context_shards() -> int:
  """How many ways the rules and mesh in effect split the sequence (context parallelism)."""
  mesh = jax.sharding.get_abstract_mesh()
  length_axes = nn.logical_to_mesh_axes((axes.LENGTH,))[0] if not mesh.empty else None
  if not length_axes:
    return 1
  names = (length_axes,) if isinstance(length_axes, str) else length_axes
  return math.prod(mesh.shape[name] for name in names)


def _kernel(cfg: ModelConfig, heads: int, length: int, causal: bool, window: int):
  """The splash kernel for one example's [heads, L, H] queries (masks are static: numpy)."""
  # Function-level: the Pallas TPU ops (0.3 s to import) stay off every non-splash run's path.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  # (the same: the kernel's mask module)
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  if window:
    # Slots (i - window, i], as the other cores' windows (attention.window_mask).
    mask = sm.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  elif causal:
    mask = sm.CausalMask(shape)
  else:
    mask = sm.FullMask(shape)
  block_q, block_kv = block_size(cfg, length)
  blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                         block_q_dkv=block_q, block_kv_dkv=block_kv,
                         block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
  return sk.make_splash_mha(sm.MultiHeadMask((mask,) * heads), block_sizes=blocks, head_shards=1,
                            q_seq_shards=1, attn_logits_soft_cap=cfg.attn_softcap or None)


def splash_attention(cfg: ModelConfig, q_BLNH, k_BLKH, v_BLKH, mask_B1LL, scale: float,
                     window: int = 0) -> jax.Array:
  """[B, L, N, H]: the splash kernel per example and, under a mesh, per (batch, heads) shard."""
  segments_BL = None if mask_B1LL is None else segment_ids_from_mask(mask_B1LL)
  causal = cfg.causal

  def local(q_BLNH, k_BLKH, v_BLKH, segments_BL):
    """The kernel on this shard's examples and heads."""
    # Function-level: the Pallas TPU ops stay off every non-splash run's import path.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    q_BNLH = jnp.swapaxes(q_BLNH * jnp.asarray(scale, q_BLNH.dtype), 1, 2)
    k_BKLH, v_BKLH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
    kernel = _kernel(cfg, q_BNLH.shape[1], q_BNLH.shape[2], causal, window)
    # One kernel call per example (lax.map, not vmap: Pallas' interpret mode, which the CPU
    # tests run, fails on a vmapped splash call in jax 0.10.2; per-device batches are small).
    if segments_BL is None:
      out_BNLH = jax.lax.map(lambda qkv: kernel(*qkv), (q_BNLH, k_BKLH, v_BKLH))
    else:
      out_BNLH = jax.lax.map(lambda a: kernel(*a[:3], sk.SegmentIds(a[3], a[3])),
                             (q_BNLH, k_BKLH, v_BKLH, segments_BL))
    return jnp.swapaxes(out_BNLH, 1, 2)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BLNH, k_BLKH, v_BLKH, segments_BL)
  if context_shards() > 1:
    raise ConfigError(f"config.model.attention_impl='splash' does not run under context "
                      f"parallelism yet (config.mesh.context={context_shards()}); use 'xla' "
                      "or mesh.context=1")
  # The kernel is opaque to GSPMD: each device runs it on its own examples and heads, with
  # every key of its examples (the spec of `length` is None: gathered if it was split).
  q_spec = nn.logical_to_mesh_axes((axes.BATCH, None, axes.ACT_HEADS, None))
  kv_spec = nn.logical_to_mesh_axes((axes.BATCH, None, axes.ACT_KV_HEADS, None))
  seg_spec = nn.logical_to_mesh_axes((axes.BATCH, None))
  specs = (q_spec, kv_spec, kv_spec) + ((seg_spec,) if segments_BL is not None else ())
  args = (q_BLNH, k_BLKH, v_BLKH) + ((segments_BL,) if segments_BL is not None else ())
  run = local if segments_BL is not None else (lambda q, k, v: local(q, k, v, None))
  return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)
