"""Marian (`MarianMTModel`) <-> models.encoder_decoder.EncoderDecoder.

Marian's sinusoidal position tables are not stored (transformers computes them; its files skip
them), its `final_logits_bias` buffer [1, V] is our `final_logits_bias` [V], and the shared
embedding serves the encoder, the decoder and (tied) the output projection. The layer layout is
BART's (seq2seq_layout).
"""

from __future__ import annotations

from llmjax.hf import seq2seq_layout as layout
from llmjax.hf.arch import Architecture, require
from llmjax.models.encoder_decoder import EncoderDecoder


def from_hf(c) -> dict:
  require(c.share_encoder_decoder_embeddings and c.decoder_vocab_size == c.vocab_size,
          "marian with separate encoder and decoder vocabularies "
          "(share_encoder_decoder_embeddings=false) is not supported")
  fields = layout.from_hf(c, "marian")
  require(c.d_model % 2 == 0, f"marian d_model={c.d_model} must be even (sinusoidal positions)")
  require(not getattr(c, "normalize_before", False), "marian normalize_before is not supported")
  return fields


def to_hf(cfg) -> dict:
  return dict(layout.to_hf(cfg), decoder_vocab_size=cfg.vocab_size,
              share_encoder_decoder_embeddings=True,
              # MarianConfig defaults to opus-mt's ids (58100, 0), outside most vocabularies; an
              # int is required, so Marian's convention (the last id, its pad) stands until the
              # tokenizer's own ids are given (`save(config_overrides=...)`, as export does).
              decoder_start_token_id=cfg.vocab_size - 1)


def ignored(model) -> tuple[str, ...]:
  """Position tables (computed, not learned) and the copies of the shared embedding
  (`seq2seq_layout.copies` checks those)."""
  return (r"\.embed_positions\.weight$",) + layout.ignored_copies(model)


ARCH = Architecture(
    model_type="marian", config_class="MarianConfig", prefix="model.", preset="marian",
    classes={"MarianMTModel": lambda cfg, _: EncoderDecoder(cfg)},
    from_hf=from_hf, to_hf=to_hf,
    class_of=lambda model: "MarianMTModel" if type(model) is EncoderDecoder else None,
    tensors=layout.tensors, ignored=ignored, copies=layout.copies,
    written_copies=layout.written_copies)
