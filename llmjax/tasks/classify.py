"""`classify`: sequence classification of text, by an encoder (pooled [CLS], BERT's heads) or a
decoder (its last real token), with exact metrics: a confusion matrix summed over batches and
devices, and from it accuracy, precision, recall and F1 (llmjax.eval.metrics)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import flops
from llmjax.config import TaskConfig
from llmjax.errors import ConfigError
from llmjax.eval import metrics, plots
from llmjax.models import heads, rnn
from llmjax.models.apply import apply_model
from llmjax.tasks import encoding
from llmjax.tasks.base import (CountsFlops, Data, Exportable, LossTerms, Prediction, Predicts,
                               SharesBatch, Task, WritesFiles, require_encoder_decoder,
                               require_label_smoothing, require_num_classes, token_batch)

LABELS_FILE = "labels.json"


def recorded_labels(exp, workdir) -> tuple[str, ...] | None:
  """The label set a run fixed: its workdir's labels.json, else config.data.label_names."""
  path = os.path.join(workdir, LABELS_FILE) if workdir else None
  if path and os.path.isfile(path):
    with open(path) as f:
      return tuple(json.load(f)["names"])
  names = [n.strip() for n in exp.data.label_names.split(",") if n.strip()]
  return tuple(names) or None


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(TaskConfig):
  """config.task of `classify`."""
  num_classes: int = 0  # 0 takes the number of labels in the data
  # auto (cls for encoders, last for decoders, mean for RNNs) | cls | last | mean (RNNs)
  pooling: str = dataclasses.field(default="auto",
                                   metadata={"choices": ("auto", "cls", "last", "mean")})
  label_smoothing: float = 0.0

  def validate(self, exp):
    require_encoder_decoder(exp, False)
    require_num_classes(self.num_classes)
    require_label_smoothing(self.label_smoothing)
    pooling_for(self.pooling, exp.model)


def pooling_for(pooling: str, model) -> str:
  """config.task.pooling resolved for the model (a ModelConfig): cls for encoders, last for
  decoders; a recurrent network pools the mean of its outputs, or reads its last states."""
  if model.arch == "rnn":
    if pooling not in ("auto", "mean", "last"):
      raise ConfigError(f"config.task.pooling={pooling!r} does not fit a recurrent network "
                        "(config.model.arch='rnn'); allowed: mean, last or auto (mean)")
    return "mean" if pooling == "auto" else pooling
  causal = model.causal
  if pooling == "mean":
    raise ConfigError("config.task.pooling='mean' is the recurrent networks' "
                      f"(config.model.arch='rnn'); allowed for a Transformer: "
                      f"{'last' if causal else 'cls'} or auto")
  if pooling == "auto":
    return "last" if causal else "cls"
  if (pooling == "cls") == causal:
    raise ConfigError(f"config.task.pooling={pooling!r} does not fit a "
                      f"{'causal decoder' if causal else 'bidirectional encoder'}; allowed: "
                      f"{'last' if causal else 'cls'} or auto")
  return pooling


class LabelTask(Predicts, SharesBatch, WritesFiles, CountsFlops, Exportable, Task):
  """What every classifier shares: labels, the loss and its exact metric sums, the report."""

  def num_classes(self) -> int:
    return self.info.get("num_classes") or self.exp.task.num_classes

  def labelled_prediction(self, out, batch, model_state) -> Prediction:
    """`labelled_terms` with the logits (and hidden states, if `out` carries them)."""
    logits_BC, hidden_BD = out if isinstance(out, tuple) else (out, None)
    return Prediction(self.labelled_terms(logits_BC, batch, model_state), logits_BC,
                      batch["mask"], hidden_BD)

  def labelled_terms(self, logits_BC, batch, model_state) -> LossTerms:
    """Cross-entropy (label-smoothed) summed over real rows (`mask`), confusion and top-5."""
    logits_BC = logits_BC.astype(jnp.float32)
    labels_B, mask_B = batch["labels"], batch["mask"]
    num_classes = logits_BC.shape[-1]
    targets_BC = optax.smooth_labels(jax.nn.one_hot(labels_B, num_classes),
                                     self.exp.task.label_smoothing)
    losses_B = optax.softmax_cross_entropy(logits_BC, targets_BC)
    sums = {"confusion": metrics.confusion_matrix(jnp.argmax(logits_BC, -1), labels_B,
                                                  num_classes, mask_B),
            "top5_correct": metrics.topk_correct(logits_BC, labels_B, min(5, num_classes),
                                                 mask_B)}
    return LossTerms(jnp.sum(losses_B * mask_B), jnp.sum(mask_B), sums, model_state)

  def only_rows(self, batch, keep_B):
    return {**batch, "mask": batch["mask"] * keep_B}

  def report(self, sums):
    examples = float(sums["weight"])
    full = metrics.classification_report(np.asarray(sums["confusion"]),
                                         self.info.get("label_names"))
    out = {"loss": float(sums["loss_sum"]) / max(examples, 1.0), "examples": examples,
           "top5_accuracy": float(sums["top5_correct"]) / max(examples, 1.0)}
    out.update({k: v for k, v in full.items() if isinstance(v, (int, float))})
    out["per_class"] = full["per_class"]
    out["confusion"] = np.asarray(sums["confusion"]).astype(int).tolist()
    return out

  def headline(self, report):
    return (f"final validation accuracy {report['accuracy']:.2%}, macro-F1 "
            f"{report['f1_macro']:.4f}, loss {report['loss']:.4f}")

  def write_report(self, workdir, report, sums, tag):
    path = os.path.join(workdir, "plots", "confusion.png")
    plots.confusion(np.asarray(report["confusion"]), self.info.get("label_names"), path,
                    f"{self.exp.name} {tag}: accuracy {report['accuracy']:.2%}")
    return [path]


