"""BART (`BartForConditionalGeneration`) <-> models.encoder_decoder.EncoderDecoder.

BART is Marian's layout (seq2seq_layout) with learned positions and a LayerNorm of the summed
embeddings (`layernorm_embedding`, our `embed_norm`) in each stack. transformers'
`BartLearnedPositionalEmbedding` keeps fairseq's offset: its table is [max_position_embeddings
+ 2, d] and position p reads row p + 2, so rows 0-1 are never read. llmjax stores the rows that
are read ([max_len, d]); `save` writes zeros in rows 0-1, so HF -> llmjax -> HF is exact but for
those two unused rows.
"""

from __future__ import annotations

import numpy as np

from llmjax.hf import mapping as m
from llmjax.hf import seq2seq_layout as layout
from llmjax.hf.arch import Architecture, require
from llmjax.models.encoder_decoder import EncoderDecoder

OFFSET = 2  # BartLearnedPositionalEmbedding.offset

# Fields of older BartConfigs (fairseq conversions, mBART-style variants) that today's
# transformers ignores; a checkpoint that set them computes something BART does not.
_LEGACY_FLAGS = ("normalize_before", "add_final_layer_norm", "static_position_embeddings",
                 "add_bias_logits")


def from_hf(c) -> dict:
  for flag in _LEGACY_FLAGS:
    require(not getattr(c, flag, False), f"bart {flag}=true is not supported (an mBART-style or "
            "old fairseq variant; transformers' BART ignores the field)")
  extra = getattr(c, "extra_pos_embeddings", OFFSET)
  require(extra == OFFSET, f"bart extra_pos_embeddings={extra} is not supported (BART's position "
          f"offset is {OFFSET})")
  return layout.from_hf(c, "bart")


def to_hf(cfg) -> dict:
  # BartConfig's own decoder_start_token_id (2, BART's </s>) stands until the tokenizer's ids
  # are given (`save(config_overrides=...)`, as export does).
  return layout.to_hf(cfg)


def offset_positions(key: str, path: str, max_len: int, d: int) -> m.Tensor:
  """HF [max_len + 2, d] (position p at row p + 2) <-> ours [max_len, d]; rows 0-1, which
  nothing reads, are written as zeros."""
  return m.Tensor(key, (path,), (max_len + OFFSET, d), lambda w: (w[OFFSET:],),
                  lambda t: np.concatenate([np.zeros((OFFSET, d), t.dtype), t]))


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  out = layout.tensors(model)
  for stack in ("encoder", "decoder"):
    out += [offset_positions(f"model.{stack}.embed_positions.weight",
                             f"{stack}/pos_embed/embedding", cfg.max_len, cfg.d_model),
            *m.layernorm(f"model.{stack}.layernorm_embedding", f"{stack}/embed_norm", cfg.d_model)]
  return out


ARCH = Architecture(
    model_type="bart", config_class="BartConfig", prefix="model.", preset="bart",
    classes={"BartForConditionalGeneration": lambda cfg, _: EncoderDecoder(cfg)},
    from_hf=from_hf, to_hf=to_hf,
    class_of=lambda model: ("BartForConditionalGeneration" if type(model) is EncoderDecoder
                            else None),
    tensors=tensors, ignored=layout.ignored_copies, copies=layout.copies,
    written_copies=layout.written_copies)
