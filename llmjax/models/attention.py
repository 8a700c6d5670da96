"""Multi-head / grouped-query self-attention, and cross-attention for encoder-decoders.

`attention_impl` picks how the attention core runs; all compute the same function:
- "xla": `jax.nn.dot_product_attention`'s XLA path: full L x L scores, the causal half masked.
- "blocked": causal attention by query blocks, each against only the keys at or before it, so
  the masked half is mostly never computed (`blocked_causal_attention`); the fastest on CPU
  (benchmarks/RESULTS.md). In a sliding-window layer it also skips the key blocks left of the
  window.
- "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention` (GPU, half dtypes);
  windows through cuDNN's own sliding-window mask.
- "splash": jax's Pallas splash-attention kernel for TPU (models/splash.py): O(L) memory, masked
  tiles skipped; lengths a multiple of 128. On CPU only in Pallas interpret mode (tests).
- "auto": cuDNN on GPU in half precision (XLA where cuDNN refuses the call: no cuDNN, an
  unsupported head size or mask), splash on TPU (XLA for a length splash cannot tile), blocked
  for causal attention on CPU, XLA otherwise.
Gemma 2's soft-capped scores (`attn_softcap`) run blocked, splash or through `capped_attention`
(XLA); cuDNN cannot cap them and is refused, never silently uncapped.
Masks: causal by config; `segment_ids` keep packed documents (and padding, id 0) from attending
across boundaries; `branch_ids` (one prompt, two completions in a row: `branch_mask`) keep a
branch from seeing another (xla, blocked, cuDNN take any mask; splash takes segment ids only:
`auto` runs XLA there, 'splash' is refused); a local layer (config.sliding_window,
layer_pattern) lets the query in slot i see slots (i - window, i] only, as transformers'
sliding-window mask does. With `decode=True`
keys and values also go to a "cache" collection, so generation runs the prompt once and then one
token per step against the cached prefix (the window is a mask over the cache's slots there).
"""

from __future__ import annotations

import contextvars
import logging

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.models import layers
from llmjax.models import peft as peftlib
from llmjax.models import rope
from llmjax.models import splash
from llmjax.parallel import axes

_KV_CACHE = (axes.BATCH, None, axes.ACT_KV_HEADS, None)


def segment_mask(segment_ids_BL: jax.Array | None) -> jax.Array | None:
  """[B, 1, L, L] boolean: query and key belong to the same segment."""
  if segment_ids_BL is None:
    return None
  return segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]


def branch_mask(segment_ids_BL: jax.Array, branch_ids_BL: jax.Array) -> jax.Array:
  """[B, 1, L, L]: same segment, and the key is in the shared trunk (branch 0) or in the query's
  own branch; slot order gives causality as for any mask here."""
  branch_q_BLL, branch_k_BLL = branch_ids_BL[:, :, None], branch_ids_BL[:, None, :]
  visible_BLL = (branch_k_BLL == 0) | (branch_k_BLL == branch_q_BLL)
  return segment_mask(segment_ids_BL) & visible_BLL[:, None]


# Set by the Transformer while it traces a branch mask, which splash (segment ids only) cannot run.
BRANCHED: contextvars.ContextVar[bool] = contextvars.ContextVar("branched", default=False)


def decode_mask(cached_segment_ids_BS: jax.Array, segment_ids_BL: jax.Array,
                index: jax.Array) -> jax.Array:
  """[B, 1, L, S]: the query in slot index + i sees slots <= index + i of its own segment."""
  length, size = segment_ids_BL.shape[1], cached_segment_ids_BS.shape[1]
  query_slot_L = index + jnp.arange(length)
  causal_LS = jnp.arange(size)[None, :] <= query_slot_L[:, None]
  same_BLS = segment_ids_BL[:, :, None] == cached_segment_ids_BS[:, None, :]
  return (same_BLS & causal_LS[None])[:, None]


def window_mask(query_slot_L: jax.Array, size: int, window: int) -> jax.Array:
  """[1, 1, L, S]: key slot s is within the window of the query in slot q (s > q - window)."""
  return (jnp.arange(size)[None, :] > query_slot_L[:, None] - window)[None, None]


