"""`lm`: causal language modelling on packed text (next token within a document)."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import flops, generate
from llmjax.config import TaskConfig
from llmjax.models.apply import apply_model
from llmjax.models.rnn import RNNLM
from llmjax.models.transformer import Transformer
from llmjax.objectives import lm as lm_objective
from llmjax.config_checks import require
from llmjax.tasks.base import (CountsFlops, Data, Exportable, LossTerms, Outputs, Prediction,
                               Predicts, SharesBatch, Task, WritesFiles, require_encoder_decoder,
                               token_batch)


@dataclasses.dataclass(frozen=True)
class LMConfig(TaskConfig):
  """config.task of `lm`: no options of its own (sampling is config.train's)."""

  def validate(self, exp):
    require_encoder_decoder(exp, False)
    require(not exp.model.bidirectional,
            "config.model.bidirectional=True cannot train a causal language model (task lm): "
            "the backward direction would read the tokens it predicts; allowed: False")


# The decoder each config.model.arch names (a Transformer for every other text arch).
DECODERS = {"rnn": RNNLM}


class LM(Predicts, SharesBatch, WritesFiles, CountsFlops, Exportable, Task):
  """A decoder (Transformer or RNN) trained to predict each next token; reports loss, perplexity,
  bits/byte."""
  name = "lm"

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import text
    corpus = text.load_corpus(self.exp.data, workdir)
    return Data(train=corpus.train, val=corpus.val, test=None, tokenizer=corpus.tokenizer,
                info={"tokenizer": corpus.tokenizer.name,
                      "vocab_size": corpus.tokenizer.vocab_size},
                artifacts=corpus.artifacts)

  def model(self):
    return DECODERS.get(self.exp.model.arch, Transformer)(self.exp.model, self.peft())

  def example_batch(self, batch_size):
    return token_batch(batch_size, self.exp.data.seq_len)

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["tokens"])

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
    targets_BL, loss_mask_BL = lm_objective.next_token_targets(tokens_BL, segment_ids_BL)
    if "weights" in batch:  # optional per-example weights [B]
      loss_mask_BL = loss_mask_BL * batch["weights"][:, None]
    out, model_state = apply_model(model, variables, tokens_BL, train=train, rng=rng,
                                   hidden=hidden, segment_ids_BL=segment_ids_BL,
                                   deterministic=not train)
    logits_BLV, hidden_BLD = out if hidden else (out, None)
    loss_sum, count = lm_objective.cross_entropy_sum(logits_BLV, targets_BL, loss_mask_BL)
    return Prediction(LossTerms(loss_sum, count, {}, model_state), logits_BLV, loss_mask_BL,
                      hidden_BLD)

  def only_rows(self, batch, keep_B):
    return {**batch, "weights": batch.get("weights", 1.0) * keep_B}

  def report(self, sums):
    tokens = float(sums["weight"])
    loss = float(sums["loss_sum"]) / max(tokens, 1.0)
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if self.info.get("tokenizer") == "byte":
      metrics["bits_per_byte"] = loss / math.log(2)
    return metrics

  def headline(self, report):
    unit = "nats/byte" if self.info.get("tokenizer") == "byte" else "nats/token"
    line = f"final validation loss {report['loss']:.4f} {unit}"
    if "bits_per_byte" in report:
      line += f" ({report['bits_per_byte']:.3f} bits/byte)"
    return line

  def tokens_per_example(self):
    return self.exp.data.seq_len

  def forward_flops_per_example(self):
    return flops.lm_forward(self.exp.model, self.exp.data.seq_len)

  def finish(self, outputs: Outputs):
    path = os.path.join(outputs.workdir, "samples.txt")
    write_samples(self.exp, outputs.model, outputs.params, outputs.data, path)
    return [path]


def write_samples(exp, model, params, data: Data, path: str) -> None:
  """Continue a few validation prompts and write prompt + continuation as text."""
  t = exp.train
  n_new = min(t.sample_tokens, exp.model.max_len // 2)
  prompt_len = min(64, exp.model.max_len - n_new)
  rows = data.val["tokens"][: t.sample_prompts, :prompt_len]
  if not len(rows):  # sample_prompts=0: an empty file, and no sampler traced for nothing
    open(path, "w").close()
    return
  out = generate.sample(model, params, jnp.asarray(rows), jax.random.PRNGKey(t.seed),
                        n_new=n_new, temperature=t.sample_temperature)
  decode = data.tokenizer.decode
  with open(path, "w") as f:
    for prompt, continuation in zip(rows, np.asarray(out)):
      f.write(f"=== prompt\n{decode(prompt)}\n=== continuation\n{decode(continuation)}\n\n")
