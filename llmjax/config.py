"""Experiment configs: an ml_collections ConfigDict at the edge, validated frozen dataclasses inside.

An experiment file's `get_config(arg)` starts from `base_config()`, overrides what it needs and
returns `finalize(config, arg)`. The library never reads a ConfigDict: `resolve()` converts it to an
`Experiment` of frozen dataclasses, rejecting unknown keys, wrong types and impossible combinations
with a `ConfigError` naming the key. `config.task` is the named task's own options section
(llmjax/task_config.py: each task module defines and registers it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
from typing import Any

import ml_collections

from llmjax import task_config
from llmjax.config_checks import validate
# The sections as frozen dataclasses (llmjax/config_sections.py); re-exported here, where
# experiments and the library look for them.
from llmjax.config_sections import (CHOICES, SECTIONS, DataConfig, DistillConfig, Experiment,
                                    FinetuneConfig, MeshConfig, ModelConfig, OptimConfig,
                                    PruneConfig, TrainConfig)
from llmjax.config_tasks import resolve_tasks
from llmjax.errors import ConfigError
from llmjax.models import presets
# config.task: the base of every task's own options section, and the registry of those sections
# (llmjax/task_config.py); re-exported here, where experiments and tasks look for config names.
from llmjax.task_config import TaskConfig, register_task, registered, unregister_task


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """A `config.model` section: every ModelConfig field, from a named preset plus overrides."""
  fields = dataclasses.asdict(ModelConfig())
  fields.update(presets.get(preset))
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ConfigError(f"unknown model field(s) {unknown}; allowed: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with defaults; experiments override, never add."""
  c = ml_collections.ConfigDict()
  c.name = "experiment"
  c.model = model_section("gpt2")
  for section, cls in SECTIONS.items():
    if section != "model":
      c[section] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
  c.task = ml_collections.ConfigDict(task_config.defaults())  # every registered task's options
  c.tasks = ml_collections.ConfigDict()  # named entries: a multi-task run (config_tasks.py)
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrink any experiment to a run of seconds, keeping its architecture family."""
  c.model.n_layers = 2
  c.model.n_decoder_layers = 0  # an encoder-decoder's decoder: as deep as its encoder
  c.model.d_model = 64
  c.model.n_heads = 4
  c.model.n_kv_heads = min(c.model.n_kv_heads, 2) if c.model.n_kv_heads else 0
  c.model.head_dim = 0
  c.model.d_ff = 128
  c.model.max_len = 64
  c.data.seq_len = 64
  c.data.max_bytes = 300_000
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.train.checkpoint_every = 10
  c.train.sample_prompts = 2
  c.train.sample_tokens = 16
  c.optim.warmup_steps = 5
  for entry in c.get("tasks", {}).values():  # a task's own data shrinks like the experiment's
    for key in ("seq_len", "max_bytes"):
      if key in entry.get("data", {}):
        entry.data[key] = c.data[key]
  c.model.update(presets.smoke_overrides(c.model))  # what the arch shrinks besides (presets.py)
  kind, _, size = c.data.tokenizer.partition(":")
  if kind in ("wordpiece", "bpe") and int(size) > 512:  # trained in a moment on a small corpus
    c.data.tokenizer, c.model.vocab_size = f"{kind}:512", 512
  return c


def experiment_module(name: str, relative_to: str):
  """Another experiment file as a module: `name` resolved against `relative_to`'s directory
  (experiments are files, not a package; a variant derives from its base this way)."""
  path = pathlib.Path(relative_to).resolve().parent / name
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def finalize(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Apply the `FILE:ARG` argument every experiment understands (`smoke`) and lock the keys."""
  if arg == "smoke":
    c = smoke(c)
  elif arg:
    raise ConfigError(f"unknown config argument {arg!r}; allowed: 'smoke' or none")
  c.lock()
  return c


