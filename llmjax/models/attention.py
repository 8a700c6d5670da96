"""Multi-head / grouped-query self-attention, and cross-attention for encoder-decoders.

`attention_impl` picks how the attention core runs; all compute the same function:
- "xla": `jax.nn.dot_product_attention`'s XLA path: full L x L scores, the causal half masked.
- "blocked": causal attention by query blocks, each against only the keys at or before it, so
  the masked half is mostly never computed (`blocked_causal_attention`); the fastest on CPU
  (benchmarks/RESULTS.md).
- "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU, half dtypes).
- "auto": cuDNN on GPU in half precision (XLA where cuDNN refuses the call: no cuDNN, an
  unsupported head size or mask), blocked for causal attention on CPU, XLA otherwise.
Masks: causal by config; `segment_ids` keep packed documents (and padding, id 0) from attending
across boundaries. With `decode=True` keys and values also go to a "cache" collection, so
generation runs the prompt once and then one token per step against the cached prefix.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
from llmjax.models import peft as peftlib
from llmjax.parallel import axes

_KV_CACHE = (axes.BATCH, None, axes.ACT_KV_HEADS, None)


def segment_mask(segment_ids_BL: jax.Array | None) -> jax.Array | None:
  """[B, 1, L, L] boolean: query and key belong to the same segment."""
  if segment_ids_BL is None:
    return None
  return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def decode_mask(cached_segment_ids_BS: jax.Array, segment_ids_BL: jax.Array,
                index: jax.Array) -> jax.Array:
  """[B, 1, L, S]: the query in slot index + i sees slots <= index + i of its own segment."""
  length, size = segment_ids_BL.shape[1], cached_segment_ids_BS.shape[1]
  query_slot_L = index + jnp.arange(length)
  causal_LS = jnp.arange(size)[None, :] <= query_slot_L[:, None]
  same_BLS = segment_ids_BL[:, :, None] == cached_segment_ids_BS[:, None, :]
  return (same_BLS & causal_LS[None])[:, None]


def blocked_causal_attention(q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array,
                             mask_B1LL: jax.Array | None, block: int) -> jax.Array:
  """Causal attention, query block by query block, each against keys [0, end of the block).

  Exact (the softmax of each query row sees all of its unmasked keys at once), so unlike flash
  attention no running max/sum is needed; it only skips the key blocks above the diagonal,
  about half the scores for long sequences. Numerics follow `jax.nn.dot_product_attention`:
  scores and softmax in float32, probabilities cast to the value dtype. Key/value head k serves
  query heads [k * G, (k + 1) * G), G = N / K.
  """
  batch, length, n, h = q_BLNH.shape
  k = k_BLKH.shape[2]
  q_BLKGH = q_BLNH.reshape(batch, length, k, n // k, h)
  out = []
  for start in range(0, length, block):
    end = min(start + block, length)
    scores_BKGQS = jnp.einsum("bqkgh,bskh->bkgqs", q_BLKGH[:, start:end], k_BLKH[:, :end],
                              preferred_element_type=jnp.float32) * h**-0.5
    visible_BKGQS = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None, None]
    if mask_B1LL is not None:
      visible_BKGQS = visible_BKGQS & mask_B1LL[:, :, None, start:end, :end]
    scores_BKGQS = jnp.where(visible_BKGQS, scores_BKGQS, jnp.finfo(jnp.float32).min)
    probs_BKGQS = jax.nn.softmax(scores_BKGQS, axis=-1).astype(v_BLKH.dtype)
    out.append(jnp.einsum("bkgqs,bskh->bqkgh", probs_BKGQS, v_BLKH[:, :end]))
  return jnp.concatenate(out, axis=1).reshape(batch, length, n, h)


def implementation(cfg: ModelConfig, length: int) -> str:
  """The attention core this model runs for a length-L causal or bidirectional input."""
  impl = cfg.attention_impl
  if impl == "auto":
    platform = jax.default_backend()
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16"):
      return "cudnn"
    impl = "blocked" if platform == "cpu" else "xla"
  if impl == "blocked" and not (cfg.causal and length > cfg.attention_block):
    return "xla"  # nothing above a diagonal to skip
  return impl


def fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, causal: bool, impl: str,
                    fallback: bool) -> jax.Array:
  """`jax.nn.dot_product_attention` with impl "xla" or "cudnn"; with `fallback`, a cuDNN call
  that jax refuses while tracing (no cuDNN, unsupported shapes) runs through XLA instead."""
  kwargs = dict(mask=mask_B1LS, is_causal=causal)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, implementation="cudnn",
                                          **kwargs)
    except (RuntimeError, ValueError, NotImplementedError) as e:
      if not fallback:
        raise
      logging.warning("cuDNN attention unavailable (%s); using XLA's attention", e)
  return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, **kwargs)


class Attention(nn.Module):
  """Self-attention; K key/value heads shared by groups of N / K query heads."""
  cfg: ModelConfig
  decode: bool = False
  peft: peftlib.Peft = peftlib.NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array | None, positions_BL: jax.Array,
               cache_index: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    hooks = dict(peft=self.peft, deterministic=self.deterministic)
    q_BLNH = layers.dense(cfg, (n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), "q",
                          **hooks)(x_BLD)
    k_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "k",
                          **hooks)(x_BLD)
    v_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "v",
                          **hooks)(x_BLD)
    if cfg.pos_emb == "rope":
      q_BLNH = layers.rope(q_BLNH, positions_BL, cfg.rope_theta)
      k_BLKH = layers.rope(k_BLKH, positions_BL, cfg.rope_theta)
    q_BLNH = nn.with_logical_constraint(q_BLNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    k_BLKH = nn.with_logical_constraint(k_BLKH,
                                        (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    if self.decode:
      # The decode mask already holds causality and padding; cuDNN's fused path takes neither.
      k_BSKH, v_BSKH = self._cached(k_BLKH, v_BLKH, cache_index)
      if self.peft.prefix_length:
        k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BSKH, v_BSKH, mask_B1LS, False,
                                                       x_BLD.shape[1])
      out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS)
    elif self.peft.prefix_length:  # keys no longer line up with queries: an explicit mask
      k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BLKH, v_BLKH, mask_B1LS, cfg.causal,
                                                     x_BLD.shape[1])
      out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS)
    elif (impl := implementation(cfg, x_BLD.shape[1])) == "blocked":
      out_BLNH = blocked_causal_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.attention_block)
    else:
      out_BLNH = fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.causal, impl,
                                 fallback=cfg.attention_impl == "auto")
    out_BLNH = nn.with_logical_constraint(out_BLNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                        **hooks)(out_BLNH)

  def _prefixed(self, k_BSKH, v_BSKH, mask_B1LS, causal: bool, length: int):
    """Prefix tuning: this layer's trained keys/values in front (after RoPE: never rotated)."""
    cfg = self.cfg
    prefix_k_PKH, prefix_v_PKH = peftlib.Prefix(self.peft.prefix_length, cfg.kv_heads,
                                                cfg.dim_per_head, cfg.param_dtype,
                                                name="prefix")()
    return peftlib.with_prefix(prefix_k_PKH, prefix_v_PKH, k_BSKH, v_BSKH, mask_B1LS, causal,
                               length)

  def _cached(self, k_BLKH, v_BLKH, index):
    """Write this call's keys/values at `index`; the cache is sized by the input seen at init."""
    out = []
    for name, new_BLKH in (("cached_k", k_BLKH), ("cached_v", v_BLKH)):
      cached = self.variable("cache", name, jnp.zeros, new_BLKH.shape, new_BLKH.dtype)
      updated_BSKH = jax.lax.dynamic_update_slice(
          cached.value, new_BLKH.astype(cached.value.dtype), (0, index, 0, 0))
      cached.value = nn.with_logical_constraint(updated_BSKH, _KV_CACHE)
      out.append(cached.value)
    return out


