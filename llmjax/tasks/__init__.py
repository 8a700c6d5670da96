"""Tasks: what differs between objectives (see base.py); `config.task.name` picks one.

Importing this package registers the built-in tasks, their classes in `TASKS` (tasks/registry.py)
and their options sections with the config (llmjax/task_config.py); `register` adds another from
anywhere.
"""

from __future__ import annotations

from llmjax.config import Experiment, TaskConfig
from llmjax.errors import ConfigError
from llmjax.tasks.base import (CAPABILITIES, Capability, CountsFlops, Data, DecodedReport,
                               Exportable, LossTerms, Outputs, ParamGroups, Prediction, Predicts,
                               References, Samples, SharesBatch, Task, Translates, WritesFiles,
                               declared, loss_with_moe, report_with_moe, supports)
from llmjax.tasks.multitask import MultiTask
from llmjax.tasks.registry import TASKS, register, unregister


def build(exp: Experiment, info: dict | None = None) -> Task:
  """The experiment's task; `info` is what its data revealed (from `Task.data`), if known.
  With config.tasks, the multi-task of its entries (llmjax/tasks/multitask.py)."""
  if exp.tasks:
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


__all__ = ["CAPABILITIES", "TASKS", "Capability", "CountsFlops", "Data", "DecodedReport",
           "Exportable", "LossTerms", "Outputs", "ParamGroups", "Prediction", "Predicts",
           "References", "Samples",
           "SharesBatch", "Task",
           "TaskConfig", "Translates", "WritesFiles", "build", "declared", "loss_with_moe",
           "register", "report_with_moe", "setup", "supports", "unregister"]
