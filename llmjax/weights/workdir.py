"""`workdir:PATH[@STEP]`: the weights of an llmjax training run, at checkpoint STEP.

Without @STEP the run's newest verified checkpoint is read, which moves when the run trains on; a
run that starts from such a source records the step it started from (`pinned`), so a run that
fine-tunes it keeps finding its base. The run's config.json gives the model, its tokenizer.json
(or config.data.tokenizer) the tokenizer, its task_info.json what its data revealed.
"""

from __future__ import annotations

import json
import os
import re

from llmjax import checkpoint
from llmjax.data import tokenizers
from llmjax.hf import convert
from llmjax.weights.base import WeightsSource, is_dir

_STEP = re.compile(r"^(.*)@(\d+)$")


class WorkdirSource(WeightsSource):
  kind, form = "workdir", "workdir:PATH[@STEP]"

  def __init__(self, spec: str, path: str, key: str, step: int | None = None):
    super().__init__(spec, path, key)
    self.step = step

  @classmethod
  def from_spec(cls, spec: str, rest: str, key: str) -> "WorkdirSource":
    match = _STEP.match(rest)
    return cls(spec, match.group(1), key, int(match.group(2))) if match else cls(spec, rest, key)

  @classmethod
  def recognises(cls, path: str) -> bool:
    return is_dir(path, "config.json") and os.path.isdir(os.path.join(path, "checkpoints"))

  def _config(self) -> dict:
    return self.read_json("config.json", "an llmjax run directory")

  def _checkpoints(self) -> str:
    directory = os.path.join(self.path, "checkpoints")
    if not os.path.isdir(directory):
      raise self.error("no checkpoints/ in that workdir")
    return directory

  def steps(self) -> list[int]:
    """The run's checkpoint steps, oldest first."""
    return checkpoint.saved_steps(self._checkpoints())

  def _exact_step(self) -> int | None:
    """The step named, checked to exist (None: the newest verified one)."""
    if self.step is None:
      return None
    steps = self.steps()
    if self.step not in steps:
      raise self.error(f"the run has no checkpoint step {self.step} (deleted by retention, or "
                       f"never saved); available steps: {_listed(steps)}")
    return self.step

  def model_fields(self) -> dict:
    return self._config()["model"]

  def shapes(self, scanned: bool) -> dict[str, tuple]:
    return checkpoint.saved_param_shapes(self._checkpoints(), self._exact_step())

  def load(self, abstract, shardings, *, partial: bool = False):
    return checkpoint.restore_params(self._checkpoints(), abstract, shardings, partial=partial,
                                     step=self._exact_step())

  def load_model_state(self, abstract, shardings):
    return checkpoint.restore_params(self._checkpoints(), abstract, shardings,
                                     field="model_state", step=self._exact_step())

  def saved_checksums(self) -> dict[str, list] | None:
    step = self._exact_step()
    return None if step is None else checkpoint.saved_param_checksums(self._checkpoints(), step)

  def versions(self) -> list["WorkdirSource"]:
    return [self.at(step) for step in reversed(self.steps())]

  def tokenizer_dir(self) -> str | None:
    found = os.path.isfile(os.path.join(self.path, tokenizers.TOKENIZER_FILE))
    return self.path if found else None

  def tokenizer_name(self) -> str | None:
    return self.task_info().get("tokenizer")  # what the run's data used ("byte")

  def task_info(self) -> dict:
    file = os.path.join(self.path, "task_info.json")
    if not os.path.isfile(file):
      return {}
    with open(file) as f:
      return json.load(f)

  def describe(self) -> str:
    step = self.step if self.step is not None else f"newest ({_listed(self.steps()[-1:])})"
    return f"{self.spec} (an llmjax run, checkpoint step {step})"

  def pinned(self) -> "WorkdirSource":
    if self.step is not None:
      self._exact_step()
      return self
    steps = self.steps()
    if not steps:
      raise self.error("the run has no checkpoint yet")
    return WorkdirSource(f"workdir:{self.path}@{steps[-1]}", self.path, self.key, steps[-1])

  def pins(self, other: WeightsSource) -> bool:
    return (isinstance(other, WorkdirSource) and other.step is None and self.step is not None
            and os.path.abspath(other.path) == os.path.abspath(self.path))

  def at(self, step: int) -> "WorkdirSource":
    """The same run at checkpoint `step`."""
    return WorkdirSource(f"workdir:{self.path}@{step}", self.path, self.key, step)

  def open(self, dtype: str = "float32", open_run=None):
    run = open_run(self.path, self._exact_step())
    info = run.task.info
    eos = info.get("eos_id")
    loaded = convert.Loaded(run.model, run.params, None, [int(eos)] if eos is not None else [],
                            info.get("pad_id"), dict(run.state.model_state or {}),
                            info.get("start_id"), run.task)
    return convert.with_dtype(loaded, dtype)


def _listed(steps: list[int]) -> str:
  """Steps as a short list: the last 10 where there are more."""
  if not steps:
    return "none"
  shown = ", ".join(map(str, steps[-10:]))
  return shown if len(steps) <= 10 else f"... {shown} ({len(steps)} in all)"
