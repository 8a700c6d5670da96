"""`seq2seq`: an encoder-decoder trained on parallel text (translation), teacher-forced with
label smoothing on packed pairs; evaluated by loss and, from decoded translations, corpus BLEU and
chrF (sacrebleu); `translations.txt` and `translation_scores.json` (with the copy-the-source and
nearest-neighbour baselines) at the end of a run."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from flax import linen as nn

from llmjax import flops, generate
from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.errors import ConfigError
from llmjax.eval import bleu, translation_baselines
from llmjax.models.apply import apply_model
from llmjax.models.encoder_decoder import EncoderDecoder
from llmjax.objectives import seq2seq as objective
from llmjax.tasks import decoded
from llmjax.tasks.base import (CountsFlops, Data, DecodedReport, Exportable, LossTerms, Outputs,
                               Prediction, Predicts, Task, Translates, WritesFiles,
                               require_encoder_decoder, require_label_smoothing)

CORPUS_FILE, TRANSLATIONS_FILE, SCORES_FILE = "corpus.json", "translations.txt", \
    "translation_scores.json"
DECODE_BATCH = 64  # sources decoded together (the last batch is padded: one compiled shape)


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(TaskConfig):
  """config.task of `seq2seq`: the loss and decoding (evaluation, translations.txt, `llmjax
  translate` defaults)."""
  label_smoothing: float = 0.0
  num_beams: int = 4  # 1: greedy
  length_penalty: float = 1.0  # beam scores are sum log p / length ** length_penalty
  early_stopping: bool = False  # stop a row once num_beams hypotheses have finished
  max_new_tokens: int = 0  # 0: data.seq_len
  bleu_examples: int = 256  # validation pairs translated at each evaluation (0: none)

  def validate(self, exp):
    require_encoder_decoder(exp, True)
    require_label_smoothing(self.label_smoothing)
    require(self.num_beams >= 1,
            f"config.task.num_beams must be >= 1 (1 is greedy), got {self.num_beams}")
    m = exp.model
    require(0 <= self.max_new_tokens <= m.max_len,
            f"config.task.max_new_tokens must be in [0, config.model.max_len={m.max_len}] (0: "
            f"data.seq_len), got {self.max_new_tokens}")


class Seq2Seq(Predicts, DecodedReport, Translates, WritesFiles, CountsFlops, Exportable,
              Task):
  """Source text -> target text; reports loss, perplexity, token accuracy, BLEU and chrF."""
  name = "seq2seq"

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import parallel_text, seq2seq_rows, tokenizers
    d = self.exp.data
    corpus = parallel_text.load_parallel(d)
    # One joint vocabulary for both languages: the embeddings are shared by both stacks.
    tokenizer, artifacts = tokenizers.for_run(
        d.tokenizer, workdir, lambda: [text for pair in corpus.train for text in pair])
    special = seq2seq_rows.SpecialIds.of(tokenizer)
    rng = np.random.default_rng(d.seed)
    splits, dropped = {}, {}
    for name, pairs in (("train", corpus.train), ("val", corpus.val), ("test", corpus.test)):
      if name == "train":  # packing neighbours: a seeded shuffle, not the files' order
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
      sources = seq2seq_rows.encode_source(tokenizer, [s for s, _ in pairs], special.eos)
      targets = seq2seq_rows.encode_target(tokenizer, [t for _, t in pairs], special.eos)
      splits[name], dropped[name] = seq2seq_rows.to_rows(sources, targets, d.seq_len, special,
                                                        pack=d.pack)
    info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "pad_id": special.pad, "eos_id": special.eos, "start_id": special.start,
            "pairs": {k: len(v) for k, v in (("train", corpus.train), ("val", corpus.val),
                                             ("test", corpus.test))},
            "rows": {k: int(len(v["source"])) for k, v in splits.items()},
            "too_long_for_rows": dropped}
    artifacts = {**artifacts, CORPUS_FILE: json.dumps(corpus.manifest, indent=2)}
    return Data(train=splits["train"], val=splits["val"],
                test=splits["test"] if corpus.test else None, tokenizer=tokenizer, info=info,
                artifacts=artifacts,
                texts={"train": corpus.train, "val": corpus.val, "test": corpus.test})

  def model(self):
    peft = self.peft()
    if peft.prompt_length or peft.prefix_length:
      raise ConfigError(f"config.finetune.method={self.exp.finetune.method!r} is not supported "
                        "for seq2seq; allowed: full, freeze, bitfit, lora, adalora, adapter")
    return EncoderDecoder(self.exp.model, peft)

  def example_batch(self, batch_size):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import seq2seq_rows
    shape = (batch_size, self.exp.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jax.numpy.int32) for k in seq2seq_rows.ROW_KEYS}

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["source"], batch["target_in"])

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    out, model_state = apply_model(
        model, variables, batch["source"], batch["target_in"], train=train, rng=rng,
        hidden=hidden, source_segment_ids_BS=batch["source_segment_ids"],
        target_segment_ids_BT=batch["target_segment_ids"], deterministic=not train)
    logits_BTV, hidden_BTD = out if hidden else (out, None)
    mask_BT = batch["target_segment_ids"] != 0
    sums = objective.smoothed_cross_entropy_sums(logits_BTV, batch["target_out"], mask_BT,
                                                 self.exp.task.label_smoothing)
    terms = LossTerms(sums["loss_sum"], sums["weight"],
                      {"nll_sum": sums["nll_sum"], "correct": sums["correct"]}, model_state)
    return Prediction(terms, logits_BTV, mask_BT, hidden_BTD)

  def report(self, sums):
    tokens = max(float(sums["weight"]), 1.0)
    nll = float(sums["nll_sum"]) / tokens
    return {"loss": float(sums["loss_sum"]) / tokens, "nll": nll,
            "perplexity": math.exp(min(nll, 50.0)),
            "token_accuracy": float(sums["correct"]) / tokens, "tokens": float(sums["weight"])}

  def decoded_report(self, model, get_params, data, split, limit=None):
    limit = self.exp.task.bleu_examples if limit is None else limit
    return decoded.report(
        get_params, data, split, limit,
        lambda params, sources: self.translate(model, params, data.tokenizer, sources),
        lambda hypotheses, references: {**bleu.corpus_scores(hypotheses, references),
                                        "translated": len(references)})

  def decoded_keys(self):
    return ("bleu", "chrf", "translated") if self.exp.task.bleu_examples else ()

  def translate(self, model, params, tokenizer, sources: list[str], **settings) -> list[str]:
    """Texts -> translations with the run's decoding settings (config.task), `settings`
    (num_beams, length_penalty, early_stopping, max_new_tokens) overriding them."""
    return translate_texts(model, params, tokenizer, sources, width=self.exp.data.seq_len,
                           special=self.special_ids(), **{**self.decode_settings(), **settings})

  def decode_settings(self) -> dict:
    t = self.exp.task
    return dict(num_beams=t.num_beams, length_penalty=t.length_penalty,
                early_stopping=t.early_stopping,
                max_new_tokens=t.max_new_tokens or self.exp.data.seq_len)

  def special_ids(self):
    """pad, EOS and decoder start of the run's vocabulary (recorded in task_info.json)."""
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import seq2seq_rows
    return seq2seq_rows.SpecialIds(self.info["pad_id"], self.info["eos_id"], self.info["start_id"])

  def headline(self, report):
    line = f"final validation loss {report['loss']:.4f}, perplexity {report['perplexity']:.2f}"
    if "bleu" in report:
      line += f", BLEU {report['bleu']:.2f}, chrF {report['chrf']:.2f}"
    return line

  def tokens_per_example(self):
    return 2 * self.exp.data.seq_len  # source and target slots

  def forward_flops_per_example(self):
    length = self.exp.data.seq_len
    return flops.encoder_decoder_forward(self.exp.model, length, length)

  def finish(self, outputs: Outputs):
    """translations.txt and translation_scores.json on the test split (validation if none):
    the model's BLEU/chrF beside copy-the-source and nearest-neighbour retrieval."""
    texts = outputs.data.texts
    split = "test" if texts.get("test") else "val"
    pairs = texts.get(split) or []
    if not pairs:
      return []
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    hypotheses = self.translate(outputs.model, outputs.params, outputs.data.tokenizer, sources)
    translations = os.path.join(outputs.workdir, TRANSLATIONS_FILE)
    with open(translations, "w") as f:
      for source, reference, hypothesis in zip(sources, references, hypotheses):
        f.write(f"source     {source}\nreference  {reference}\nhypothesis {hypothesis}\n\n")
    scores = {"split": split, "pairs": len(pairs),
              "model": bleu.corpus_scores(hypotheses, references),
              "copy_source": bleu.corpus_scores(translation_baselines.copy_source(sources),
                                                references),
              "nearest_neighbour": bleu.corpus_scores(
                  translation_baselines.nearest_neighbour(texts["train"], sources), references)}
    path = os.path.join(outputs.workdir, SCORES_FILE)
    with open(path, "w") as f:
      json.dump(scores, f, indent=2)
    return [translations, path]


