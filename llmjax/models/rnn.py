"""Recurrent networks (config.model.arch="rnn"): an embedding, a stack of flax recurrent layers
(`nn.RNN` over `nn.OptimizedLSTMCell`, `nn.GRUCell` or `nn.SimpleCell`; `nn.Bidirectional`
when `bidirectional`), dropout between layers, a dense head.

Padding: a row holds its real tokens first and padding (segment id 0) after them, as packed
text and the classifier's rows do. Each row's length goes to `nn.RNN` as `seq_lengths`, so the
backward direction starts at the last real token, a returned state is the one after the last
real token, and no real position ever reads a padded one (the tests check it by gradients).
Generation left-pads its prompts; in decode mode the real tokens are moved to the front first.

Decoding keeps each layer's recurrent state in the "cache" collection, where a Transformer keeps
its keys and values: `RNNLM` takes the Transformer's call keywords, so `llmjax.generate` runs
either through the same prefill-then-one-token loop.

Letters: B batch, L length, D embedding width (d_model), H hidden units (rnn_hidden), E a
layer's output width (H, or 2H both ways), V vocabulary, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
from llmjax.models import peft as peftlib
from llmjax.models.apply import HEAD_INPUT
from llmjax.parallel import axes

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "simple": nn.SimpleCell}


def cell(cfg: ModelConfig) -> nn.RNNCellBase:
  """One layer's cell, flax's own, with logical axis names on its parameters. It computes in
  its parameters' dtype: the recurrent state keeps one dtype across steps. Built unattached
  (parent=None), so the `nn.RNN` it goes into adopts it as `cell`."""
  boxed = nn.with_logical_partitioning
  return CELLS[cfg.rnn_cell](
      features=cfg.rnn_hidden, parent=None, param_dtype=layers.dtype_of(cfg.param_dtype),
      kernel_init=boxed(nn.initializers.lecun_normal(), (axes.RNN_IN, axes.RNN_HIDDEN)),
      recurrent_kernel_init=boxed(nn.initializers.orthogonal(),
                                  (axes.RNN_STATE, axes.RNN_HIDDEN)),
      bias_init=boxed(nn.initializers.zeros, (axes.RNN_HIDDEN,)))


def output_width(cfg: ModelConfig) -> int:
  """E: what each layer (and so the stack) outputs per position."""
  return cfg.rnn_hidden * (2 if cfg.bidirectional else 1)


def zero_state(cfg: ModelConfig, batch: int):
  """One layer's initial state: (c, h) for an LSTM, h otherwise ([B, H] each, zeros); a
  (forward, backward) pair of them both ways."""
  h_BH = jnp.zeros((batch, cfg.rnn_hidden), layers.dtype_of(cfg.param_dtype))
  state = (h_BH, h_BH) if cfg.rnn_cell == "lstm" else h_BH
  return (state, state) if cfg.bidirectional else state


class RNNStack(nn.Module):
  """x [B, L, D] -> (outputs [B, L, E], each layer's last state): `rnn_layers` layers, dropout
  between them. torch's nn.LSTM / nn.GRU (multi-layer, bidirectional) compute the same thing;
  models/rnn_torch.py converts their weights."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, *, lengths_B=None, initial=None, deterministic: bool = True):
    cfg = self.cfg
    states = []
    for i in range(cfg.rnn_layers):
      if i:  # between layers only, as torch applies it
        x_BLD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BLD)
      if cfg.bidirectional:
        layer = nn.Bidirectional(nn.RNN(cell(cfg), parent=None), nn.RNN(cell(cfg), parent=None),
                                 name=f"layer_{i}")
      else:
        layer = nn.RNN(cell(cfg), name=f"layer_{i}")
      state, x_BLD = layer(x_BLD, initial_carry=None if initial is None else initial[i],
                           seq_lengths=lengths_B, return_carry=True)
      x_BLD = nn.with_logical_constraint(x_BLD, (axes.BATCH, axes.LENGTH, None))
      states.append(state)
    return x_BLD, tuple(states)


