"""Multi-head / grouped-query self-attention through `jax.nn.dot_product_attention`.

Going through the fused op lets GPUs take cuDNN flash attention (`attention_impl="cudnn"`),
while CPUs and TPUs get XLA's implementation. Masks: causal by config; `segment_ids` keep packed
documents (and padding, id 0) from attending across boundaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
from llmjax.parallel import axes


def segment_mask(segment_ids_BL: jax.Array | None) -> jax.Array | None:
  """[B, 1, L, L] boolean: query and key belong to the same segment."""
  if segment_ids_BL is None:
    return None
  return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def _implementation(cfg: ModelConfig) -> str | None:
  if cfg.attention_impl == "auto":
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and cfg.dtype in ("bfloat16", "float16") else None
  return cfg.attention_impl


class Attention(nn.Module):
  """Self-attention; K key/value heads shared by groups of N / K query heads."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array | None,
               positions_BL: jax.Array) -> jax.Array:
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
    out_BLNH = jax.nn.dot_product_attention(
        q_BLNH, k_BLKH, v_BLKH, mask=segment_mask(segment_ids_BL), is_causal=cfg.causal,
        implementation=_implementation(cfg))
    out_BLNH = nn.with_logical_constraint(out_BLNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)(out_BLNH)
