"""`mlm`: BERT-style masked-LM pretraining of an encoder on any text source.

Each row is [CLS] + a piece of one document + [SEP]. Corruption happens on device, inside the
loss, from the step's key: 15% of real tokens chosen (never [CLS], [SEP] or padding), of those 80%
[MASK], 10% a random token, 10% kept; the loss counts the chosen positions only. Evaluation
corrupts with a key derived from the batch's own tokens, so every evaluation of a fixed batch
masks the same positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from llmjax import flops
from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.models.apply import apply_model
from llmjax.models.heads import MaskedLM as MaskedLMHead
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

  def validate(self, exp):
    require_encoder_decoder(exp, False)
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
    room = exp.data.seq_len - (specials["cls"] is not None) - (specials["sep"] is not None)

    def rows(side):
      ids = tokenizer.encode_batch([t for _, t in side], add_special_tokens=False)
      return encoding.framed_rows(encoding.chunks(ids, room), exp.data.seq_len, specials)
    info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, **{
        f"{role}_id": value for role, value in specials.items()}}
    return Data(train=rows(train_docs), val=rows(val_docs), test=None, tokenizer=tokenizer,
                info=info, artifacts=artifacts)

  def model(self):
    return MaskedLMHead(self.exp.model, peft=self.peft())

  def example_batch(self, batch_size):
    return token_batch(batch_size, self.exp.data.seq_len)

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["tokens"], attention_mask_BL=batch["segment_ids"])

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
                                   deterministic=not train)
    logits_BLV, hidden_BLD = out if hidden else (out, None)
    loss_sum, count = lm_objective.cross_entropy_sum(logits_BLV, tokens_BL, chosen_BL)
    correct = jnp.sum((jnp.argmax(logits_BLV, -1) == tokens_BL) * chosen_BL)
    return Prediction(LossTerms(loss_sum, count, {"correct": correct}, model_state), logits_BLV,
                      chosen_BL, hidden_BLD)

  def tokens_per_example(self):
    return self.exp.data.seq_len

  def forward_flops_per_example(self):
    return flops.mlm_forward(self.exp.model, self.exp.data.seq_len)

  def report(self, sums):
    chosen = float(sums["weight"])
    loss = float(sums["loss_sum"]) / max(chosen, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "masked_accuracy": float(sums["correct"]) / max(chosen, 1.0),
            "masked_tokens": chosen}

  def headline(self, report):
    return (f"final validation masked-LM loss {report['loss']:.4f}, masked-token accuracy "
            f"{report['masked_accuracy']:.2%}")
