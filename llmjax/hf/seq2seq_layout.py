"""What transformers' BART family (BART, Marian: one fairseq layout) shares, for bart.py and
marian.py: the config fields both read and write, per-layer tensor maps, and the shared
embedding with its copies."""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_ACTIVATION, activation, require


def from_hf(c, model_type: str) -> dict:
  """ModelConfig fields of a BART-family config (the decoder's heads and MLP width its own)."""
  for heads in (c.encoder_attention_heads, c.decoder_attention_heads):
    require(c.d_model % heads == 0, f"{model_type} d_model={c.d_model} is not a multiple of "
            f"{heads} attention heads")
  return dict(vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.encoder_layers,
              n_decoder_layers=c.decoder_layers, n_heads=c.encoder_attention_heads,
              n_decoder_heads=_own(c.decoder_attention_heads, c.encoder_attention_heads),
              d_ff=c.encoder_ffn_dim, d_ff_decoder=_own(c.decoder_ffn_dim, c.encoder_ffn_dim),
              max_len=c.max_position_embeddings,
              mlp=activation(c.activation_function, model_type), dropout=c.dropout,
              embed_scale=bool(c.scale_embedding), tie_embeddings=c.tie_word_embeddings)


def _own(decoder: int, encoder: int) -> int:
  """A decoder setting as ModelConfig stores it: 0 when it is the encoder's."""
  return 0 if decoder == encoder else decoder


def to_hf(cfg) -> dict:
  """BART-family config fields of a ModelConfig (the inverse of `from_hf`)."""
  return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model,
              encoder_layers=cfg.n_layers, decoder_layers=cfg.n_decoder_layers or cfg.n_layers,
              encoder_attention_heads=cfg.n_heads,
              decoder_attention_heads=cfg.n_decoder_heads or cfg.n_heads,
              encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff_decoder or cfg.d_ff,
              max_position_embeddings=cfg.max_len,
              activation_function=HF_ACTIVATION.get(cfg.mlp, cfg.mlp), dropout=cfg.dropout,
              # llmjax drops out embeddings and sublayer outputs (HF's `dropout`) only, never
              # attention probabilities or MLP activations.
              attention_dropout=0.0, activation_dropout=0.0,
              scale_embedding=cfg.embed_scale, tie_word_embeddings=cfg.tie_embeddings,
              # No EOS is forced unless asked for (`save(config_overrides=...)`).
              forced_eos_token_id=None)


def attention(hf: str, jx: str, d: int, n: int, h: int) -> list[m.Tensor]:
  """q/k/v/out_proj torch Linears with biases <-> llmjax attention q, k, v, o."""
  out = []
  for name, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
    out += [m.linear_to_heads(f"{hf}.{name}.weight", f"{jx}/{ours}/kernel", d, n, h),
            m.reshaped(f"{hf}.{name}.bias", f"{jx}/{ours}/bias", (n * h,), (n, h))]
  return out + [m.linear_from_heads(f"{hf}.out_proj.weight", f"{jx}/o/kernel", n, h, d),
                m.same(f"{hf}.out_proj.bias", f"{jx}/o/bias", (d,))]


def layer(hf: str, jx: str, d: int, n: int, h: int, f: int, cross: bool) -> list[m.Tensor]:
  """An encoder layer, or with `cross` a decoder layer (encoder_attn -> cross_attn)."""
  out = attention(f"{hf}.self_attn", f"{jx}/attn", d, n, h)
  out += m.layernorm(f"{hf}.self_attn_layer_norm", f"{jx}/norm1", d)
  if cross:
    out += attention(f"{hf}.encoder_attn", f"{jx}/cross_attn", d, n, h)
    out += m.layernorm(f"{hf}.encoder_attn_layer_norm", f"{jx}/norm_cross", d)
  return out + [*m.mlp(f"{hf}.fc1", f"{hf}.fc2", f"{jx}/mlp", d, f),
                *m.layernorm(f"{hf}.final_layer_norm", f"{jx}/norm2", d)]


def tensors(model) -> list[m.Tensor]:
  """The shared embedding, final_logits_bias ([1, V] buffer <-> [V]), every layer, and the output
  projection when untied: what every BART-family model has."""
  cfg, dec = model.cfg, model.cfg.decoder_stack()
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
  out = [m.same(SHARED, "embed/embedding", (v, d)),
         m.reshaped("final_logits_bias", "final_logits_bias", (1, v), (v,))]
  for i in range(cfg.n_layers):
    out += layer(f"model.encoder.layers.{i}", f"encoder/layer_{i}", d, n, h, f, cross=False)
  for i in range(cfg.n_decoder_layers or cfg.n_layers):
    out += layer(f"model.decoder.layers.{i}", f"decoder/layer_{i}", d, dec.n_heads,
                 dec.dim_per_head, dec.d_ff, cross=True)
  if not cfg.tie_embeddings:
    out.append(m.linear("lm_head.weight", "lm_head/kernel", v, d))
  return out


SHARED = "model.shared.weight"
STACK_EMBEDDINGS = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
# The copies of the shared embedding (`copies` checks them): never read as tables of their own.
COPY_KEYS = (r"^model\.(encoder|decoder)\.embed_tokens\.weight$",)


def ignored_copies(model) -> tuple[str, ...]:
  return COPY_KEYS + ((r"^lm_head\.weight$",) if model.cfg.tie_embeddings else ())


def copies(model) -> dict[str, str]:
  """{HF key: the key it must equal}: the shared embedding's other names. transformers uses a
  file's copy that differs from model.shared.weight as a table of its own (with
  tie_word_embeddings=false each stack's embedding is a parameter of its own; with true it ties
  only equal ones); llmjax has one table, so each copy a file holds must equal it."""
  tied = ("lm_head.weight",) if model.cfg.tie_embeddings else ()
  return dict.fromkeys(STACK_EMBEDDINGS + tied, SHARED)


def written_copies(model) -> dict[str, str]:
  """The copies `save` writes: with tie_word_embeddings=false transformers reads each stack's
  embedding from the file (it would start them at random otherwise), as it writes them itself."""
  return {} if model.cfg.tie_embeddings else dict.fromkeys(STACK_EMBEDDINGS, SHARED)