class Classify(LabelTask):
  """Text -> one of C labels; reports accuracy, top-5 accuracy, macro/micro/weighted P, R, F1."""
  name = "classify"

  def pooling(self) -> str:
    return pooling_for(self.exp.task.pooling, self.exp.model)

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import labelled
    exp = self.exp
    self.pooling()
    splits = labelled.load_labelled(exp.data, recorded_labels(exp, workdir), exp.task.num_classes)
    tokenizer, artifacts = encoding.run_tokenizer(exp, workdir,
                                                  lambda: [t for t, _ in splits.train])
    specials = encoding.special_ids(tokenizer)
    if self.pooling() == "last":  # a decoder reads the last token: no [CLS] / [SEP] frame
      specials = dict(specials, cls=None, sep=None)
    room = exp.data.seq_len - (specials["cls"] is not None) - (specials["sep"] is not None)

    def rows(examples, shuffle=True):
      if not examples:
        return None
      if shuffle:  # files arrive in order: a capped evaluation (train.eval_batches) must still
        # see every class, so the fixed order is a seeded permutation
        order = np.random.default_rng(exp.data.seed).permutation(len(examples))
        examples = [examples[i] for i in order]
      ids = tokenizer.encode_batch([t for t, _ in examples], add_special_tokens=False)
      out = encoding.framed_rows([i[:room] for i in ids], exp.data.seq_len, specials)
      out["labels"] = np.asarray([label for _, label in examples], np.int32)
      out["mask"] = np.ones(len(examples), np.float32)  # padding rows of eval batches get 0
      return out
    names = list(splits.label_names)
    artifacts = dict(artifacts, **{LABELS_FILE: json.dumps(
        {"names": names, "data": splits.description}, indent=2)})
    info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "label_names": names, "num_classes": len(names)}
    return Data(train=rows(splits.train, shuffle=False), val=rows(splits.val), test=rows(splits.test),
                tokenizer=tokenizer, info=info, artifacts=artifacts)

  def tokens_per_example(self):
    return self.exp.data.seq_len

  def forward_flops_per_example(self):
    return flops.classify_forward(self.exp.model, self.exp.data.seq_len, self.num_classes(),
                                  pooled=self.pooling() == "cls")

  def model(self):
    if self.num_classes() < 2:
      raise ConfigError("config.task.num_classes is unknown before the data is read")
    if self.exp.model.arch == "rnn":  # reads segment_ids_BL or attention_mask_BL alike
      return rnn.RNNClassifier(self.exp.model, num_labels=self.num_classes(),
                               pooling=self.pooling(), peft=self.peft())
    cls = heads.DecoderClassifier if self.pooling() == "last" else heads.SequenceClassifier
    return cls(self.exp.model, num_labels=self.num_classes(), peft=self.peft())

  def example_batch(self, batch_size):
    return {**token_batch(batch_size, self.exp.data.seq_len),
            "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def _logits(self, model, variables, batch, *, rng, train, init=False, hidden=False):
    if self.pooling() == "last":
      kwargs = dict(segment_ids_BL=batch["segment_ids"])
    else:
      kwargs = dict(attention_mask_BL=batch["segment_ids"])
    if init:
      return model.init(variables, batch["tokens"], **kwargs)
    return apply_model(model, variables, batch["tokens"], train=train, rng=rng, hidden=hidden,
                       deterministic=not train, **kwargs)

  def init(self, model, rngs, batch):
    return self._logits(model, rngs, batch, rng=None, train=False, init=True)

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    out, model_state = self._logits(model, variables, batch, rng=rng, train=train, hidden=hidden)
    return self.labelled_prediction(out, batch, model_state)
