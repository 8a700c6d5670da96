"""Encoder-decoder Transformer (the original Transformer, Marian, BART) from the decoder's blocks.

`EncoderDecoder.apply({"params": p}, source_BS, target_BT, source_mask_BS=mask_BS)` returns
logits [B, T, V] for teacher-forced targets. The encoder is the bidirectional form of
`transformer.Block`; a decoder block adds cross-attention over the encoder's output between its
self-attention and its MLP. Token embeddings are one table shared by both stacks and, with
`tie_embeddings`, by the output projection. Pairs may be packed: source and target segment ids
number the pairs of a row (0 is padding), and no attention, self or cross, crosses a pair.

For generation, `encode` runs the source once; `decode(..., decode=True)` then feeds target
tokens against a "cache" collection holding the decoder's keys and values and, written by the
first call (the one given `memory_BSD`), the cross-attention keys and values (`init_cache`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import attention, layers, transformer
from llmjax.models import peft as peftlib
from llmjax.models.apply import HEAD_INPUT
from llmjax.parallel import axes

_ACT = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)


class DecoderBlock(nn.Module):
  """Causal self-attention, cross-attention over the memory, MLP; each a residual sublayer."""
  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False
  peft: peftlib.Peft = peftlib.NONE
  index: int | None = None

  @nn.compact
  def __call__(self, y_BTD, mask_B1TT, positions_BT, cache_index, memory_BSD, cross_mask_B1TS):
    cfg, peft = self.cfg, self.peft
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    self_attn = attention.Attention(cfg, self.decode, peft, self.deterministic, name="attn")
    cross_attn = attention.CrossAttention(cfg, self.decode, peft, self.deterministic,
                                          name="cross_attn")
    mlp = layers.Mlp(cfg, peft, self.deterministic, name="mlp")
    adapt = {s: (layers.Adapter(cfg, peft.adapter_dim, name=f"adapter_{s}")
                 if peft.adapter_on(s, self.index) else (lambda h: h)) for s in ("attn", "mlp")}
    y_BTD = transformer.residual(
        cfg, y_BTD, lambda h: adapt["attn"](self_attn(h, mask_B1TT, positions_BT, cache_index)),
        layers.norm(cfg, "norm1"), drop)
    y_BTD = transformer.residual(cfg, y_BTD, lambda h: cross_attn(h, memory_BSD, cross_mask_B1TS),
                                 layers.norm(cfg, "norm_cross"), drop)
    y_BTD = transformer.residual(cfg, y_BTD, lambda h: adapt["mlp"](mlp(h)),
                                 layers.norm(cfg, "norm2"), drop)
    return nn.with_logical_constraint(y_BTD, _ACT), None


def _inputs(cfg: ModelConfig, x_BLD, positions_BL, deterministic):
  """Embedded tokens + positions (+ norm) + dropout: what a stack's first block sees."""
  x_BLD = x_BLD + transformer.position_embedding(cfg, positions_BL, x_BLD.dtype)
  if cfg.embed_norm:
    x_BLD = layers.norm(cfg, "embed_norm")(x_BLD)
  x_BLD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BLD)
  return nn.with_logical_constraint(x_BLD, _ACT)


class Encoder(nn.Module):
  """Embedded source [B, S, D] -> memory [B, S, D]: bidirectional blocks within each pair."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, x_BSD, segment_ids_BS, deterministic: bool):
    cfg = dataclasses.replace(self.cfg, causal=False)
    positions_BS = transformer.positions_from_segments(segment_ids_BS)
    x_BSD = _inputs(cfg, x_BSD, positions_BS, deterministic)
    x_BSD = transformer.stack(transformer.Block, cfg.n_layers, cfg, self.peft, deterministic,
                              False, x_BSD, attention.segment_mask(segment_ids_BS), positions_BS,
                              None)
    return layers.norm(cfg, "final_norm")(x_BSD) if cfg.final_norm else x_BSD


class Decoder(nn.Module):
  """Embedded target [B, T, D] + memory -> hidden states [B, T, D]."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BT, y_BTD, segment_ids_BT, memory_BSD, source_segment_ids_BS,
               deterministic: bool, decode: bool):
    cfg = self.cfg.decoder_stack()
    positions_BT = None if decode else transformer.positions_from_segments(segment_ids_BT)
    mask_B1TT, positions_BT, cache_index = transformer.Mask(decode, name="mask")(
        tokens_BT, segment_ids_BT, positions_BT)
    y_BTD = _inputs(cfg, y_BTD, positions_BT, deterministic)
    target_segments_BT = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
    cross_B1TS = attention.cross_mask(target_segments_BT, source_segment_ids_BS)
    y_BTD = transformer.stack(DecoderBlock, cfg.n_decoder_layers or cfg.n_layers, cfg, self.peft,
                              deterministic, decode, y_BTD, mask_B1TT, positions_BT, cache_index,
                              memory_BSD, cross_B1TS)
    return layers.norm(cfg, "final_norm")(y_BTD) if cfg.final_norm else y_BTD


