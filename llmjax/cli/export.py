"""llmjax export --workdir=DIR [--step=N] --out=DIR | --out=hf:PATH [--merge]

--out=DIR: an llmjax export (parameters only; LoRA merged into its kernels) for eval, generate,
convert and fine-tuning. --out=hf:PATH: Hugging Face files. A LoRA or AdaLoRA run becomes a PEFT
LoRA adapter (adapter_config.json + adapter_model.safetensors; with --merge, the merged full
model instead), a prompt-tuning run PEFT prompt embeddings, a full, freeze or bitfit run the full
model. An adapter whose run started from no Hugging Face model gets its frozen base in base/.
A run whose base is stored quantized (QLoRA: config.finetune.base_quant) exports the float model
it trained against: each kernel dequantized (float32), so --out=DIR, --merge and base/ hold the
dequantized base (LoRA merged into it where merged); a PEFT adapter is the same factors as over a
float base.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys

from absl import flags

from llmjax.cli import common
from llmjax.errors import UserError

# This verb's flags alone (not absl's global FLAGS): verbs share flag names (--workdir,
# --step, --out, ...) and run side by side in one process (tests, notebooks).
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest verified).",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "New directory to write the export to: DIR (llmjax) or "
                           "hf:PATH (Hugging Face / PEFT).", flag_values=FLAGS)
_MERGE = flags.DEFINE_boolean("merge", False, "With --out=hf:PATH, write a LoRA run as the "
                              "full model with its updates merged, not as a PEFT adapter.",
                              flag_values=FLAGS)

_FULL, _LORA = ("full", "freeze", "bitfit"), ("lora", "adalora")
_HF_FORMS = ("lora, adalora (a PEFT adapter, or the merged model with --merge), prompt (PEFT "
             "prompt embeddings), full, freeze, bitfit (the full model)")


def main(argv: list[str] | None = None) -> None:
  common.parse_flags(sys.argv if argv is None else argv)
  if not _WORKDIR.value or not _OUT.value:
    common.fail("--workdir=DIR and --out=DIR (or --out=hf:PATH) are required")
  with common.user_errors():
    step = export(_WORKDIR.value, _OUT.value, _STEP.value, merge=_MERGE.value)
  where = _OUT.value[3:] if _OUT.value.startswith("hf:") else _OUT.value
  print(f"exported params of step {step} to {os.path.abspath(where)}")


def check(method: str, out: str, merge: bool) -> None:
  """What a run of `method` can be exported as; UserError otherwise, before anything is read."""
  if out.startswith("hf:"):
    if method not in _FULL + _LORA + ("prompt",):
      raise UserError(f"config.finetune.method={method!r} has no Hugging Face form; --out=hf: "
                      f"exports {_HF_FORMS}")
  elif method in ("adapter", "prompt", "prefix"):
    raise UserError(f"config.finetune.method={method!r}: an llmjax export (--out=DIR) has no "
                    "place for the method's parameters yet; allowed: " + ", ".join(_FULL + _LORA)
                    + (" (or --out=hf:PATH for a PEFT prompt)" if method == "prompt" else ""))
  if merge and (method not in _LORA or not out.startswith("hf:")):
    raise UserError(f"--merge applies to --out=hf:PATH of a lora or adalora run (this run: "
                    f"method={method!r}, --out={out})")


def export(workdir: str, out: str, step: int | None = None, *, merge: bool = False) -> int:
  """Restore a verified checkpoint of `workdir` on this host's devices and write it to `out`
  (written aside and renamed when complete)."""
  from llmjax.train import rundir
  from llmjax import tasks
  exp = rundir.experiment(workdir)
  check(exp.finetune.method, out, merge)
  task = rundir.task(workdir, exp)
  if not tasks.supports(task, tasks.Exportable):
    raise UserError(f"--workdir={workdir}: its {task.name} task has no one model to export "
                    "(its task does not declare Exportable; a multi-task run has one model per "
                    "head); exporting it is not supported yet")
  dest = os.path.abspath(out[3:] if out.startswith("hf:") else out)
  if os.path.exists(dest):
    raise UserError(f"--out={out} already exists; choose a new directory")
  run = _dequantized(rundir.restore(workdir, step))
  if not out.startswith("hf:"):
    _to_llmjax(run, workdir, dest)
    return run.step
  tmp = dest + ".tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    _to_hf(run, workdir, tmp, dest, merge)
    os.rename(tmp, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return run.step


def _dequantized(run):
  """`run` as the float model its stored kernels stand for (a QLoRA run's quantized base, or a
  run of a quantized model): every quantized kernel dequantized to float32 (one jit per part of
  the state), config.model.quant unset. Other runs are returned as they are."""
  if not run.exp.model.quant:
    return run
  import jax.numpy as jnp

  from llmjax import treepaths
  from llmjax.hf import api
  from llmjax.models import quant_tree
  found = quant_tree.layouts(lambda: api.abstract_variables(run.model))

  def dequantized(tree):
    paths = {p for p, _ in treepaths.items(tree or {})}
    here = {p: layout for p, layout in found.items() if f"{p}/kernel" in paths}
    return quant_tree.dequantize_tree(tree, here, jnp.float32) if here else tree

  cfg = dataclasses.replace(run.exp.model, quant="", quant_compute="dequant")
  state = run.state.replace(params=dequantized(run.state.params),
                            frozen=dequantized(run.state.frozen))
  return dataclasses.replace(run, exp=dataclasses.replace(run.exp, model=cfg),
                             model=run.model.clone(cfg=cfg), state=state)


def _merged(run):
  """(model, params) of a plain model: LoRA updates folded into the kernels, factors gone."""
  from llmjax.finetune import lora
  from llmjax.models.peft import Peft
  if run.exp.finetune.method not in _LORA:
    return run.model, run.params
  return run.model.clone(peft=Peft()), lora.merged(run.params, run.model.peft)


def _to_llmjax(run, workdir: str, dest: str) -> None:
  import jax

  from llmjax import checkpoint
  from llmjax.hf import convert
  model, params = _merged(run)
  # Which module wraps the config (a BERT head, its label count) and the run's vocabulary, so
  # `llmjax convert --to=hf:` and `generate` need nothing else.
  special = _special_tokens(run.task.info)  # model.json lists EOS ids, as hf_to_export does
  eos = special.pop("eos_token_id", None)
  described = {**convert.describe(model), **special,
               **({"eos_token_ids": [eos]} if eos is not None else {})}
  extra = {}
  tokenizer = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(tokenizer):
    with open(tokenizer) as f:
      extra[os.path.join(convert.TOKENIZER_DIR, "tokenizer.json")] = f.read()
  elif run.task.info.get("tokenizer"):  # a vocabulary without files ("byte"): its name
    described[convert.TOKENIZER_NAME] = run.task.info["tokenizer"]
  extra[convert.MODEL_FILE] = json.dumps(described, indent=2)
  # BatchNorm statistics (if any) go beside params/ before the export takes its name.
  staged = dest + ".tmp-staged"
  shutil.rmtree(staged, ignore_errors=True)
  try:
    checkpoint.export_params(jax.device_get(params), dataclasses.asdict(run.exp.model), staged,
                             extra)
    convert.write_model_state(jax.device_get(run.state.model_state), staged)
    os.rename(staged, dest)
  finally:
    shutil.rmtree(staged, ignore_errors=True)


def _save_full(model, params, workdir: str, path: str, info: dict, model_state=None) -> None:
  """A full HF model directory, with the run's label names and vocabulary when it has them."""
  from llmjax import hf
  names = info.get("label_names")
  overrides = ({"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
               if names and len(names) == getattr(model, "num_labels", None) else None)
  overrides = {**(overrides or {}), **_special_tokens(info)} or None
  hf.save(model, params, path, config_overrides=overrides, model_state=model_state or None)
  tokenizer = os.path.join(workdir, "tokenizer.json")
  if os.path.isfile(tokenizer):
    shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.json"))


def _special_tokens(info: dict) -> dict:
  """The special token ids a run's data fixed (seq2seq: pad, EOS, the decoder's start), as HF
  config fields; {} for runs without them."""
  names = {"pad_id": "pad_token_id", "eos_id": "eos_token_id",
           "start_id": "decoder_start_token_id"}
  return {hf_name: int(info[ours]) for ours, hf_name in names.items() if ours in info}


def _to_hf(run, workdir: str, tmp: str, dest: str, merge: bool) -> None:
  import jax

  from llmjax.finetune import partition
  from llmjax.hf import peft as hfpeft
  info = run.task.info  # what the run's data revealed: label names, special ids
  method = run.exp.finetune.method
  if method in _FULL or merge:
    _save_full(*_merged(run), workdir, tmp, info, run.state.model_state)
    return
  params = jax.device_get(run.params)
  hf_base = base = _hf_base(run.exp.train.init_from)
  if base is None:  # the frozen base exists nowhere in HF form: write it next to the adapter
    base_params = partition.nest({p: x for p, x in partition.items(params)
                                  if "/lora/" not in p and p.split("/")[-1] != "prompt"})
    _save_full(run.model.clone(peft=hfpeft.Peft()), base_params, workdir,
               os.path.join(tmp, "base"), info)
    base = os.path.join(dest, "base")
  if method == "prompt":
    hfpeft.save_prompt(run.model, params, tmp, base_model_path=base)
    return
  # Saved whole: what trained besides LoRA (heads), and fresh heads an HF base does not have.
  saved = [p for p, _ in partition.items(run.state.params) if "/lora/" not in p]
  if run.exp.train.init_new and hf_base:
    fresh = re.compile(run.exp.train.init_new)
    saved += [p for p, _ in partition.items(params) if fresh.fullmatch(p) and "/lora/" not in p]
  hfpeft.save_adapter(run.model, params, run.model.peft, tmp, base_model_path=base,
                      modules_to_save=saved)


def _hf_base(init_from: str) -> str | None:
  """The absolute HF directory a run's base came from (hf:PATH, or a PEFT adapter's base)."""
  from llmjax import weights
  return weights.parse(init_from, "config.train.init_from").hf_dir() if init_from else None
