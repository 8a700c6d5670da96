"""`config.task`: which task runs, and that task's own options, in a section its module defines.

`config.task.name` names a registered task; the rest of `config.task` are the options of that
task, fields of a frozen dataclass the task's module defines (a subclass of `TaskConfig`) and
registers here with `register_task` (llmjax/tasks/registry.py registers the built-in ones when
`llmjax.tasks` is imported, as the CLI and `llmjax.train` do). The options validate themselves
(`TaskConfig.validate`), with the whole experiment in view.

This module sits at the config floor: it never imports a task. Experiment files keep writing
`c.task.KEY = VALUE` and the CLI `--config.task.KEY=VALUE`: the ConfigDict section holds every
registered task's options with their defaults (`defaults()`), and `resolve_section` keeps the
named task's. Options of *other* tasks are refused when set away from their default
(`refuse_foreign`: they would do nothing), and dropped when reading back a run's config.json
(which, before tasks owned their sections, held every task's options) and in the defaults
config.task gives config.tasks entries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmjax.errors import ConfigError

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def type_name(annotation) -> str:
  """A field's annotation as the name config checks by ("int", ...): written as a string under
  `from __future__ import annotations`, a class without it."""
  return annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                 str(annotation))


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """`config.task` of a task without options of its own; every task's options subclass it."""
  name: str = "lm"

  def validate(self, exp) -> None:
    """Refuse what the task cannot run, with a ConfigError naming the key; `exp` is the whole
    Experiment (the model, the data). Nothing by default."""


_SECTIONS: dict[str, type[TaskConfig]] = {}


def register_task(name: str, section: type[TaskConfig] = TaskConfig) -> None:
  """Make `name` a value of config.task.name, with `section`'s fields as its options.

  Options of the same name in two tasks share one `config.task.KEY`: their types and defaults
  must agree. Registering a name again replaces its section.
  """
  if not (isinstance(section, type) and issubclass(section, TaskConfig)
          and dataclasses.is_dataclass(section)):
    raise TypeError(f"task {name!r}: its options must be a dataclass subclassing TaskConfig")
  for f in dataclasses.fields(section):
    if type_name(f.type) not in _TYPES:
      raise TypeError(f"config.task.{f.name} of task {name!r}: option types are int, float, "
                      f"bool or str, got {f.type!r}")
    for other, cls in _SECTIONS.items():
      theirs = {g.name: g for g in dataclasses.fields(cls)}.get(f.name)
      if other != name and theirs is not None and f.name != "name" and (
          (type_name(theirs.type), theirs.default) != (type_name(f.type), f.default)):
        raise TypeError(f"config.task.{f.name}: task {name!r} declares {type_name(f.type)} = "
                        f"{f.default!r}, task {other!r} {type_name(theirs.type)} = "
                        f"{theirs.default!r}; a shared option must agree")
  _SECTIONS[name] = section


def unregister_task(name: str) -> None:
  """Forget a registered task's section (tests that register a task of their own)."""
  _SECTIONS.pop(name, None)


def registered() -> dict[str, type[TaskConfig]]:
  """Task name -> its options dataclass, in registration order."""
  return dict(_SECTIONS)


def defaults() -> dict[str, Any]:
  """The ConfigDict form of config.task: name "lm" and every registered task's options."""
  out: dict[str, Any] = {"name": "lm"}
  for section in _SECTIONS.values():
    for f in dataclasses.fields(section):
      if f.name != "name":
        out.setdefault(f.name, f.default)
  return out


def _owners(key: str) -> list[str]:
  return [n for n, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]


def resolve_section(where: str, values: dict, section_fn) -> TaskConfig:
  """config.<where> (a dict) -> the named task's options, built by `section_fn(where, cls, own)`
  (which checks types); other registered tasks' options are left out (see `refuse_foreign`)."""
  name = values.get("name", "lm")
  if name not in _SECTIONS:
    hint = "" if _SECTIONS else " (none registered: import llmjax.tasks, which registers them)"
    raise ConfigError(f"config.{where}.name={name!r} is not a task; allowed: "
                      f"{', '.join(_SECTIONS)}{hint}")
  section = _SECTIONS[name]
  own = {f.name for f in dataclasses.fields(section)}
  known = set(defaults()) | own
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"unknown config key config.{where}.{unknown[0]}; allowed in "
                      f"config.{where}: {', '.join(sorted(known))}")
  return section_fn(where, section, {k: v for k, v in values.items() if k in own})


def refuse_foreign(where: str, values: dict) -> None:
  """A ConfigError for an option of another task set away from its default: it would do
  nothing for the task config.<where>.name names. (Not for a run's config.json, which held every
  task's options, nor for config.tasks' defaults.)"""
  name = values.get("name", "lm")
  own = {f.name for f in dataclasses.fields(_SECTIONS[name])}
  base = defaults()
  for key in sorted(set(values) - own):
    if key in base and values[key] != base[key]:
      raise ConfigError(f"config.{where}.{key}={values[key]!r} is an option of the "
                        f"{', '.join(_owners(key))} task, not of config.{where}.name={name!r}; "
                        f"its options: {', '.join(sorted(own - {'name'})) or 'none'}")
