"""Marian (`MarianMTModel`, `MarianModel`) <-> models.encoder_decoder.EncoderDecoder.

Marian's sinusoidal position tables are not stored (transformers computes them; its files skip
them), its `final_logits_bias` buffer [1, V] is our `final_logits_bias` [V], and the shared
embedding serves the encoder, the decoder and (tied) the output projection.
"""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_ACTIVATION, Architecture, activation, require
from llmjax.models.encoder_decoder import EncoderDecoder


def from_hf(c) -> dict:
  require(c.share_encoder_decoder_embeddings and c.decoder_vocab_size == c.vocab_size,
          "marian with separate encoder and decoder vocabularies "
          "(share_encoder_decoder_embeddings=false) is not supported")
  for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"),
                   ("encoder_ffn_dim", "decoder_ffn_dim")):
    require(getattr(c, enc) == getattr(c, dec), f"marian with {enc}={getattr(c, enc)} != "
            f"{dec}={getattr(c, dec)} is not supported (one width for both stacks)")
  require(c.d_model % 2 == 0, f"marian d_model={c.d_model} must be even (sinusoidal positions)")
  require(not getattr(c, "normalize_before", False), "marian normalize_before is not supported")
  return dict(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.encoder_layers,
              n_decoder_layers=c.decoder_layers, n_heads=c.encoder_attention_heads,
              d_ff=c.encoder_ffn_dim, max_len=c.max_position_embeddings,
              mlp=activation(c.activation_function, "marian"), dropout=c.dropout,
              embed_scale=bool(c.scale_embedding), tie_embeddings=c.tie_word_embeddings)


def to_hf(cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
              encoder_layers=cfg.n_layers, decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
              encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
              encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
              max_position_embeddings=cfg.max_len,
              activation_function=HF_ACTIVATION.get(cfg.mlp, cfg.mlp), dropout=cfg.dropout,
              # llmjax drops out embeddings and sublayer outputs (HF's `dropout`) only, never
              # attention probabilities or MLP activations (opus-mt's 0.0 for both, too).
              attention_dropout=0.0, activation_dropout=0.0,
              scale_embedding=cfg.embed_scale, tie_word_embeddings=cfg.tie_embeddings,
              share_encoder_decoder_embeddings=True,
              # MarianConfig defaults to opus-mt's ids (58100, 0), outside most vocabularies; an
              # int is required, so Marian's convention (the last id, its pad) stands until the
              # tokenizer's own ids are given (`save(config_overrides=...)`, as export does).
              # No EOS is forced unless asked for.
              decoder_start_token_id=cfg.vocab_size - 1, forced_eos_token_id=None)


def _attention(hf: str, jx: str, d: int, n: int, h: int) -> list[m.Tensor]:
  out = []
  for name, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
    out += [m.linear_to_heads(f"{hf}.{name}.weight", f"{jx}/{ours}/kernel", d, n, h),
            m.reshaped(f"{hf}.{name}.bias", f"{jx}/{ours}/bias", (n * h,), (n, h))]
  return out + [m.linear_from_heads(f"{hf}.out_proj.weight", f"{jx}/o/kernel", n, h, d),
                m.same(f"{hf}.out_proj.bias", f"{jx}/o/bias", (d,))]


def _layer(hf: str, jx: str, d: int, n: int, h: int, f: int, cross: bool) -> list[m.Tensor]:
  out = _attention(f"{hf}.self_attn", f"{jx}/attn", d, n, h)
  out += m.layernorm(f"{hf}.self_attn_layer_norm", f"{jx}/norm1", d)
  if cross:
    out += _attention(f"{hf}.encoder_attn", f"{jx}/cross_attn", d, n, h)
    out += m.layernorm(f"{hf}.encoder_attn_layer_norm", f"{jx}/norm_cross", d)
  return out + [*m.mlp(f"{hf}.fc1", f"{hf}.fc2", f"{jx}/mlp", d, f),
                *m.layernorm(f"{hf}.final_layer_norm", f"{jx}/norm2", d)]


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
  out = [m.same("model.shared.weight", "embed/embedding", (v, d)),
         m.reshaped("final_logits_bias", "final_logits_bias", (1, v), (v,))]
  for i in range(cfg.n_layers):
    out += _layer(f"model.encoder.layers.{i}", f"encoder/layer_{i}", d, n, h, f, cross=False)
  for i in range(cfg.n_decoder_layers or cfg.n_layers):
    out += _layer(f"model.decoder.layers.{i}", f"decoder/layer_{i}", d, n, h, f, cross=True)
  if not cfg.tie_embeddings:
    out.append(m.linear("lm_head.weight", "lm_head/kernel", v, d))
  return out


def ignored(model) -> tuple[str, ...]:
  """Position tables (computed, not learned) and the copies of the shared embedding (`copies`
  checks those)."""
  skip = [r"\.embed_positions\.weight$", r"^model\.(encoder|decoder)\.embed_tokens\.weight$"]
  return tuple(skip + ([r"^lm_head\.weight$"] if model.cfg.tie_embeddings else []))


_SHARED = "model.shared.weight"
_STACK_EMBEDDINGS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def copies(model) -> dict[str, str]:
  """{HF key: the key it must equal}: the shared embedding's other names. transformers uses a
  file's copy that differs from model.shared.weight as a table of its own (with
  tie_word_embeddings=false each stack's embedding is a parameter of its own; with true it ties
  only equal ones); llmjax has one table, so each copy a file holds must equal it."""
  tied = ("lm_head.weight",) if model.cfg.tie_embeddings else ()
  return dict.fromkeys(_STACK_EMBEDDINGS + tied, _SHARED)


def written_copies(model) -> dict[str, str]:
  """The copies `save` writes: with tie_word_embeddings=false transformers reads each stack's
  embedding from the file (it would start them at random otherwise), as it writes them itself."""
  return {} if model.cfg.tie_embeddings else dict.fromkeys(_STACK_EMBEDDINGS, _SHARED)


ARCH = Architecture(
    model_type="marian", config_class="MarianConfig", prefix="model.", preset="marian",
    classes={"MarianMTModel": lambda cfg, _: EncoderDecoder(cfg)},
    from_hf=from_hf, to_hf=to_hf,
    class_of=lambda model: "MarianMTModel" if type(model) is EncoderDecoder else None,
    tensors=tensors, ignored=ignored)
