"""Tasks: what differs between objectives (see base.py); `config.task.name` picks one.

Importing this package registers the built-in tasks, their classes here and their options
sections with the config (llmjax/task_config.py); `register` adds another from anywhere.
"""

from __future__ import annotations

from llmjax import config as config_lib
from llmjax.config import Experiment, TaskConfig
from llmjax.errors import ConfigError
from llmjax.tasks.base import (CAPABILITIES, Capability, CountsFlops, Data, DecodedReport,
                               Exportable, LossTerms, Outputs, Prediction, Predicts, SharesBatch,
                               Task, Translates, WritesFiles, declared, supports)
from llmjax.tasks.classify import Classify, ClassifyConfig
from llmjax.tasks.image_classify import ImageClassify, ImageClassifyConfig
from llmjax.tasks.lm import LM, LMConfig
from llmjax.tasks.mlm import MaskedLM, MaskedLMConfig
from llmjax.tasks.seq2seq import Seq2Seq, Seq2SeqConfig

TASKS: dict[str, type[Task]] = {}


def register(name: str, task: type[Task], options: type[TaskConfig] = TaskConfig) -> None:
  """Make `name` a task: `config.task.name=name` builds `task`, whose own options
  (`config.task.KEY`, experiment files and `--config.task.KEY=VALUE` alike) are the fields of
  `options`, a frozen dataclass subclassing config.TaskConfig that validates itself."""
  if not (isinstance(task, type) and issubclass(task, Task)):
    raise TypeError(f"task {name!r}: {task!r} is not a Task subclass")
  config_lib.register_task(name, options)
  TASKS[name] = task


def unregister(name: str) -> None:
  """Forget a task `register` added (tests that define their own)."""
  TASKS.pop(name, None)
  config_lib.unregister_task(name)


for _name, _task, _options in (("lm", LM, LMConfig), ("mlm", MaskedLM, MaskedLMConfig),
                               ("classify", Classify, ClassifyConfig),
                               ("image_classify", ImageClassify, ImageClassifyConfig),
                               ("seq2seq", Seq2Seq, Seq2SeqConfig)):
  register(_name, _task, _options)


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


__all__ = ["CAPABILITIES", "TASKS", "Capability", "CountsFlops", "Data", "DecodedReport",
           "Exportable", "LossTerms", "Outputs", "Prediction", "Predicts", "SharesBatch", "Task",
           "TaskConfig", "Translates", "WritesFiles", "build", "declared", "register", "setup",
           "supports", "unregister"]
