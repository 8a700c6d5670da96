"""`mlm`: BERT-style masked-LM pretraining of an encoder on any text source, optionally with
BERT's second objective on segment pairs (`task.pair_objective`: next-sentence prediction, or
ALBERT's sentence-order prediction).

Each row is [CLS] + a piece of one document + [SEP]; with a pair objective, [CLS] A [SEP] B [SEP]
with token types 0/1 (`encoding.pair_rows`), and a head on the pooled [CLS] vector predicts the
pair's label (`heads.PreTraining`, Hugging Face's BertForPreTraining). Corruption happens on
device, inside the loss, from the step's key: 15% of real tokens chosen (never [CLS], [SEP] or
padding), of those 80% [MASK], 10% a random token, 10% kept; the loss counts the chosen positions
only. Evaluation
corrupts with a key derived from the batch's own tokens, so every evaluation of a fixed batch
masks the same positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from llmjax import flops
from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.models.apply import apply_model
from llmjax.models.heads import MaskedLM as MaskedLMHead
from llmjax.models.heads import PreTraining
from llmjax.objectives import lm as lm_objective
from llmjax.tasks import encoding
from llmjax.tasks.base import (CountsFlops, Data, Exportable, LossTerms, Prediction, Predicts, Task,
                               require_encoder_decoder, token_batch)


@dataclasses.dataclass(frozen=True)
class MaskedLMConfig(TaskConfig):
  """config.task of `mlm`: the corruption."""
  mask_prob: float = 0.15  # fraction of real tokens chosen for prediction
  mask_token_ratio: float = 0.8  # of the chosen, replaced by [MASK]
  random_token_ratio: float = 0.1  # of the chosen, replaced by a random token (rest kept)
  # none | nsp (is B the segment after A, or a random one?) | sop (are A and B in order?)
  pair_objective: str = dataclasses.field(default="none",
                                          metadata={"choices": ("none", "nsp", "sop")})

  def validate(self, exp):
    require_encoder_decoder(exp, False)
    require(self.pair_objective == "none" or exp.model.type_vocab_size >= 2,
            f"config.task.pair_objective={self.pair_objective!r} needs token types: "
            f"config.model.type_vocab_size must be >= 2, got {exp.model.type_vocab_size}")
    require(self.pair_objective == "none" or exp.data.seq_len >= 7,
            f"config.task.pair_objective={self.pair_objective!r}: config.data.seq_len must be >= 7 "
            f"([CLS] A [SEP] B [SEP] with two tokens each), got {exp.data.seq_len}")
    require(exp.model.arch != "rnn", "config.model.arch='rnn' cannot run task mlm (BERT's "
            "heads sit on a Transformer encoder); recurrent networks run tasks lm and classify")
    require(0.0 < self.mask_prob < 1.0,
            f"config.task.mask_prob must be in (0, 1), got {self.mask_prob}")
    require(self.mask_token_ratio >= 0 and self.random_token_ratio >= 0
            and self.mask_token_ratio + self.random_token_ratio <= 1.0,
            "config.task.mask_token_ratio + config.task.random_token_ratio must be in [0, 1], got "
            f"{self.mask_token_ratio} + {self.random_token_ratio}")


class MaskedLM(Predicts, CountsFlops, Exportable, Task):
  """An encoder with BERT's masked-LM head; reports masked-token loss and accuracy."""
  name = "mlm"

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import sources, text
    exp = self.exp
    docs = sources.read_documents(exp.data)
    train_docs, val_docs = text.split_documents(docs, exp.data.val_fraction, exp.data.seed)
    tokenizer, artifacts = encoding.run_tokenizer(exp, workdir, lambda: [t for _, t in train_docs])
    specials = encoding.special_ids(tokenizer)
    encoding.require_special(specials, "mask", exp, "masked-LM pretraining")
    pairs = self.pairs()
    for role in ("cls", "sep") if pairs else ():
      encoding.require_special(specials, role, exp, f"config.task.pair_objective={pairs!r}")
    room = exp.data.seq_len - (specials["cls"] is not None) - (specials["sep"] is not None)

    def rows(side, seed):
      ids = tokenizer.encode_batch([t for _, t in side], add_special_tokens=False)
      if pairs:
        return encoding.pair_rows(ids, exp.data.seq_len, specials, pairs, seed)
      return encoding.framed_rows(encoding.chunks(ids, room), exp.data.seq_len, specials)
    info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, **{
        f"{role}_id": value for role, value in specials.items()}}
    seed = exp.data.seed
    return Data(train=rows(train_docs, seed), val=rows(val_docs, seed + 1), test=None,
                tokenizer=tokenizer, info=info, artifacts=artifacts)

  def pairs(self) -> str | None:
    """The pair objective (nsp, sop) or None."""
    return None if self.exp.task.pair_objective == "none" else self.exp.task.pair_objective

  def model(self):
    return (PreTraining if self.pairs() else MaskedLMHead)(self.exp.model, peft=self.peft())

  def example_batch(self, batch_size):
    batch = token_batch(batch_size, self.exp.data.seq_len)
    if self.pairs():
      batch["token_types"] = batch["tokens"]
      batch["pair_label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    return batch

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["tokens"], attention_mask_BL=batch["segment_ids"],
                      **_types(batch))

  def corrupt(self, tokens_BL, segment_ids_BL, rng):
    """(inputs_BL, chosen_BL): the masked-LM corruption of one batch."""
    if rng is None:  # evaluation: the same positions every time this batch is seen
      weights_L = jnp.arange(1, tokens_BL.shape[1] + 1, dtype=jnp.uint32)
      rng = jax.random.fold_in(jax.random.PRNGKey(self.exp.data.seed),
                               jnp.sum(tokens_BL.astype(jnp.uint32) * weights_L[None]))
    specials = [self.info[k] for k in ("cls_id", "sep_id", "pad_id")
                if self.info.get(k) is not None]
    can_mask_BL = segment_ids_BL != 0
    for special in specials:
      can_mask_BL &= tokens_BL != special
    t = self.exp.task
    return lm_objective.mask_tokens(
        rng, tokens_BL, can_mask_BL, mask_id=self.info["mask_id"],
        vocab_size=self.info["vocab_size"], mask_prob=t.mask_prob,
        mask_token_ratio=t.mask_token_ratio, random_token_ratio=t.random_token_ratio)

  fixed_inputs = False  # the corruption is drawn afresh every step

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
    corrupt_key, dropout_key = jax.random.split(rng) if rng is not None else (None, None)
    inputs_BL, chosen_BL = self.corrupt(tokens_BL, segment_ids_BL, corrupt_key)
    out, model_state = apply_model(model, variables, inputs_BL, train=train, rng=dropout_key,
                                   hidden=hidden, attention_mask_BL=segment_ids_BL,
                                   deterministic=not train, **_types(batch))
    out, hidden_BLD = out if hidden else (out, None)
    logits_BLV, pair_B2 = out if self.pairs() else (out, None)
    loss_sum, count = lm_objective.cross_entropy_sum(logits_BLV, tokens_BL, chosen_BL)
    sums = {"correct": jnp.sum((jnp.argmax(logits_BLV, -1) == tokens_BL) * chosen_BL)}
    if pair_B2 is not None:
      sums.update(pair_sums(pair_B2, batch["pair_label"], segment_ids_BL[:, 0] != 0),
                  mlm_loss_sum=loss_sum)
      # BERT's loss: the masked-LM mean plus the pair mean over the batch; as a sum over the
      # chosen tokens (what the step divides by), the pair term is scaled by chosen / pairs.
      loss_sum = loss_sum + sums["pair_loss_sum"] * count / jnp.maximum(sums["pairs"], 1.0)
    return Prediction(LossTerms(loss_sum, count, sums, model_state), logits_BLV, chosen_BL,
                      hidden_BLD)

  def tokens_per_example(self):
    return self.exp.data.seq_len

  def forward_flops_per_example(self):
    return flops.mlm_forward(self.exp.model, self.exp.data.seq_len)

  def report(self, sums):
    chosen = float(sums["weight"])
    pairs = self.pairs()
    loss = float(sums["mlm_loss_sum" if pairs else "loss_sum"]) / max(chosen, 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
           "masked_accuracy": float(sums["correct"]) / max(chosen, 1.0), "masked_tokens": chosen}
    if pairs:  # loss is BERT's sum of both objectives' means
      count = max(float(sums["pairs"]), 1.0)
      out.update({"masked_lm_loss": loss, f"{pairs}_loss": float(sums["pair_loss_sum"]) / count,
                  f"{pairs}_accuracy": float(sums["pair_correct"]) / count,
                  "pairs": float(sums["pairs"])})
      out["loss"] = loss + out[f"{pairs}_loss"]
    return out

  def headline(self, report):
    line = (f"final validation masked-LM loss {report.get('masked_lm_loss', report['loss']):.4f}, "
            f"masked-token accuracy {report['masked_accuracy']:.2%}")
    pairs = self.pairs()
    return line + (f", {pairs} accuracy {report[f'{pairs}_accuracy']:.2%}" if pairs else "")


def _types(batch: dict) -> dict:
  """The model's token_types_BL argument when the rows carry token types (segment pairs)."""
  return {"token_types_BL": batch["token_types"]} if "token_types" in batch else {}


def pair_sums(pair_B2: jax.Array, labels_B: jax.Array, real_B: jax.Array) -> dict:
  """The pair objective's cross-entropy sum, count and correct predictions over real rows."""
  real_B = real_B.astype(jnp.float32)
  losses_B = optax.softmax_cross_entropy_with_integer_labels(pair_B2.astype(jnp.float32), labels_B)
  return {"pair_loss_sum": jnp.sum(losses_B * real_B), "pairs": jnp.sum(real_B),
          "pair_correct": jnp.sum((jnp.argmax(pair_B2, -1) == labels_B) * real_B)}
