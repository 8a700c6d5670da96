"""Where a model's weights come from: one source type per kind, all with the same few methods.

  parse(spec, key) -> WeightsSource      spec: workdir:PATH[@STEP] | export:DIR | hf:DIR |
                                                peft:ADAPTER_DIR (key: the config key or flag)
  source.model_fields() / .model_config(**overrides)   the model the weights are of
  source.shapes(scanned)                               {parameter path: shape}, no arrays read
  source.load(abstract, shardings, partial=)           verified, straight into the shards
  source.load_model_state(abstract, shardings)         BatchNorm statistics
  source.tokenizer() / .tokenizer_dir()                the tokenizer the weights record
  source.task_info()                                   labels and special ids of their run
  source.pinned()                                      the same weights named exactly (a step)
  source.open(dtype, open_run)                         the whole model, ready to run

Used by `config.train.init_from` (llmjax.train.pretrained), distillation teachers, the tokenizer
a fine-tuning run takes over, and the verbs that read weights (eval, generate, translate).
"""

from __future__ import annotations

from llmjax.data import tokenizers
from llmjax.errors import UserError
from llmjax.hf import tokens
from llmjax.weights.base import WeightsSource
from llmjax.weights.export import ExportSource
from llmjax.weights.hf import HFSource
from llmjax.weights.peft import PeftSource
from llmjax.weights.workdir import WorkdirSource

KINDS: dict[str, type[WeightsSource]] = {s.kind: s for s in (HFSource, ExportSource,
                                                              WorkdirSource, PeftSource)}


def allowed(kinds=tuple(KINDS)) -> str:
  return ", ".join(KINDS[k].form for k in kinds)


def parse(spec: str, key: str, kinds=tuple(KINDS)) -> WeightsSource:
  """The source `spec` (the value of `key`) names, among `kinds`; UserError otherwise."""
  kind, _, rest = spec.partition(":")
  if kind not in kinds:
    raise UserError(f"{key}={spec!r}: allowed {allowed(kinds)}")
  if not rest:
    raise UserError(f"{key}={spec!r} has no path after '{kind}:'")
  return KINDS[kind].from_spec(spec, rest, key)


def parse_checkpoint(value: str, key: str) -> WeightsSource:
  """A CLI --checkpoint: KIND:PATH, or a bare directory of whichever kind it is."""
  kind = value.partition(":")[0]
  if kind in KINDS:
    return parse(value, key)
  for source in KINDS.values():
    if source.recognises(value):
      return source.from_spec(f"{source.kind}:{value}", value, key)
  raise UserError(f"{key}={value}: not a directory of weights; allowed {allowed()}, or a bare "
                  "run directory, export or Hugging Face directory")


def tokenizer(source: WeightsSource, override: str | None = None):
  """`override` ('byte' or 'hf:PATH', a CLI --tokenizer) if given, else the tokenizer the
  weights record; never a guess."""
  if not override:
    return source.tokenizer()
  if override.startswith("hf:"):
    return tokens.TextTokenizer(tokens.load_tokenizer(override[3:]))
  return tokenizers.get_tokenizer(override)


__all__ = ["KINDS", "ExportSource", "HFSource", "PeftSource", "WeightsSource", "WorkdirSource",
           "allowed", "parse", "parse_checkpoint", "tokenizer"]
