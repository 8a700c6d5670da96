"""`config.tasks`: several named tasks on one backbone (llmjax/tasks/multitask.py, docs/multitask.md).

An experiment adds entries before `finalize`; the entry's key is its head name (its parameters
live under `heads/<head>/`, its metrics are `val/<head>`):

  c.tasks.lm = dict(task=dict(name="lm"), weight=3.0)
  c.tasks.classify = dict(task=dict(name="classify", pooling="last"), weight=1.0,
                          loss_weight=0.5, data=dict(stdlib_classes=8))

`task` and `data` override the experiment's own `config.task` / `config.data` (the defaults every
entry starts from); `task.name` defaults to the head name. `weight` is the entry's share of the
training rows (the mixture), `loss_weight` what its mean loss counts for in the combined loss.
config.json holds the resolved list form `[{"head": ..., "task": {...}, "data": {...}, ...}]`,
which `resolve` reads back; in that form a head can be named twice, and is refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from llmjax import task_config
from llmjax.errors import ConfigError

ENTRY_KEYS = ("data", "loss_weight", "task", "weight")
_HEAD = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclasses.dataclass(frozen=True)
class TaskEntry:
  """One task of a multi-task experiment, with its data and task settings resolved."""
  head: str  # parameters under heads/<head>/, metrics as val/<head>, outputs in tasks/<head>/
  task: Any  # the entry's task's options (task_config.py): config.task overridden by its own
  data: Any  # DataConfig: config.data overridden by the entry's own
  weight: float = 1.0  # share of the training rows (normalised over the entries)
  loss_weight: float = 1.0  # factor of this task's mean loss in the combined loss


def _entries(raw) -> list[tuple[str, dict]]:
  """(head, entry dict) in order, from the mapping form or config.json's list form."""
  if isinstance(raw, dict):
    out = []
    for head, entry in raw.items():
      if not isinstance(entry, dict):
        raise ConfigError(f"config.tasks.{head} must be a dict of {', '.join(ENTRY_KEYS)}; got "
                          f"{type(entry).__name__} {entry!r}")
      out.append((head, dict(entry)))
    return out
  if isinstance(raw, (list, tuple)):
    out, seen = [], {}
    for i, entry in enumerate(raw):
      if not isinstance(entry, dict) or not isinstance(entry.get("head"), str):
        raise ConfigError(f"config.tasks[{i}] must be a dict with a 'head' name")
      entry = dict(entry)
      head = entry.pop("head")
      if head in seen:
        raise ConfigError(f"config.tasks: head name {head!r} is used twice (entries {seen[head]} "
                          f"and {i}); each task needs its own head")
      seen[head] = i
      out.append((head, entry))
    return out
  raise ConfigError(f"config.tasks must be a dict of named task entries, got "
                    f"{type(raw).__name__}")


def _weight(key: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.{key} must be float, got {type(value).__name__} {value!r}")
  if not math.isfinite(value) or value < 0:
    raise ConfigError(f"config.{key} must be a finite number >= 0, got {value}")
  return float(value)


def _sub_validate(sub, head: str, validate) -> None:
  """The experiment's checks on one entry's view, naming the entry's keys."""
  try:
    validate(sub)
  except ConfigError as e:
    message = str(e).replace("config.data.", f"config.tasks.{head}.data.").replace(
        "config.task.", f"config.tasks.{head}.task.")
    raise ConfigError(message) from None


def resolve_tasks(raw, exp, task_defaults: dict, section, validate) -> tuple[TaskEntry, ...]:
  """config.tasks (mapping or list form) -> TaskEntry tuple; () when empty (a single task).

  `task_defaults` is config.task as written (every entry's task options start from it);
  `section(name, cls, values)` builds a config section naming `config.<name>.<key>` in errors;
  `validate(exp)` is the experiment's own check, run on each entry's view.
  """
  if not raw:
    return ()
  entries = []
  for head, entry in _entries(raw):
    where = f"tasks.{head}"
    if not _HEAD.match(head):
      raise ConfigError(f"config.{where}: a head name must match [a-z][a-z0-9_]* (it names "
                        "parameter paths, metrics splits and a directory)")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
      raise ConfigError(f"unknown config key config.{where}.{unknown[0]}; allowed in "
                        f"config.{where}: {', '.join(ENTRY_KEYS)}")
    task = task_config.resolve_section(
        f"{where}.task", {**task_defaults, "name": head, **dict(entry.get("task") or {})},
        section)
    data = section(f"{where}.data", type(exp.data),
                   {**dataclasses.asdict(exp.data), **dict(entry.get("data") or {})})
    resolved = TaskEntry(head, task, data, _weight(f"{where}.weight", entry.get("weight", 1.0)),
                         _weight(f"{where}.loss_weight", entry.get("loss_weight", 1.0)))
    _sub_validate(dataclasses.replace(exp, task=task, data=data), head, validate)
    entries.append(resolved)
  _check_together(entries, exp)
  return tuple(entries)


def _check_together(entries: list[TaskEntry], exp) -> None:
  if sum(e.weight for e in entries) <= 0:
    raise ConfigError(f"config.tasks: every mixture weight is 0 "
                      f"({', '.join(f'{e.head}.weight=0' for e in entries)}); at least one "
                      "task must have training rows")
  first = entries[0]
  for e in entries[1:]:
    if e.data.seq_len != first.data.seq_len:
      raise ConfigError(f"config.tasks.{e.head}.data.seq_len={e.data.seq_len} differs from "
                        f"config.tasks.{first.head}'s {first.data.seq_len}: the tasks' rows share "
                        "one batch")
  if exp.distill.teacher:
    raise ConfigError(f"config.distill.teacher={exp.distill.teacher!r} with config.tasks: "
                      "distilling a multi-task run is not supported yet")
  if exp.optim.accum_steps != 1:
    raise ConfigError(f"config.optim.accum_steps={exp.optim.accum_steps} with config.tasks: each "
                      "task's loss is a mean over the global batch's rows of that task, which "
                      "microbatches cannot add up to exactly; use 1 (a larger config.train."
                      "batch_size, or more devices)")