def blocked_ranges(length: int, block: int, window: int = 0) -> list[tuple[int, int, int]]:
  """(query start, query end, first key) of each query block of `blocked_causal_attention`:
  keys from the start of the block holding the window's first key (0 without a window) to the
  block's end. Their key blocks are the ones computed."""
  out = []
  for start in range(0, length, block):
    first = max(0, start - window + 1) // block * block if window else 0
    out.append((start, min(start + block, length), first))
  return out


def computed_key_blocks(length: int, block: int, window: int = 0) -> int:
  """How many (query block, key block) score tiles blocked attention computes."""
  return sum(-(-(end - first) // block) for _, end, first in blocked_ranges(length, block, window))


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
                             softcap: float = 0.0, window: int = 0) -> jax.Array:
  """Causal attention, query block by query block, each against keys [first, end of the block).

  Exact (the softmax of each query row sees all of its unmasked keys at once), so unlike flash
  attention no running max/sum is needed; it only skips the key blocks above the diagonal,
  about half the scores for long sequences, and with a `window` those left of it (`first`, see
  blocked_ranges). Key/value head k serves query heads [k * G, (k + 1) * G), G = N / K;
  `scale` defaults to 1 / sqrt(H).
  """
  batch, length, n, h = q_BLNH.shape
  k = k_BLKH.shape[2]
  scale = h**-0.5 if scale is None else scale
  q_BLKGH = q_BLNH.reshape(batch, length, k, n // k, h)
  out = []
  for start, end, first in blocked_ranges(length, block, window):
    query_Q1, key_1S = jnp.arange(start, end)[:, None], jnp.arange(first, end)[None, :]
    visible_QS = key_1S <= query_Q1
    if window:
      visible_QS = visible_QS & (key_1S > query_Q1 - window)
    visible_B1QS = visible_QS[None, None]
    if mask_B1LL is not None:
      visible_B1QS = visible_B1QS & mask_B1LL[:, :, start:end, first:end]
    out.append(_attend(q_BLKGH[:, start:end], k_BLKH[:, first:end], v_BLKH[:, first:end],
                       visible_B1QS, scale, softcap))
  return jnp.concatenate(out, axis=1).reshape(batch, length, n, h)


def capped_attention(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, causal: bool, scale: float,
                     softcap: float, window: int = 0) -> jax.Array:
  """Attention with soft-capped scores, all L x S at once (what XLA runs for Gemma 2; neither
  `jax.nn.dot_product_attention` nor cuDNN caps). A causal query i sees keys j <= i + S - L
  (and, with a `window`, j > i + S - L - window)."""
  batch, length, n, h = q_BLNH.shape
  size, k = k_BSKH.shape[1:3]
  visible_B1LS = mask_B1LS
  if causal:
    query_L1 = jnp.arange(length)[:, None] + size - length
    causal_LS = jnp.arange(size)[None, :] <= query_L1
    if window:
      causal_LS = causal_LS & (jnp.arange(size)[None, :] > query_L1 - window)
    visible_B1LS = causal_LS[None, None] if mask_B1LS is None else (mask_B1LS
                                                                    & causal_LS[None, None])
  out = _attend(q_BLNH.reshape(batch, length, k, n // k, h), k_BSKH, v_BSKH, visible_B1LS,
                scale, softcap)
  return out.reshape(batch, length, n, h)


# The platform "auto" chooses for: jax's default backend, unless set while tracing for other
# devices (`llmjax compile` traces on a CPU host for a TPU topology's abstract devices).
TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform",
                                                                             default=None)


def implementation(cfg: ModelConfig, length: int) -> str:
  """The attention core this model runs for a length-L causal or bidirectional input."""
  impl = cfg.attention_impl
  if impl == "cudnn" and cfg.attn_softcap:
    raise ConfigError(f"config.model.attention_impl='cudnn' cannot soft-cap attention scores "
                      f"(attn_softcap={cfg.attn_softcap}); use 'xla', 'blocked' or 'auto'")
  if impl == "auto":
    platform = TARGET_PLATFORM.get() or jax.default_backend()
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") and not cfg.attn_softcap:
      return "cudnn"
    if platform == "tpu" and length % splash.LANES == 0:
      return "splash"
    impl = "blocked" if platform == "cpu" else "xla"
  if impl == "blocked" and not (cfg.causal and length > cfg.attention_block):
    return "xla"  # nothing above a diagonal to skip
  return impl


def fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, causal: bool, impl: str,
                    fallback: bool, scale: float | None = None, window: int = 0) -> jax.Array:
  """`jax.nn.dot_product_attention` with impl "xla" or "cudnn"; with `fallback`, a cuDNN call
  that jax refuses while tracing (no cuDNN, unsupported shapes) runs through XLA instead (the
  window too: never full attention in its place)."""
  kwargs = dict(mask=mask_B1LS, is_causal=causal, scale=scale,
                local_window_size=(window - 1, 0) if window else None)
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, implementation="cudnn",
                                          **kwargs)
    except (RuntimeError, ValueError, NotImplementedError) as e:
      if not fallback:
        raise
      logging.warning("cuDNN attention unavailable (%s); using XLA's attention", e)
  return jax.nn.dot_product_attention(q_BLNH, k_BLKH, v_BLKH, **kwargs)