def _embed(cfg: ModelConfig, tokens_BL):
  # N(0, 1) like torch's nn.Embedding: with lecun-normal input kernels, gates start at unit scale.
  table = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=layers.dtype_of(cfg.dtype),
                   param_dtype=layers.dtype_of(cfg.param_dtype), name="embed",
                   embedding_init=layers.init_normal(1.0, (axes.VOCAB, axes.EMBED)))
  x_BLD = table(tokens_BL)
  return nn.with_logical_constraint(x_BLD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


def _real_first(segment_ids_BL):
  """(order [B, L] putting each row's real tokens first, in order; its inverse)."""
  order_BL = jnp.argsort(segment_ids_BL == 0, axis=1, stable=True)
  return order_BL, jnp.argsort(order_BL, axis=1)


def _gather(x_BL, index_BL):
  index = index_BL.reshape(index_BL.shape + (1,) * (x_BL.ndim - 2))
  return jnp.take_along_axis(x_BL, index, axis=1)


class RNNLM(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (or outputs [B, L, E] with return_hidden): a causal
  recurrent language model that takes the Transformer's call keywords.

  `decode`: start from the states in the "cache" collection and leave the last ones there;
  `last_only`: logits of the last position only; `positions_BL` and `prefill` change nothing
  (the recurrence orders the tokens; the state is all a prompt leaves behind)."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, segment_ids_BL=None, positions_BL=None,
               deterministic: bool = True, return_hidden: bool = False, decode: bool = False,
               last_only: bool = False, prefill: bool = False):
    del positions_BL, prefill
    cfg = self.cfg
    if cfg.bidirectional:
      raise ValueError("a bidirectional RNN cannot be a causal language model")
    lengths_B, inverse_BL, initial = None, None, None
    if decode:
      batch = tokens_BL.shape[0]
      cache = self.variable("cache", "state",
                            lambda: tuple(zero_state(cfg, batch) for _ in range(cfg.rnn_layers)))
      initial = cache.value
      if segment_ids_BL is not None:  # left-padded prompts: real tokens first, then lengths
        order_BL, inverse_BL = _real_first(segment_ids_BL)
        tokens_BL = _gather(tokens_BL, order_BL)
        lengths_B = jnp.sum(segment_ids_BL != 0, axis=1)
    x_BLD = _embed(cfg, tokens_BL)
    y_BLE, states = RNNStack(cfg, name="rnn")(x_BLD, lengths_B=lengths_B, initial=initial,
                                              deterministic=deterministic)
    if decode:
      cache.value = states
      if inverse_BL is not None:
        y_BLE = _gather(y_BLE, inverse_BL)
    if last_only:
      y_BLE = y_BLE[:, -1:]
    if return_hidden:
      return y_BLE
    self.sow("intermediates", HEAD_INPUT, y_BLE)  # what the output layer reads (distillation)
    logits_BLV = layers.dense(cfg, cfg.vocab_size, (axes.RNN_OUT, axes.VOCAB), "lm_head",
                              peft=self.peft, deterministic=deterministic)(y_BLE)
    return nn.with_logical_constraint(logits_BLV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))


class RNNClassifier(nn.Module):
  """tokens [B, L] -> logits [B, C]: the recurrent stack (both ways if `bidirectional`), pooled
  over each row's real positions: `mean` of the outputs, or `last` (the forward direction after
  the last real token; with a backward direction, its state after the first), then dropout and
  a dense classifier. The real positions are the nonzero ones of `segment_ids_BL` or
  `attention_mask_BL` (whichever the task passes)."""
  cfg: ModelConfig
  num_labels: int = 2
  pooling: str = "mean"
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, segment_ids_BL=None, attention_mask_BL=None,
               deterministic: bool = True):
    cfg = self.cfg
    mask_BL = segment_ids_BL if segment_ids_BL is not None else attention_mask_BL
    real_BL = jnp.ones(tokens_BL.shape, bool) if mask_BL is None else mask_BL != 0
    lengths_B = jnp.sum(real_BL, axis=1)
    y_BLE, _ = RNNStack(cfg, name="rnn")(_embed(cfg, tokens_BL), lengths_B=lengths_B,
                                         deterministic=deterministic)
    pooled_BE = pool(y_BLE, real_BL, self.pooling, cfg.rnn_hidden)
    self.sow("intermediates", HEAD_INPUT, pooled_BE)  # what the classifier reads (distillation)
    pooled_BE = nn.Dropout(cfg.dropout, deterministic=deterministic)(pooled_BE)
    return layers.dense(cfg, self.num_labels, (axes.RNN_OUT, None), "classifier",
                        peft=self.peft, deterministic=deterministic)(pooled_BE)


def pool(y_BLE: jax.Array, real_BL: jax.Array, pooling: str, hidden: int) -> jax.Array:
  """[B, E] per row from the real positions only (module docstring of RNNClassifier)."""
  lengths_B = jnp.sum(real_BL, axis=1)
  if pooling == "mean":
    total_BE = jnp.sum(jnp.where(real_BL[..., None], y_BLE, 0.0), axis=1)
    return total_BE / jnp.maximum(lengths_B, 1)[:, None].astype(total_BE.dtype)
  if pooling != "last":
    raise ValueError(f"unknown RNN pooling {pooling!r}; allowed: mean, last")
  last_B = jnp.maximum(lengths_B - 1, 0)
  last_BE = jnp.take_along_axis(y_BLE, last_B[:, None, None], axis=1)[:, 0]
  if y_BLE.shape[-1] == hidden:
    return last_BE
  # both ways: the forward half after the last real token, the backward half after the first
  return jnp.concatenate([last_BE[:, :hidden], y_BLE[:, 0, hidden:]], axis=-1)
