"""Multi-head / grouped-query self-attention, and cross-attention for encoder-decoders.

`attention_impl` picks how the attention core runs; all compute the same function:
- "xla": `jax.nn.dot_product_attention`'s XLA path: full L x L scores, the causal half masked.
- "blocked": causal attention by query blocks, each against only the keys at or before it, so
  the masked half is mostly never computed (`blocked_causal_attention`); the fastest on CPU
  (benchmarks/RESULTS.md).
- "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU, half dtypes).
- "auto": cuDNN on GPU in half precision (XLA where cuDNN refuses the call: no cuDNN, an
  unsupported head size or mask), blocked for causal attention on CPU, XLA otherwise.
Gemma 2's soft-capped scores (`attn_softcap`) run blocked or through `capped_attention` (XLA);
cuDNN cannot cap them and is refused, never silently uncapped.
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
from llmjax.errors import ConfigError
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


def _attend(q_BQKGH, k_BSKH, v_BSKH, visible_B1QS, scale: float, softcap: float):
  """[B, Q, K, G, H]: softmax over the visible keys of the (soft-capped) scaled scores.

  Numerics follow `jax.nn.dot_product_attention`: scores and softmax in float32, probabilities
  cast to the value dtype. Soft-capping (Gemma 2) is cap * tanh(score / cap), before the mask.
  """
  scores_BKGQS = jnp.einsum("bqkgh,bskh->bkgqs", q_BQKGH, k_BSKH,
                            preferred_element_type=jnp.float32) * scale
  if softcap:
    scores_BKGQS = softcap * jnp.tanh(scores_BKGQS / softcap)
  if visible_B1QS is not None:
    scores_BKGQS = jnp.where(visible_B1QS[:, :, None], scores_BKGQS, jnp.finfo(jnp.float32).min)
  probs_BKGQS = jax.nn.softmax(scores_BKGQS, axis=-1).astype(v_BSKH.dtype)
  return jnp.einsum("bkgqs,bskh->bqkgh", probs_BKGQS, v_BSKH)


def blocked_causal_attention(q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array,
                             mask_B1LL: jax.Array | None, block: int, scale: float | None = None,
                             softcap: float = 0.0) -> jax.Array:
  """Causal attention, query block by query block, each against keys [0, end of the block).

  Exact (the softmax of each query row sees all of its unmasked keys at once), so unlike flash
  attention no running max/sum is needed; it only skips the key blocks above the diagonal,
  about half the scores for long sequences. Key/value head k serves query heads
  [k * G, (k + 1) * G), G = N / K; `scale` defaults to 1 / sqrt(H).
  """
  batch, length, n, h = q_BLNH.shape
  k = k_BLKH.shape[2]
  scale = h**-0.5 if scale is None else scale
  q_BLKGH = q_BLNH.reshape(batch, length, k, n // k, h)
  out = []
  for start in range(0, length, block):
    end = min(start + block, length)
    visible_B1QS = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
    if mask_B1LL is not None:
      visible_B1QS = visible_B1QS & mask_B1LL[:, :, start:end, :end]
    out.append(_attend(q_BLKGH[:, start:end], k_BLKH[:, :end], v_BLKH[:, :end], visible_B1QS,
                       scale, softcap))
  return jnp.concatenate(out, axis=1).reshape(batch, length, n, h)


def capped_attention(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, causal: bool, scale: float,
                     softcap: float) -> jax.Array:
  """Attention with soft-capped scores, all L x S at once (what XLA runs for Gemma 2; neither
  `jax.nn.dot_product_attention` nor cuDNN caps). A causal query i sees keys j <= i + S - L."""
  batch, length, n, h = q_BLNH.shape
  size, k = k_BSKH.shape[1:3]
  visible_B1LS = mask_B1LS
  if causal:
    causal_LS = jnp.arange(size)[None, :] <= jnp.arange(length)[:, None] + size - length
    visible_B1LS = causal_LS[None, None] if mask_B1LS is None else mask_B1LS & causal_LS
  out = _attend(q_BLNH.reshape(batch, length, k, n // k, h), k_BSKH, v_BSKH, visible_B1LS,
                scale, softcap)
  return out.reshape(batch, length, n, h)


def implementation(cfg: ModelConfig, length: int) -> str:
  """The attention core this model runs for a length-L causal or bidirectional input."""
  impl = cfg.attention_impl
  if impl == "cudnn" and cfg.attn_softcap:
    raise ConfigError(f"config.model.attention_impl='cudnn' cannot soft-cap attention scores "
                      f"(attn_softcap={cfg.attn_softcap}); use 'xla', 'blocked' or 'auto'")
  if impl == "auto":
    platform = jax.default_backend()
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") and not cfg.attn_softcap:
      return "cudnn"
    impl = "blocked" if platform == "cpu" else "xla"
  if impl == "blocked" and not (cfg.causal and length > cfg.attention_block):
    return "xla"  # nothing above a diagonal to skip
  return impl


def fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, causal: bool, impl: str,
                    fallback: bool, scale: float | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` with impl "xla" or "cudnn"; with `fallback`, a cuDNN call
  that jax refuses while tracing (no cuDNN, unsupported shapes) runs through XLA instead."""
  kwargs = dict(mask=mask_B1LS, is_causal=causal, scale=scale)
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
    # None: jax's own 1 / sqrt(H), so models without query_pre_attn_scalar keep their numerics.
    scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    if self.decode:
      # The decode mask already holds causality and padding; cuDNN's fused path takes neither.
      k_BSKH, v_BSKH = self._cached(k_BLKH, v_BLKH, cache_index)
      if self.peft.prefix_length:
        k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BSKH, v_BSKH, mask_B1LS, False,
                                                       x_BLD.shape[1])
      out_BLNH = self._explicit(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale)
    elif self.peft.prefix_length:  # keys no longer line up with queries: an explicit mask
      k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BLKH, v_BLKH, mask_B1LS, cfg.causal,
                                                     x_BLD.shape[1])
      out_BLNH = self._explicit(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale)
    elif (impl := implementation(cfg, x_BLD.shape[1])) == "blocked":
      out_BLNH = blocked_causal_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.attention_block,
                                          scale, cfg.attn_softcap)
    elif cfg.attn_softcap:  # implementation() never picks cuDNN for capped scores
      out_BLNH = capped_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.causal,
                                  scale or cfg.dim_per_head**-0.5, cfg.attn_softcap)
    else:
      out_BLNH = fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.causal, impl,
                                 fallback=cfg.attention_impl == "auto", scale=scale)
    out_BLNH = nn.with_logical_constraint(out_BLNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                        **hooks)(out_BLNH)

  def _explicit(self, q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale):
    """Attention under an explicit mask that holds causality (decoding, prefix tuning)."""
    if self.cfg.attn_softcap:
      return capped_attention(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, False,
                              scale or self.cfg.dim_per_head**-0.5, self.cfg.attn_softcap)
    return jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS, scale=scale)

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