def _when(local, mask_11LS: jax.Array) -> jax.Array | None:
  """The window mask where the layer is local: None for a static False, the mask for a static
  True, and where a scanned layer's traced `local` is False, every slot."""
  if isinstance(local, bool):
    return mask_11LS if local else None
  return mask_11LS | ~local


def _and(mask_a, mask_b):
  return mask_b if mask_a is None else mask_a if mask_b is None else mask_a & mask_b


def rotary(cfg: ModelConfig, x_BLNH: jax.Array, positions_BL: jax.Array, local) -> jax.Array:
  """RoPE with config.rope_scaling's frequencies, or in a local layer of a model with its own
  local base (Gemma 3's rope_local_theta) that base's, unscaled. `local` as in Attention."""
  inv_freq_H, scale = rope.frequencies(cfg, x_BLNH.shape[-1], positions_BL)
  out_BLNH = layers.rope(x_BLNH, positions_BL, cfg.rope_theta, inv_freq_H, scale)
  if not cfg.rope_local_theta or local is False:
    return out_BLNH
  local_BLNH = layers.rope(x_BLNH, positions_BL, cfg.rope_local_theta)
  return local_BLNH if local is True else jnp.where(local, local_BLNH, out_BLNH)


class Attention(nn.Module):
  """Self-attention; K key/value heads shared by groups of N / K query heads.

  `local`: whether this layer attends within config.sliding_window: a Python bool, or in a
  scanned stack whose layers differ a traced one (each attention core then runs under
  `lax.cond`, so the blocked and cuDNN cores still see a static window)."""
  cfg: ModelConfig
  decode: bool = False
  peft: peftlib.Peft = peftlib.NONE
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array | None, positions_BL: jax.Array,
               cache_index: jax.Array | None = None, local=False) -> jax.Array:
    cfg = self.cfg
    n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    hooks = dict(peft=self.peft, deterministic=self.deterministic)
    qkv = dict(hooks, bias=cfg.use_bias or cfg.qkv_bias)
    q_BLNH = layers.dense(cfg, (n, h), (axes.EMBED, axes.HEADS, axes.HEAD_DIM), "q",
                          **qkv)(x_BLD)
    k_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "k",
                          **qkv)(x_BLD)
    v_BLKH = layers.dense(cfg, (k, h), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), "v",
                          **qkv)(x_BLD)
    if cfg.qk_norm:
      q_BLNH = layers.norm(cfg, "q_norm")(q_BLNH)
      k_BLKH = layers.norm(cfg, "k_norm")(k_BLKH)
    if cfg.pos_emb == "rope":
      q_BLNH, k_BLKH = (rotary(cfg, x, positions_BL, local) for x in (q_BLNH, k_BLKH))
    q_BLNH = nn.with_logical_constraint(q_BLNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    # Keys and values whole along the sequence: under context parallelism, gathered.
    k_BLKH, v_BLKH = (nn.with_logical_constraint(x, (axes.BATCH, axes.KV_LENGTH,
                                                     axes.ACT_KV_HEADS, None))
                      for x in (k_BLKH, v_BLKH))
    # None: jax's own 1 / sqrt(H), so models without query_pre_attn_scalar keep their numerics.
    scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    length, window = x_BLD.shape[1], cfg.sliding_window
    if self.decode:
      # The decode mask already holds causality and padding; cuDNN's fused path takes neither.
      k_BSKH, v_BSKH = self._cached(k_BLKH, v_BLKH, cache_index)
      if window:
        mask_B1LS = _and(mask_B1LS, _when(local, window_mask(
            cache_index + jnp.arange(length), k_BSKH.shape[1], window)))
      if self.peft.prefix_length:
        k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BSKH, v_BSKH, mask_B1LS, False, length)
      out_BLNH = self._explicit(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale)
    elif self.peft.prefix_length:  # keys no longer line up with queries: an explicit mask
      if window:  # over the tokens' own slots; every query sees the whole prefix
        mask_B1LS = _and(mask_B1LS, _when(local, window_mask(jnp.arange(length), length,
                                                             window)))
        if mask_B1LS is not None:  # the prefix's columns are per row
          mask_B1LS = jnp.broadcast_to(mask_B1LS, (x_BLD.shape[0],) + mask_B1LS.shape[1:])
      k_BSKH, v_BSKH, mask_B1LS = self._prefixed(k_BLKH, v_BLKH, mask_B1LS, cfg.causal, length)
      out_BLNH = self._explicit(q_BLNH, k_BSKH, v_BSKH, mask_B1LS, scale)
    else:
      out_BLNH = self._core(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, local, scale)
    out_BLNH = nn.with_logical_constraint(out_BLNH,
                                          (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return layers.dense(cfg, cfg.d_model, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), "o",
                        axis=(-2, -1), std=cfg.init_std / (2 * cfg.n_layers) ** 0.5,
                        bias=cfg.use_bias or cfg.o_bias, **hooks)(out_BLNH)

  def _core(self, q_BLNH, k_BLKH, v_BLKH, mask_B1LS, local, scale) -> jax.Array:
    """The attention core of `implementation`, with this layer's window if it is local."""
    cfg = self.cfg
    impl = implementation(cfg, q_BLNH.shape[1])
    if impl == "splash" and (self.peft.prompt_length or splash.context_shards() > 1
                             or BRANCHED.get()):
      # The prompt's columns (or branches) make the mask more than same-segment, which is all
      # splash takes; under context parallelism splash is refused for now (models/splash.py).
      if cfg.attention_impl == "auto":
        impl = "xla"
      elif BRANCHED.get():
        raise ConfigError("config.model.attention_impl='splash' cannot run the branch mask of "
                          "config.task.share_prompt=True; use 'xla', 'blocked', 'cudnn' or 'auto'")
      elif self.peft.prompt_length:
        raise ConfigError("config.model.attention_impl='splash' cannot run prompt tuning's mask "
                          "(config.finetune.method='prompt'); use 'xla' or 'blocked'")

    def run(window: int) -> jax.Array:
      if impl == "splash":
        return splash.splash_attention(cfg, q_BLNH, k_BLKH, v_BLKH, mask_B1LS,
                                       scale or cfg.dim_per_head**-0.5, window)
      if impl == "blocked":
        return blocked_causal_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.attention_block,
                                        scale, cfg.attn_softcap, window)
      if cfg.attn_softcap:  # implementation() never picks cuDNN for capped scores
        return capped_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.causal,
                                scale or cfg.dim_per_head**-0.5, cfg.attn_softcap, window)
      return fused_attention(q_BLNH, k_BLKH, v_BLKH, mask_B1LS, cfg.causal, impl,
                             fallback=cfg.attention_impl == "auto", scale=scale, window=window)

    if isinstance(local, bool) or not cfg.sliding_window:
      return run(cfg.sliding_window if local is True else 0)
    return jax.lax.cond(local, lambda: run(cfg.sliding_window), lambda: run(0))

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
                       **hooks)(memory_BSD), (axes.BATCH, axes.KV_LENGTH, axes.ACT_KV_HEADS,
                                              None))
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