def _check_type(key: str, value: Any, annotation: str) -> Any:
  expected = {"int": int, "float": float, "bool": bool, "str": str}[annotation]
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, bool) and expected is not bool:
    raise ConfigError(f"config.{key} must be {annotation}, got bool {value!r}")
  if not isinstance(value, expected):
    raise ConfigError(f"config.{key} must be {annotation}, got {type(value).__name__} {value!r}")
  return value


def _section(name: str, cls, values: dict) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = {k: task_config.type_name(f.type) for k, f in fields.items()}
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ConfigError(f"unknown config key config.{name}.{unknown[0]}; allowed in config.{name}: "
                      f"{', '.join(sorted(hints))}")
  typed = {k: _check_type(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
  for k, v in typed.items():
    # a task's options name their choices in field metadata (task_config.py)
    allowed = CHOICES.get(f"{name}.{k}") or fields[k].metadata.get("choices")
    if allowed and v not in allowed:
      raise ConfigError(f"config.{name}.{k}={v!r} is not one of {', '.join(allowed)}")
  return cls(**typed)


def resolve(c: ml_collections.ConfigDict | dict, *, strict: bool = True) -> Experiment:
  """ConfigDict (or its dict form) -> validated Experiment; raises ConfigError naming the key.

  `strict=False` (a run's config.json) ignores options of tasks other than the named one.
  """
  d = c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
  unknown = sorted(set(d) - set(SECTIONS) - {"name", "task", "tasks"})
  if unknown:
    raise ConfigError(f"unknown config key config.{unknown[0]}; allowed: name, "
                      f"{', '.join(SECTIONS)}, task, tasks")
  sections = {k: _section(k, cls, dict(d.get(k, {}))) for k, cls in SECTIONS.items()}
  sections["model"] = _base_quant(sections["model"], sections["finetune"], sections["train"])
  task_values = dict(d.get("task", {}))
  task = task_config.resolve_section("task", task_values, _section)
  exp = Experiment(name=_check_type("name", d.get("name", "experiment"), "str"), task=task,
                   **sections)
  # With config.tasks, config.data / config.task are the entries' defaults: each entry's view
  # of the experiment is what gets validated.
  entries = resolve_tasks(d.get("tasks"), exp, task_values, _section, validate)
  if not entries:
    validate(exp)
    if strict:
      task_config.refuse_foreign("task", task_values)
  return dataclasses.replace(exp, tasks=entries)


def _base_quant(model, finetune, train):
  """config.finetune.base_quant (QLoRA) stores the model's frozen kernels quantized: it sets
  config.model.quant, which must be unset or the same."""
  if not finetune.base_quant:
    return model
  if finetune.method in ("full", "freeze"):
    raise ConfigError(f"config.finetune.base_quant={finetune.base_quant!r} keeps the base's "
                      f"kernels quantized and frozen; config.finetune.method="
                      f"{finetune.method!r} trains them (use lora, adalora, adapter, prompt, "
                      "prefix or bitfit)")
  if not train.init_from:
    raise ConfigError(f"config.finetune.base_quant={finetune.base_quant!r} needs "
                      "config.train.init_from (the float base it quantizes)")
  if finetune.base_quant.split(":")[0] not in ("int8", "int4", "nf4"):
    raise ConfigError(f"config.finetune.base_quant={finetune.base_quant!r}: allowed int8[:gN], "
                      "int4:gN, nf4:gN")
  if model.quant not in ("", finetune.base_quant):
    raise ConfigError(f"config.finetune.base_quant={finetune.base_quant!r} but config.model."
                      f"quant={model.quant!r}")
  return dataclasses.replace(model, quant=finetune.base_quant)


def as_dict(exp: Experiment) -> dict:
  return dataclasses.asdict(exp)


def from_json(text: str) -> Experiment:
  """A run's config.json, written by this or an earlier version (which kept every task's
  options in config.task: the named task's are read, the others ignored)."""
  return resolve(json.loads(text), strict=False)