class CrossAttention(nn.Module):
  """A decoder's attention over the encoder's output (memory [B, S, D]).

  With `decode`, the memory's keys and values are computed once, by the call that is given the
  memory (the prefill), and read from the "cache" collection by every later step (memory None).
  """
  cfg: ModelConfig
  decode: bool = False
  peft: peftlib.Peft = peftlib.NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array, memory_BSD: jax.Array | None,
               mask_B1TS: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    hooks = dict(peft=self.peft, deterministic=self.deterministic)
    q_BTNH = layers.dense(cfg, (n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), "q",
                          **hooks)(x_BTD)
    q_BTNH = nn.with_logical_constraint(q_BTNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    if memory_BSD is not None:
      kv = [nn.with_logical_constraint(
          layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), name,
                       **hooks)(memory_BSD), (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
            for name in ("k", "v")]
      if self.decode:
        for name, value_BSKH in zip(("cross_k", "cross_v"), kv):
          cached = self.variable("cache", name, jnp.zeros, value_BSKH.shape, value_BSKH.dtype)
          cached.value = nn.with_logical_constraint(value_BSKH, _KV_CACHE)
    else:
      if not self.decode:
        raise ValueError("cross-attention needs the encoder's output unless decoding from a cache")
      kv = [self.get_variable("cache", name) for name in ("cross_k", "cross_v")]
    k_BSKH, v_BSKH = kv
    out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype),
                                            v_BSKH.astype(q_BTNH.dtype), mask=mask_B1TS)
    out_BTNH = nn.with_logical_constraint(out_BTNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                        **hooks)(out_BTNH)


def cross_mask(target_segment_ids_BT: jax.Array, source_segment_ids_BS: jax.Array) -> jax.Array:
  """[B, 1, T, S]: a target token sees the source tokens of its own pair (segment), never
  padding (segment 0)."""
  same_BTS = target_segment_ids_BT[:, :, None] == source_segment_ids_BS[:, None, :]
  return (same_BTS & (source_segment_ids_BS != 0)[:, None, :])[:, None]