def translate_texts(model, params, tokenizer, sources: list[str], *, width: int,
                    max_new_tokens: int, num_beams: int, length_penalty: float,
                    early_stopping, special) -> list[str]:
  """Texts -> decoded texts, DECODE_BATCH at a time (sources cut to `width` tokens)."""
  # deferred: grain and tensorflow-datasets stay off the model-only import path
  from llmjax.data import seq2seq_rows
  ids = seq2seq_rows.encode_source(tokenizer, sources, special.eos)
  out = []
  for start in range(0, len(ids), DECODE_BATCH):
    chunk = ids[start:start + DECODE_BATCH]
    padded = chunk + [np.asarray([special.eos], np.int32)] * (DECODE_BATCH - len(chunk))
    tokens_BS, mask_BS = seq2seq_rows.source_batch(padded, width, special.pad)
    with nn.logical_axis_rules(()):  # host params on one device: no activation sharding
      new_BN = np.asarray(generate.translate(
          model, params, tokens_BS, source_mask_BS=mask_BS, max_new_tokens=max_new_tokens,
          num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
          eos_ids=[special.eos], decoder_start_id=special.start, pad_id=special.pad))
    for row in new_BN[:len(chunk)]:
      ends = np.flatnonzero(row == special.eos)
      out.append(tokenizer.decode(row[:ends[0]] if ends.size else row))
  return out
