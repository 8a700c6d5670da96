"""The tasks by name: `config.task.name` (or a `config.tasks` entry's `task.name`) -> Task class.

`register` adds a task from anywhere (its class here, its options section with the config:
llmjax/task_config.py); importing this module registers the built-in ones. Apart from
tasks/__init__.py so the multi-task, which builds its entries from TASKS, imports it without
importing the package that builds the multi-task.
"""

from __future__ import annotations

from llmjax import config as config_lib
from llmjax.config import TaskConfig
from llmjax.tasks.base import Task
from llmjax.tasks.classify import Classify, ClassifyConfig
from llmjax.tasks.dpo import DPO, DPOConfig
from llmjax.tasks.gan import Gan, GanConfig
from llmjax.tasks.image_classify import ImageClassify, ImageClassifyConfig
from llmjax.tasks.lm import LM, LMConfig
from llmjax.tasks.mlm import MaskedLM, MaskedLMConfig
from llmjax.tasks.orpo import ORPO, ORPOConfig
from llmjax.tasks.seq2seq import Seq2Seq, Seq2SeqConfig
from llmjax.tasks.sft import SFT, SFTConfig

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
                               ("seq2seq", Seq2Seq, Seq2SeqConfig), ("gan", Gan, GanConfig),
                               ("sft", SFT, SFTConfig), ("dpo", DPO, DPOConfig),
                               ("orpo", ORPO, ORPOConfig)):
  register(_name, _task, _options)
