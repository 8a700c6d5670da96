"""Multi-head / grouped-query self-attention through `jax.nn.dot_product_attention`.

Going through the fused op lets GPUs take cuDNN flash attention (`attention_impl="cudnn"`),
while CPUs and TPUs get XLA's implementation. Masks: causal by config; `segment_ids` keep packed
documents (and padding, id 0) from attending across boundaries. With `decode=True` keys and
values also go to a "cache" collection, so generation runs the prompt once and then one token
per step against the cached prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
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


def _implementation(cfg: ModelConfig) -> str | None:
  if cfg.attention_impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and cfg.dtype in ("bfloat16", "float16") else None
  return cfg.attention_impl


class Attention(nn.Module):
  """Self-attention; K key/value heads shared by groups of N / K query heads."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array | None, positions_BL: jax.Array,
               cache_index: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    q_BLNH = layers.dense(cfg, (n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), "q")(x_BLD)
    k_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "k")(x_BLD)
    v_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "v")(x_BLD)
    if cfg.pos_emb == "rope":
      q_BLNH = layers.rope(q_BLNH, positions_BL, cfg.rope_theta)
      k_BLKH = layers.rope(k_BLKH, positions_BL, cfg.rope_theta)
    q_BLNH = nn.with_logical_constraint(q_BLNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    k_BLKH = nn.with_logical_constraint(k_BLKH,
                                        (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    if self.decode:
      # The decode mask already holds causality and padding; cuDNN's fused path takes neither.
      k_BSKH, v_BSKH = self._cached(k_BLKH, v_BLKH, cache_index)
      out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask=mask_B1LS)
    else:
      out_BLNH = jax.nn.dot_product_attention(
          q_BLNH, k_BLKH, v_BLKH, mask=mask_B1LS, is_causal=cfg.causal,
          implementation=_implementation(cfg))
    out_BLNH = nn.with_logical_constraint(out_BLNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)(out_BLNH)

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
