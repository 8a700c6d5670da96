"""Weights sources (llmjax.weights): a LoRA run keeps the base step it started from when its base
run trains on (resume, eval, export), exact `workdir:PATH@STEP` specs, and the verbs that read
weights take a run or an export with the tokenizer the weights record."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import llmjax.train
from llmjax import checkpoint, weights
from llmjax.checkpoint import CheckpointError
from llmjax.errors import UserError

import _cli as _cli_lib
from _task_helpers import experiment


def _with_train(exp, **train):
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, **train))


# In this process (tests/_cli.py): test_generate starts generate as a process of its own.
_cli = _cli_lib.run


def _exported_params(path):
  from llmjax.hf import convert
  return jax.device_get(convert.load_export(str(path)).params)


def test_a_lora_run_keeps_the_base_step_it_started_from_when_the_base_trains_on(lm_run,
                                                                                tmp_path):
  from llmjax.cli import export
  from llmjax.eval import evaluate
  base, lora = tmp_path / "base", tmp_path / "lora"
  base_exp = experiment("lm", tmp_path)  # 4 steps, a checkpoint at 4
  # conftest's lm_run is this experiment's run (read only: the base that trains on is a copy).
  shutil.copytree(lm_run, base)
  lora_exp = experiment("lm", tmp_path, finetune=dict(method="lora"),
                        train=dict(init_from=f"workdir:{base}"))
  llmjax.train.run(lora_exp, str(lora))
  assert (lora / "samples.txt").read_text() == ""  # sample_prompts=0: the file, nothing sampled
  pinned = f"workdir:{base}@4"  # the step it started from, recorded
  assert json.loads((lora / "config.json").read_text())["train"]["init_from"] == pinned
  assert json.loads((lora / "params.json").read_text())["base"]["init_from"] == pinned
  before = evaluate.evaluate_run(str(lora))["loss"]
  assert export.export(str(lora), str(tmp_path / "before")) == 4

  llmjax.train.run(_with_train(base_exp, steps=8), str(base))  # the base trains on
  assert checkpoint.saved_steps(str(base / "checkpoints")) == [4, 8]
  assert evaluate.evaluate_run(str(lora))["loss"] == before
  assert export.export(str(lora), str(tmp_path / "after")) == 4
  jax.tree.map(np.testing.assert_array_equal, _exported_params(tmp_path / "before"),
               _exported_params(tmp_path / "after"))
  # Resumed with the experiment's own spec (no step), the run goes on from its recorded base.
  llmjax.train.run(_with_train(lora_exp, steps=6), str(lora))
  assert checkpoint.saved_steps(str(lora / "checkpoints"))[-1] == 6
  assert json.loads((lora / "config.json").read_text())["train"]["init_from"] == pinned

  # Another step than the one recorded: one line naming both and the step to pass.
  with pytest.raises(CheckpointError) as moved:
    llmjax.train.run(_with_train(lora_exp, steps=8, init_from=f"workdir:{base}@8"), str(lora))
  message = str(moved.value)
  assert "\n" not in message and f"'{pinned}'" in message and "@8" in message, message
  # A step the base run does not have: one line listing the ones it has; nothing written.
  with pytest.raises(UserError) as missing:
    llmjax.train.run(_with_train(lora_exp, init_from=f"workdir:{base}@3"), str(tmp_path / "new"))
  message = str(missing.value)
  assert "\n" not in message and "no checkpoint step 3" in message, message
  assert "available steps: 4, 8" in message and "config.train.init_from=" in message
  assert not (tmp_path / "new").exists()


def test_generate_reads_a_run_and_its_export_with_the_tokenizer_they_record(lm_run, tmp_path):
  # lm_run: a byte-level LM of 4 steps (conftest), read only.
  from llmjax.cli import export
  export.export(str(lm_run), str(tmp_path / "export"))
  described = json.loads((tmp_path / "export" / "model.json").read_text())
  assert described["tokenizer"] == "byte" and not (tmp_path / "export" / "tokenizer").exists()
  outputs = []
  for source in (f"workdir:{lm_run}@4", str(tmp_path / "export")):  # no --tokenizer
    proc = _cli("generate", f"--checkpoint={source}", "--prompt=the cat", "--max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outputs.append(proc.stdout)
  assert outputs[0] == outputs[1] and outputs[0].startswith("the cat"), outputs
  # The same weights, whichever way they are named.
  from llmjax.train import rundir
  run_source, from_run = rundir.open_weights(str(lm_run), "--checkpoint")
  export_source, from_export = rundir.open_weights(f"export:{tmp_path / 'export'}", "--checkpoint")
  assert isinstance(run_source, weights.WorkdirSource)
  assert isinstance(export_source, weights.ExportSource)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_run.params),
               jax.device_get(from_export.params))
  assert run_source.tokenizer().name == export_source.tokenizer().name == "byte"


def test_sources_parse_and_name_what_is_allowed(lm_run, tmp_path):
  source = weights.parse(f"workdir:{lm_run}@4", "config.train.init_from")
  assert (source.path, source.step) == (str(lm_run), 4)
  assert source.pinned() is source and source.pins(weights.parse(f"workdir:{lm_run}", "k"))
  assert weights.parse(f"workdir:{lm_run}", "k").pinned().spec == f"workdir:{lm_run}@4"
  assert source.model_fields()["d_model"] == 32
  assert source.shapes(scanned=False) == checkpoint.saved_param_shapes(
      os.path.join(lm_run, "checkpoints"))
  for spec, match in (("nope:/x", "allowed hf:DIR, export:DIR, workdir:PATH"),
                      ("hf:", "no path after 'hf:'"),
                      (f"workdir:{tmp_path}", "no checkpoints/")):
    with pytest.raises(UserError, match=match):
      weights.parse(spec, "config.train.init_from").pinned()
  with pytest.raises(UserError, match="not a directory of weights"):
    weights.parse_checkpoint(str(tmp_path), "--checkpoint")
  with pytest.raises(UserError, match="records no tokenizer"):
    weights.parse(f"export:{tmp_path}", "--checkpoint").tokenizer()