def _segments(mask_or_ids, shape) -> jax.Array:
  """Segment ids from a 1/0 padding mask or packed ids; all ones when neither is given."""
  if mask_or_ids is None:
    return jnp.ones(shape, jnp.int32)
  return jnp.asarray(mask_or_ids).astype(jnp.int32)


class EncoderDecoder(nn.Module):
  """(source [B, S], target [B, T]) -> logits [B, T, V]."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  def setup(self):
    cfg = self.cfg
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                          embedding_init=layers.init_normal(cfg.init_std, (axes.VOCAB, axes.EMBED)))
    self.encoder = Encoder(cfg, self.peft)
    self.decoder = Decoder(cfg, self.peft)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype,
                              param_dtype=param_dtype, kernel_init=layers.init_normal(
                                  cfg.init_std, (axes.EMBED, axes.VOCAB)))
    if cfg.final_logits_bias:
      self.final_logits_bias = self.param(
          "final_logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, (axes.VOCAB,)),
          (cfg.vocab_size,), param_dtype)

  def example_input(self) -> tuple[jax.Array, jax.Array]:
    """(source, target) token shapes for abstract init (hf.abstract_variables)."""
    length = min(8, self.cfg.max_len)
    return jnp.zeros((1, length), jnp.int32), jnp.zeros((1, length), jnp.int32)

  def _embed(self, tokens_BL) -> jax.Array:
    x_BLD = self.embed(tokens_BL)
    return x_BLD * self.cfg.d_model ** 0.5 if self.cfg.embed_scale else x_BLD

  def __call__(self, source_BS, target_BT, *, source_mask_BS=None, target_mask_BT=None,
               source_segment_ids_BS=None, target_segment_ids_BT=None,
               deterministic: bool = True, return_hidden: bool = False):
    """Teacher-forced logits. Padding: `source_mask_BS` / `target_mask_BT` (1 real, 0 pad);
    packed pairs: `*_segment_ids` (pair 1, 2, ... of the row; 0 pad) instead of the masks."""
    source_ids_BS = _segments(source_mask_BS if source_segment_ids_BS is None
                              else source_segment_ids_BS, source_BS.shape)
    target_ids_BT = _segments(target_mask_BT if target_segment_ids_BT is None
                              else target_segment_ids_BT, target_BT.shape)
    memory_BSD = self.encode(source_BS, source_segment_ids_BS=source_ids_BS,
                             deterministic=deterministic)
    return self.decode(target_BT, memory_BSD, source_ids_BS, target_segment_ids_BT=target_ids_BT,
                       deterministic=deterministic, return_hidden=return_hidden)

  def encode(self, source_BS, *, source_segment_ids_BS=None, deterministic: bool = True):
    """Source tokens -> memory [B, S, D] (the encoder's output)."""
    ids_BS = _segments(source_segment_ids_BS, source_BS.shape)
    return self.encoder(self._embed(source_BS), ids_BS, deterministic)

  def decode(self, target_BT, memory_BSD, source_segment_ids_BS, *, target_segment_ids_BT=None,
             deterministic: bool = True, decode: bool = False, return_hidden: bool = False):
    """Target tokens against the memory -> logits [B, T, V]. With `decode`, the cache holds the
    earlier target tokens; `memory_BSD` is needed by the first such call only (None after)."""
    y_BTD = self.decoder(target_BT, self._embed(target_BT), target_segment_ids_BT, memory_BSD,
                         source_segment_ids_BS, deterministic, decode)
    if return_hidden:
      return y_BTD
    self.sow("intermediates", HEAD_INPUT, y_BTD)  # what the output layer reads (distillation)
    logits_BTV = self.embed.attend(y_BTD) if self.cfg.tie_embeddings else self.lm_head(y_BTD)
    if self.cfg.final_logits_bias:
      logits_BTV = logits_BTV + self.final_logits_bias.astype(logits_BTV.dtype)[None, None]
    return nn.with_logical_constraint(logits_BTV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))

  def init_all(self, source_BS, target_BT):
    """Every variable, the cache included: `init` with method=init_all (see `init_cache`)."""
    memory_BSD = self.encode(source_BS)
    return self.decode(target_BT, memory_BSD, jnp.ones_like(source_BS), decode=True)


def init_cache(model: EncoderDecoder, batch: int, source_length: int,
               target_length: int) -> dict:
  """An empty decode cache for `batch` rows: decoder keys/values for `target_length` tokens and
  cross-attention keys/values for `source_length` source tokens (written by the prefill)."""
  source_BS = jnp.zeros((batch, source_length), jnp.int32)
  target_BT = jnp.zeros((batch, target_length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), source_BS, target_BT,
                                             method=EncoderDecoder.init_all))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
