"""BERT (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`)
<-> models.heads."""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import HF_ACTIVATION, Architecture, activation, require
from llmjax.models import heads

_CLASSES = {heads.Encoder: "BertModel", heads.MaskedLM: "BertForMaskedLM",
            heads.PreTraining: "BertForPreTraining",
            heads.SequenceClassifier: "BertForSequenceClassification"}
_MLM_HEAD = (heads.MaskedLM, heads.PreTraining)  # the models with cls.predictions
_POOLED = (heads.SequenceClassifier, heads.PreTraining)  # the heads that read the pooler


def from_hf(c) -> dict:
  kind = getattr(c, "position_embedding_type", "absolute") or "absolute"
  require(kind == "absolute", f"bert position_embedding_type {kind!r} is not supported; "
          "supported: absolute")
  require(not getattr(c, "is_decoder", False) and not getattr(c, "add_cross_attention", False),
          "bert as a decoder (is_decoder / add_cross_attention) is not supported")
  return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
              n_heads=c.num_attention_heads, d_ff=c.intermediate_size,
              max_len=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
              norm_eps=c.layer_norm_eps, mlp=activation(c.hidden_act, "bert"),
              dropout=c.hidden_dropout_prob, tie_embeddings=c.tie_word_embeddings)


def to_hf(cfg) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len,
              type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
              hidden_act=HF_ACTIVATION.get(cfg.mlp, cfg.mlp), hidden_dropout_prob=cfg.dropout,
              attention_probs_dropout_prob=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings)


def _layer(hf: str, jx: str, d: int, n: int, h: int, f: int) -> list[m.Tensor]:
  att = f"{hf}.attention"
  out = []
  for name, ours in (("query", "q"), ("key", "k"), ("value", "v")):
    out += [m.linear_to_heads(f"{att}.self.{name}.weight", f"{jx}/attn/{ours}/kernel", d, n, h),
            m.reshaped(f"{att}.self.{name}.bias", f"{jx}/attn/{ours}/bias", (n * h,), (n, h))]
  return out + [
      m.linear_from_heads(f"{att}.output.dense.weight", f"{jx}/attn/o/kernel", n, h, d),
      m.same(f"{att}.output.dense.bias", f"{jx}/attn/o/bias", (d,)),
      *m.layernorm(f"{att}.output.LayerNorm", f"{jx}/norm1", d),
      *m.mlp(f"{hf}.intermediate.dense", f"{hf}.output.dense", f"{jx}/mlp", d, f),
      *m.layernorm(f"{hf}.output.LayerNorm", f"{jx}/norm2", d)]


def tensors(model) -> list[m.Tensor]:
  cfg = model.cfg
  d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.d_ff, cfg.vocab_size
  p = "" if isinstance(model, heads.Encoder) else "bert."  # BertModel's own keys are unprefixed
  emb = f"{p}embeddings"
  out = [m.same(f"{emb}.word_embeddings.weight", "encoder/embed/embedding", (v, d)),
         m.same(f"{emb}.position_embeddings.weight", "encoder/pos_embed/embedding",
                (cfg.max_len, d)),
         m.same(f"{emb}.token_type_embeddings.weight", "encoder/type_embed/embedding",
                (cfg.type_vocab_size, d)),
         *m.layernorm(f"{emb}.LayerNorm", "encoder/embed_norm", d)]
  for i in range(cfg.n_layers):
    out += _layer(f"{p}encoder.layer.{i}", f"encoder/layer_{i}", d, n, h, f)
  if isinstance(model, _POOLED) or getattr(model, "pooler", False) is True:
    out += [m.linear(f"{p}pooler.dense.weight", "pooler/dense/kernel", d, d),
            m.same(f"{p}pooler.dense.bias", "pooler/dense/bias", (d,))]
  if isinstance(model, _MLM_HEAD):
    out += [m.linear("cls.predictions.transform.dense.weight", "transform/kernel", d, d),
            m.same("cls.predictions.transform.dense.bias", "transform/bias", (d,)),
            *m.layernorm("cls.predictions.transform.LayerNorm", "transform_norm", d),
            m.same("cls.predictions.bias", "bias", (v,))]
    if not cfg.tie_embeddings:
      out.append(m.linear("cls.predictions.decoder.weight", "decoder/kernel", v, d))
  if isinstance(model, heads.PreTraining):
    out += [m.linear("cls.seq_relationship.weight", "seq_relationship/kernel", 2, d),
            m.same("cls.seq_relationship.bias", "seq_relationship/bias", (2,))]
  if isinstance(model, heads.SequenceClassifier):
    c = model.num_labels
    out += [m.linear("classifier.weight", "classifier/kernel", c, d),
            m.same("classifier.bias", "classifier/bias", (c,))]
  return out


def ignored(model) -> tuple[str, ...]:
  """Buffers, tied copies, and the heads of the other BERT classes (as transformers skips them)."""
  skip = [r"embeddings\.position_ids$", r"^cls\.predictions\.decoder\.bias$"]
  if not isinstance(model, heads.PreTraining):
    skip.append(r"^cls\.seq_relationship\.")
  if model.cfg.tie_embeddings:
    skip.append(r"^cls\.predictions\.decoder\.weight$")
  if not isinstance(model, _MLM_HEAD):
    skip.append(r"^cls\.predictions\.")
  if not isinstance(model, heads.SequenceClassifier):
    skip.append(r"^classifier\.")
  if isinstance(model, heads.MaskedLM) or (isinstance(model, heads.Encoder) and not model.pooler):
    skip.append(r"(^|\.)pooler\.")
  return tuple(skip)


def _classifier(cfg, hf_config):
  return heads.SequenceClassifier(cfg, num_labels=hf_config.num_labels)


ARCH = Architecture(
    model_type="bert", config_class="BertConfig", prefix="bert.", preset="bert",
    classes={"BertModel": lambda cfg, _: heads.Encoder(cfg),
             "BertForMaskedLM": lambda cfg, _: heads.MaskedLM(cfg),
             "BertForPreTraining": lambda cfg, _: heads.PreTraining(cfg),
             "BertForSequenceClassification": _classifier},
    from_hf=from_hf, to_hf=to_hf,
    # BertModel always has a pooler: an encoder without one has no HF class to become.
    class_of=lambda model: _CLASSES.get(type(model)) if getattr(model, "pooler", True) else None,
    tensors=tensors, ignored=ignored)
