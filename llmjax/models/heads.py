"""BERT-style heads around the encoder form of the Transformer: pooler, masked-LM (alone or with
the next-sentence / sentence-order head of BERT's pretraining), classifier.

Each wraps `Transformer` (params under "encoder") rather than forking it, so the encoder's
parameter tree, sharding and presets are the ones every other model uses. Attention follows
Hugging Face's BERT: an `attention_mask_BL` (1 real, 0 padding) hides padding keys, positions
count from 0 at the first column whatever the padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
from llmjax.models import peft as peftlib
from llmjax.models.apply import HEAD_INPUT
from llmjax.models.transformer import Transformer
from llmjax.parallel import axes


def _encode(cfg: ModelConfig, peft, tokens_BL, attention_mask_BL, token_types_BL, deterministic):
  """(encoder module, hidden states [B, L, D]) with Hugging Face's padding semantics."""
  encoder = Transformer(cfg, peft, name="encoder")
  positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  # Segment ids equal to the mask put real queries on exactly the real keys, as HF's key mask
  # does; padding queries see only padding (HF lets them see real keys), outputs nobody reads.
  hidden_BLD = encoder(tokens_BL, segment_ids_BL=attention_mask_BL, positions_BL=positions_BL,
                       token_types_BL=token_types_BL, deterministic=deterministic,
                       return_hidden=True)
  return encoder, hidden_BLD


class Pooler(nn.Module):
  """tanh(dense(first token)): BERT's sentence vector."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden_BLD: jax.Array) -> jax.Array:
    dense = layers.dense(self.cfg, self.cfg.d_model, (axes.EMBED, None), "dense")
    return jnp.tanh(dense(hidden_BLD[:, 0]))


class Encoder(nn.Module):
  """Hugging Face `BertModel`: tokens -> (hidden states [B, L, D], pooled [B, D] or None)."""
  cfg: ModelConfig
  pooler: bool = True
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, attention_mask_BL=None, token_types_BL=None,
               deterministic: bool = True):
    _, hidden_BLD = _encode(self.cfg, self.peft, tokens_BL, attention_mask_BL, token_types_BL,
                            deterministic)
    pooled_BD = Pooler(self.cfg, name="pooler")(hidden_BLD) if self.pooler else None
    return hidden_BLD, pooled_BD


def _masked_lm_logits(module: nn.Module, cfg: ModelConfig, encoder, hidden_BLD) -> jax.Array:
  """BERT's masked-LM head in `module`'s scope: dense + act + LayerNorm, then the (tied) decoder
  + bias -> logits [B, L, V]."""
  h_BLD = layers.dense(cfg, cfg.d_model, (axes.EMBED, None), "transform")(hidden_BLD)
  h_BLD = layers.norm(cfg, "transform_norm")(layers.ACTIVATIONS[cfg.mlp](h_BLD))
  dtype = layers.dtype_of(cfg.dtype)
  if cfg.tie_embeddings:
    table_VD = nn.unbox(encoder.variables["params"]["embed"]["embedding"])
    logits_BLV = jnp.einsum("bld,vd->blv", h_BLD.astype(dtype), table_VD.astype(dtype))
  else:
    logits_BLV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, name="decoder",
                          param_dtype=layers.dtype_of(cfg.param_dtype),
                          kernel_init=layers.init_normal(cfg.init_std,
                                                         (axes.EMBED, axes.VOCAB)))(h_BLD)
  bias_V = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (axes.VOCAB,)),
                        (cfg.vocab_size,), layers.dtype_of(cfg.param_dtype))
  logits_BLV = logits_BLV + bias_V.astype(dtype)[None, None]
  return nn.with_logical_constraint(logits_BLV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))


class MaskedLM(nn.Module):
  """Hugging Face `BertForMaskedLM`: dense + act + LayerNorm, then the (tied) decoder + bias."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, attention_mask_BL=None, token_types_BL=None,
               deterministic: bool = True):
    encoder, hidden_BLD = _encode(self.cfg, self.peft, tokens_BL, attention_mask_BL,
                                  token_types_BL, deterministic)
    self.sow("intermediates", HEAD_INPUT, hidden_BLD)  # the encoder's output (distillation)
    return _masked_lm_logits(self, self.cfg, encoder, hidden_BLD)


class PreTraining(nn.Module):
  """Hugging Face `BertForPreTraining`: the masked-LM head, and a pair head on the pooled [CLS]
  vector (next-sentence or sentence-order prediction) -> (logits [B, L, V], pair logits [B, 2])."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, attention_mask_BL=None, token_types_BL=None,
               deterministic: bool = True):
    cfg = self.cfg
    encoder, hidden_BLD = _encode(cfg, self.peft, tokens_BL, attention_mask_BL, token_types_BL,
                                  deterministic)
    self.sow("intermediates", HEAD_INPUT, hidden_BLD)  # the encoder's output (distillation)
    logits_BLV = _masked_lm_logits(self, cfg, encoder, hidden_BLD)
    pooled_BD = Pooler(cfg, name="pooler")(hidden_BLD)
    pair_B2 = layers.dense(cfg, 2, (axes.EMBED, None), "seq_relationship")(pooled_BD)
    return logits_BLV, pair_B2


class SequenceClassifier(nn.Module):
  """Hugging Face `BertForSequenceClassification`: pooled vector -> dropout -> logits [B, C]."""
  cfg: ModelConfig
  num_labels: int = 2
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, attention_mask_BL=None, token_types_BL=None,
               deterministic: bool = True):
    cfg = self.cfg
    _, hidden_BLD = _encode(cfg, self.peft, tokens_BL, attention_mask_BL, token_types_BL,
                            deterministic)
    pooled_BD = Pooler(cfg, name="pooler")(hidden_BLD)
    self.sow("intermediates", HEAD_INPUT, pooled_BD)  # what the classifier reads (distillation)
    pooled_BD = nn.Dropout(cfg.dropout, deterministic=deterministic)(pooled_BD)
    return layers.dense(cfg, self.num_labels, (axes.EMBED, None), "classifier")(pooled_BD)


class DecoderClassifier(nn.Module):
  """A causal Transformer read at each row's last real token -> logits [B, C].

  The decoder shares this module's scope, so its parameters sit where a causal LM's do (`embed`,
  `layer_0`, ...) and an LM checkpoint loads into it with only `classifier/` new.
  """
  cfg: ModelConfig
  num_labels: int = 2
  peft: peftlib.Peft = peftlib.NONE

  def setup(self):
    self.decoder = Transformer(self.cfg, self.peft)
    nn.share_scope(self, self.decoder)
    self.classifier = layers.dense(self.cfg, self.num_labels, (axes.EMBED, None), "classifier")

  def __call__(self, tokens_BL, *, segment_ids_BL, deterministic: bool = True):
    hidden_BLD = self.decoder(tokens_BL, segment_ids_BL=segment_ids_BL,
                              deterministic=deterministic, return_hidden=True)
    last_B = jnp.maximum(jnp.sum(segment_ids_BL != 0, axis=1) - 1, 0)
    last_BD = jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]
    self.sow("intermediates", HEAD_INPUT, last_BD)  # what the classifier reads (distillation)
    return self.classifier(last_BD)
