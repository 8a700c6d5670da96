"""`sft`: supervised fine-tuning of a decoder on conversations, the loss on the assistant's turns.

Rows (JSONL or Parquet: `messages`, or `prompt`/`completion`) are rendered with the chat template
(config.data.chat_template, or the tokenizer's own) and masked by character offsets
(llmjax/data/chat.py): the loss counts the tokens config.data.train_on names. Conversations are
packed whole with segment ids (no attention or loss across them). Reports the completion loss and
token accuracy over the trained tokens, and, at every evaluation, greedy completions of the first
held-out prompts scored against their answers (exact match, chrF), each evaluation's completions
appended to completions.txt under a `##### step N` header.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax import flops, generate
from llmjax.config_checks import require
from llmjax.errors import DataError
from llmjax.eval import bleu
from llmjax.models.apply import apply_model
from llmjax.models.transformer import Transformer
from llmjax.objectives import lm as lm_objective
from llmjax.tasks import decoded
from llmjax.tasks.base import (CountsFlops, Data, DecodedReport, Exportable, LossTerms,
                               Prediction, Predicts, Task, WritesFiles, token_batch)
from llmjax.tasks.lm import DECODERS, LMConfig

COMPLETIONS_FILE = "completions.txt"
STEP_HEADER = re.compile(r"^##### step (\d+)$", re.MULTILINE)  # one per evaluation


@dataclasses.dataclass(frozen=True)
class SFTConfig(LMConfig):
  """config.task of `sft`: the held-out prompts completed at each evaluation, and their budget."""
  completions: int = 8  # held-out prompts completed greedily at each evaluation (0: none)
  max_new_tokens: int = 0  # per completion; 0: half of data.seq_len

  def validate(self, exp):
    super().validate(exp)
    d = exp.data
    require((d.source == "files" and bool(d.files)) or d.source == "tfds",
            f"config.task.name='sft' reads conversations: set config.data.source='files' and "
            f"config.data.files to a JSONL/Parquet glob, or source='tfds' (got "
            f"source={d.source!r})")
    require(not d.chat_fields or d.source == "tfds", f"config.data.chat_fields="
            f"{d.chat_fields!r} maps a tfds dataset's fields; allowed: '' with "
            f"source={d.source!r} (files name their fields messages or prompt/completion)")
    require(self.completions >= 0, f"config.task.completions must be >= 0, got "
            f"{self.completions}")
    require(0 <= self.max_new_tokens < d.seq_len,
            f"config.task.max_new_tokens must be in [0, data.seq_len={d.seq_len}) (0: half of "
            f"it), got {self.max_new_tokens}")


def _examples(conversations, template, tokenizer, train_on):
  # deferred: grain and tensorflow-datasets stay off the model-only import path
  from llmjax.data import chat
  return [chat.render_masked(template, tokenizer, c.messages, train_on, c.where)
          for c in conversations]


def _split(d):
  """(train, val) conversations of config.data.files or the tfds dataset: config.data.val_files
  (tfds_val_split), else a stable hash of each row's place."""
  # deferred: grain and tensorflow-datasets stay off the model-only import path
  from llmjax.data import chat_rows, chat_tfds, text
  if d.source == "tfds":
    splits = chat_tfds.read(d)
    conversations = splits["train"]
    if "val" in splits:
      return conversations, splits["val"]
  else:
    conversations = chat_rows.read_conversations(d.files)
    if d.val_files:
      return conversations, chat_rows.read_conversations(d.val_files, "config.data.val_files")
  docs = [(c.split_key, c) for c in conversations]
  train, val = text.split_documents(docs, d.val_fraction, d.seed)
  return [c for _, c in train], [c for _, c in val]


def _trained_targets(arrays) -> int:
  """Tokens the loss counts: trained tokens that follow a token of their own conversation."""
  seg = arrays["segment_ids"]
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return int((same & (arrays["loss_mask"][:, 1:] != 0)).sum())


