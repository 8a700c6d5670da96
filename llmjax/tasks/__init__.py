"""Tasks: what differs between objectives (see base.py); `config.task.name` picks one."""

from __future__ import annotations

from llmjax.config import Experiment
from llmjax.errors import ConfigError
from llmjax.tasks.base import Data, LossTerms, Outputs, Task
from llmjax.tasks.classify import Classify
from llmjax.tasks.image_classify import ImageClassify
from llmjax.tasks.lm import LM
from llmjax.tasks.mlm import MaskedLM
from llmjax.tasks.seq2seq import Seq2Seq

TASKS: dict[str, type[Task]] = {"lm": LM, "mlm": MaskedLM, "classify": Classify,
                                "image_classify": ImageClassify, "seq2seq": Seq2Seq}


def build(exp: Experiment, info: dict | None = None) -> Task:
  """The experiment's task; `info` is what its data revealed (from `Task.data`), if known.
  With config.tasks, the multi-task of its entries (llmjax/tasks/multitask.py)."""
  if exp.tasks:
    from llmjax.tasks.multitask import MultiTask
    return MultiTask(exp, info)
  name = exp.task.name
  if name not in TASKS:
    raise ConfigError(f"config.task.name={name!r} is not a task; allowed: {', '.join(TASKS)}")
  return TASKS[name](exp, info)


def setup(exp: Experiment, workdir: str | None) -> tuple[Task, Data]:
  """(task bound to its data's info, data): what the loop and `llmjax eval` start from."""
  task = build(exp)
  data = task.data(workdir)
  return task.with_info(data.info), data


__all__ = ["TASKS", "Data", "LossTerms", "Outputs", "Task", "build", "setup"]
