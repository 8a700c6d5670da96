"""`config.distill.teacher=experiment:FILE[:ARG]`: a teacher that needs no earlier run.

The experiment FILE (with `get_config(ARG)`, as `--config=FILE:ARG` reads it) is trained first in
WORKDIR/teacher (resumed if it was interrupted, left alone once finished), and the student then
distills from it as from `workdir:WORKDIR/teacher`, which is what the student's config.json
records. A student whose config.data.tokenizer is the vocabulary its teacher trained (the same
`wordpiece:N` or `bpe:N` spec) reads the teacher's (`hf:WORKDIR/teacher`), as distillation needs.
A student's `:smoke` names its teacher's `:smoke` this way, so it runs on a fresh clone.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from llmjax import checkpoint, config as config_lib
from llmjax.data.tokenizers import TOKENIZER_FILE
from llmjax.errors import ConfigError

PREFIX = "experiment:"
TEACHER_DIR = "teacher"  # under the student's workdir


def teacher_experiment(exp: config_lib.Experiment) -> config_lib.Experiment | None:
  """The experiment config.distill.teacher names with `experiment:`, resolved; else None."""
  spec = exp.distill.teacher
  if not spec.startswith(PREFIX):
    return None
  file, _, arg = spec.removeprefix(PREFIX).partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"config.distill.teacher={spec!r}: no experiment file {file}")
  module = config_lib.experiment_module(os.path.abspath(file), file)
  return config_lib.resolve(module.get_config(arg or None))


def train_first(exp: config_lib.Experiment, workdir: str, train) -> tuple[object, dict | None]:
  """(`exp` reading its teacher from WORKDIR/teacher, None), the teacher trained there first by
  `train(teacher_exp, dir)` unless finished; (exp, train's result) if that was preempted."""
  teacher = teacher_experiment(exp)
  if teacher is None:
    return exp, None
  directory = os.path.abspath(os.path.join(workdir, TEACHER_DIR))
  if not _finished(directory, teacher.train.steps):
    print(f"config.distill.teacher={exp.distill.teacher}: training the teacher in {directory} "
          "first", file=sys.stderr)
    result = train(teacher, directory)
    if result.get("preempted"):
      return exp, result
  exp = dataclasses.replace(exp, distill=dataclasses.replace(exp.distill,
                                                            teacher=f"workdir:{directory}"))
  trained = os.path.join(directory, TOKENIZER_FILE)
  if exp.data.tokenizer == teacher.data.tokenizer and os.path.isfile(trained) \
      and exp.data.tokenizer.split(":")[0] in ("wordpiece", "bpe"):
    print(f"config.data.tokenizer={exp.data.tokenizer}: the teacher's, read from {trained}",
          file=sys.stderr)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, tokenizer=f"hf:{directory}"))
  return exp, None


def _finished(directory: str, steps: int) -> bool:
  """Whether the run in `directory` has its final step's checkpoint."""
  if not os.path.isdir(os.path.join(directory, "checkpoints")):
    return False
  ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), keep=1_000_000)
  try:
    return steps in ckpt.all_steps()
  finally:
    ckpt.close()