class SFT(Predicts, DecodedReport, WritesFiles, CountsFlops, Exportable, Task):
  """A decoder trained on the assistant turns of conversations; completion loss, token
  accuracy, greedy completions' exact match and chrF. (Not SharesBatch: its rows carry a loss
  mask other tasks' rows do not.)"""
  name = "sft"
  decoded = None  # the last decoded_report's (prompt, reference, completion), to write_decoded

  def model(self):
    return DECODERS.get(self.exp.model.arch, Transformer)(self.exp.model, self.peft())

  def init(self, model, rngs, batch):
    return model.init(rngs, batch["tokens"])

  def tokens_per_example(self):
    return self.exp.data.seq_len

  def forward_flops_per_example(self):
    return flops.lm_forward(self.exp.model, self.exp.data.seq_len)

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import chat, chat_rows, tokenizers
    d = self.exp.data
    template = chat.load_template(d.chat_template, d.tokenizer)
    train_c, val_c = _split(d)
    tokenizer, artifacts = tokenizers.for_run(
        d.tokenizer, workdir, lambda: [template.render(c.messages, where=c.where)
                                       for c in train_c])
    splits, counts = {}, {}
    for name, conversations in (("train", train_c), ("val", val_c)):
      examples = _examples(conversations, template, tokenizer, d.train_on)
      splits[name], counts[name] = chat_rows.pack(examples, d.seq_len, d.too_long)
      counts[name]["trained_tokens"] = _trained_targets(splits[name])
      if not counts[name]["trained_tokens"]:
        source = (f"tfds dataset {d.tfds_name!r}" if d.source == "tfds" else
                  f"config.data.files={d.files!r}")
        raise DataError(f"{source}: the {name} split's "
                        f"{len(conversations)} conversation(s) leave no token to train on "
                        f"(config.data.train_on={d.train_on!r}, chat template {template.name}, "
                        f"config.data.too_long={d.too_long!r}, seq_len {d.seq_len})")
    prompts = [chat.prompt_and_reference(template, c.messages, c.where) for c in val_c]
    info = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "chat_template": template.name,
            "end_of_turn_ids": chat.end_of_turn_ids(template, tokenizer), "conversations": counts}
    return Data(train=splits["train"], val=splits["val"], test=None, tokenizer=tokenizer,
                info=info, artifacts={**artifacts, "chat_template.jinja": template.source},
                texts={"val": [p for p in prompts if p is not None]})

  def example_batch(self, batch_size):
    batch = token_batch(batch_size, self.exp.data.seq_len)
    return {**batch, "loss_mask": batch["tokens"]}

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
    targets_BL, same_BL = lm_objective.next_token_targets(tokens_BL, segment_ids_BL)
    # position t predicts token t + 1: it counts when that token is trained on
    trained_BL = jnp.concatenate([batch["loss_mask"][:, 1:],
                                  jnp.zeros_like(batch["loss_mask"][:, :1])], axis=1)
    mask_BL = same_BL * (trained_BL != 0)
    if "weights" in batch:  # optional per-example weights [B]
      mask_BL = mask_BL * batch["weights"][:, None]
    out, model_state = apply_model(model, variables, tokens_BL, train=train, rng=rng,
                                   hidden=hidden, segment_ids_BL=segment_ids_BL,
                                   deterministic=not train)
    logits_BLV, hidden_BLD = out if hidden else (out, None)
    loss_sum, count = lm_objective.cross_entropy_sum(logits_BLV, targets_BL, mask_BL)
    correct = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * mask_BL)
    return Prediction(LossTerms(loss_sum, count, {"correct": correct}, model_state),
                      logits_BLV, mask_BL, hidden_BLD)

  def report(self, sums):
    tokens = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss_sum"]) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": float(sums["correct"]) / tokens, "tokens": float(sums["weight"])}

  def headline(self, report):
    line = (f"final validation completion loss {report['loss']:.4f}, token accuracy "
            f"{report['token_accuracy']:.3f}")
    return line + decoded.headline_part(report)

  def max_new_tokens(self) -> int:
    return self.exp.task.max_new_tokens or self.exp.data.seq_len // 2

  def complete(self, model, params, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy completions of rendered prompts, each up to the end-of-turn token; prompts keep
    their last data.seq_len - max_new_tokens tokens (one compiled shape per run)."""
    n_new = self.max_new_tokens()
    width = self.exp.data.seq_len - n_new
    ids = [np.asarray(tokenizer.encode_offsets(p)[0] if hasattr(tokenizer, "encode_offsets")
                      else tokenizer.encode(p))[-width:] for p in prompts]
    tokens_BP = np.zeros((len(ids), width), np.int32)
    mask_BP = np.zeros((len(ids), width), np.int32)
    for row, p in enumerate(ids):
      tokens_BP[row, width - len(p):], mask_BP[row, width - len(p):] = p, 1
    eos = self.info.get("end_of_turn_ids", [])
    with nn.logical_axis_rules(()):  # host params on one device: no activation sharding
      new_BN = np.asarray(generate.generate(model, params, tokens_BP, prompt_mask_BP=mask_BP,
                                            max_new_tokens=n_new, eos_ids=eos))
    out = []
    for row in new_BN:
      ends = np.flatnonzero(np.isin(row, eos))
      out.append(tokenizer.decode(row[:ends[0]] if ends.size else row))
    return out

  def decoded_report(self, model, get_params, data, split, limit=None):
    limit = self.exp.task.completions if limit is None else limit
    return decoded.report(get_params, data, split, limit, self._decoder(model, data, split),
                          scores)

  def _decoder(self, model, data, split):
    """complete(), keeping (prompt, reference, completion) for write_decoded."""
    def decode(params, prompts):
      out = self.complete(model, params, data.tokenizer, prompts)
      self.decoded = [(p, r, c) for (p, r), c in zip(data.texts[split], out)]
      return out
    return decode

  def decoded_keys(self):
    return ("exact_match", "chrf", "completed") if self.exp.task.completions else ()

  def write_decoded(self, workdir, step):
    """Appends the last evaluation's completions to completions.txt."""
    found, self.decoded = self.decoded, None
    if not found:
      return []
    path = os.path.join(workdir, COMPLETIONS_FILE)
    append_completions(path, step, found)
    return [path]

  def finish(self, outputs):
    path = os.path.join(outputs.workdir, COMPLETIONS_FILE)
    return [path] if os.path.exists(path) else []


def append_completions(path: str, step: int, found: list[tuple[str, str, str]]) -> None:
  """Adds step `step`'s (prompt, reference, completion) section to the file, first dropping
  the sections of this step and later ones (a resumed run evaluates them again)."""
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    later = [m.start() for m in STEP_HEADER.finditer(text) if int(m.group(1)) >= step]
    text = text[:later[0]] if later else text
  os.makedirs(os.path.dirname(path), exist_ok=True)  # a multi-task run's task subdirectory
  text += f"##### step {step}\n\n"
  for prompt, reference, completion in found:
    text += (f"=== prompt\n{prompt}\n=== reference\n{reference}\n=== completion "
             f"(exact match: {completion == reference})\n{completion}\n\n")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def scores(completions: list[str], references: list[str]) -> dict:
  """Exact match (fraction), corpus chrF (sacrebleu) and how many were completed."""
  exact = sum(c == r for c, r in zip(completions, references)) / max(len(references), 1)
  return {"exact_match": exact, "chrf": bleu.corpus_scores(completions, references)["chrf"],
          "completed": len(references)}
