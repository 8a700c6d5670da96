"""What every weights source is: where a model's weights come from, and the few things a caller
asks of them, whatever the kind (an llmjax run, an llmjax export, a Hugging Face directory, a
PEFT adapter over one).

A source is named by a spec `KIND:PATH` (the value of a config key such as
`config.train.init_from` or of a CLI flag such as `--checkpoint`); every error names that key and
spec. Reading a source's model fields, shapes or tokenizer reads no arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, ClassVar

import jax

from llmjax.config import ModelConfig
from llmjax.data import tokenizers
from llmjax.errors import UserError


class WeightsSource:
  """One place weights come from; subclasses (one per kind) fill in how each question is read."""

  kind: ClassVar[str] = ""
  form: ClassVar[str] = ""  # how the spec is written in an error: "workdir:PATH[@STEP]"

  def __init__(self, spec: str, path: str, key: str):
    self.spec, self.path, self.key = spec, path, key

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.spec!r})"

  @classmethod
  def from_spec(cls, spec: str, rest: str, key: str) -> "WeightsSource":
    """The source `KIND:rest` names (subclasses parse what follows the kind)."""
    return cls(spec, rest, key)

  @classmethod
  def recognises(cls, path: str) -> bool:
    """Whether a bare directory (a CLI `--checkpoint=DIR` without a kind) is of this kind."""
    return False

  def error(self, message: str) -> UserError:
    """A one-line UserError naming the key and spec."""
    return UserError(f"{self.key}={self.spec!r}: {message}")

  def read_json(self, name: str, what: str) -> dict:
    """The JSON file `name` of the source's directory; without it, the directory is not `what`."""
    file = os.path.join(self.path, name)
    if not os.path.isfile(file):
      raise self.error(f"{self.path} is not {what} (no {name})")
    with open(file) as f:
      return json.load(f)

  # --- what the weights are -------------------------------------------------------------------

  def model_fields(self) -> dict:
    """The ModelConfig fields the weights decide, with their values (no arrays read)."""
    raise NotImplementedError

  def model_config(self, **overrides) -> ModelConfig:
    """A complete ModelConfig of the weights (the fields they record), with `overrides`."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in self.model_fields().items() if k in known}
    return ModelConfig(**{**fields, **overrides})

  def shapes(self, scanned: bool) -> dict[str, tuple]:
    """{parameter path: shape}, in the layout a model with `scanned` layers has."""
    raise NotImplementedError

  def load(self, abstract, shardings, *, partial: bool = False):
    """The parameters `abstract` describes, verified, each placed straight into its sharding.
    `partial`: `abstract` may be a subtree of the source's parameters; only it is read."""
    raise NotImplementedError

  def load_model_state(self, abstract, shardings):
    """The non-parameter collections (BatchNorm statistics), in the layout of `abstract`."""
    raise NotImplementedError

  def tokenizer_dir(self) -> str | None:
    """The directory holding the tokenizer.json these weights were trained with, if any."""
    return None

  def tokenizer_name(self) -> str | None:
    """The name of a file-less tokenizer the weights record ('byte'), if any."""
    return None

  def tokenizer(self):
    """The tokenizer the weights were trained with, as recorded; UserError if none is."""
    directory, name = self.tokenizer_dir(), self.tokenizer_name()
    if directory is not None:
      return tokenizers.HFTokenizer(directory)
    if name is not None:
      return tokenizers.get_tokenizer(name)
    raise self.error("records no tokenizer; pass --tokenizer=byte or --tokenizer=hf:PATH "
                     "(the one it was trained with)")

  def task_info(self) -> dict:
    """What the data of the run that trained the weights revealed (labels, special ids)."""
    return {}

  def hf_dir(self) -> str | None:
    """The absolute Hugging Face directory holding the weights (a PEFT adapter's base), if any."""
    return None

  def describe(self) -> str:
    return self.spec

  # --- naming the weights exactly -------------------------------------------------------------

  def pinned(self) -> "WeightsSource":
    """The same weights named so that they cannot change under a later reader (a run: its
    step); self where the spec already does."""
    return self

  def pins(self, other: "WeightsSource") -> bool:
    """Whether `self` names exactly the weights `other` names loosely (a run's step)."""
    return False

  def versions(self) -> list["WeightsSource"]:
    """The exact weights the spec may have meant, newest first (a run: one per checkpoint step);
    [] where the spec names one version only."""
    return []

  def saved_checksums(self) -> dict[str, list] | None:
    """{parameter path: checksum} recorded with the weights (no arrays read), where recorded."""
    return None

  # --- fine-tuning from the weights (a PEFT adapter adds its factors) -------------------------

  def check_finetune(self, exp) -> None:
    """UserError where the run's fine-tuning cannot take these weights."""

  def check_params(self, flat_abstract: dict) -> None:
    """UserError where the model's parameters have no place for what the source adds."""

  def overlay(self, exp, params, shardings):
    """`params` with what the source adds on top of its base (LoRA factors) in place."""
    return params

  # --- a model to run ------------------------------------------------------------------------

  def open(self, dtype: str = "float32", open_run: Callable | None = None):
    """The whole model ready to run (llmjax.hf.convert.Loaded). `open_run(workdir, step)` reopens
    a training run (llmjax.train.rundir.restore: a floor above this one)."""
    raise NotImplementedError


def is_dir(path: str, *names: str) -> bool:
  return os.path.isdir(path) and all(os.path.exists(os.path.join(path, n)) for n in names)


def scanned(flat: dict) -> bool:
  """Whether parameters {path: x} are of a model with scanned layers."""
  return any("layers" in p.split("/") for p in flat)


def put(tree, shardings):
  return jax.tree.map(jax.device_put, tree, shardings)
