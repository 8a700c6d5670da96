"""An llmjax export quantized into a new export (`llmjax quantize`): the same files, the dense
kernels (and convolutions) stored as config.model.quant says (llmjax/models/quant.py), and
quantization.json with each kernel's relative error and the sizes on disk.

The quantized export is an ordinary export whose model_config.json names `quant`: every reader
of exports (`export:DIR` weights, eval, generate, chat, init_from) builds the quantized model
from it and loads the stored integers as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax

from llmjax import checkpoint
from llmjax.errors import UserError
from llmjax.hf import api, convert
from llmjax.models import quant as quantlib
from llmjax.models import quant_tree

REPORT_FILE = "quantization.json"
_COPIED = (convert.MODEL_FILE, convert.TOKENIZER_DIR, convert.MODEL_STATE_DIR)


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def check_source(export_dir: str, key: str) -> dict:
  """The export's model fields; UserError if it is no export or is quantized already."""
  file = os.path.join(export_dir, "model_config.json")
  if not os.path.isfile(file):
    raise UserError(f"{key}={export_dir}: not an llmjax export (no model_config.json)")
  with open(file) as f:
    fields = json.load(f)
  if fields.get("quant"):
    raise UserError(f"{key}={export_dir}: already quantized (model.quant={fields['quant']!r}); "
                    "quantize the float export it came from")
  return fields


def quantize_export(export_dir: str, out: str, spec: str, key: str = "--checkpoint") -> dict:
  """Write `out` (aside, then renamed) from the float export `export_dir`; the report."""
  check_source(export_dir, key)
  quantlib.parse(spec, "--bits/--group_size/--format")
  dest = os.path.abspath(out)
  if os.path.exists(dest):
    raise UserError(f"--out={out} already exists; choose a new directory")
  loaded = convert.load_export(export_dir)
  qmodel, found = api.quantized_model(loaded.model, spec)
  if not found:
    raise UserError(f"{key}={export_dir}: the model has no dense kernels to quantize")
  params = jax.device_get(loaded.params)
  qparams = jax.device_get(quant_tree.quantize_tree(params, found))
  errors = quant_tree.relative_errors(params, qparams, found)
  staged = dest + ".tmp-staged"
  shutil.rmtree(staged, ignore_errors=True)
  try:
    checkpoint.export_params(qparams, dataclasses.asdict(qmodel.cfg), staged)
    for name in _COPIED:
      src = os.path.join(export_dir, name)
      if os.path.isdir(src):
        shutil.copytree(src, os.path.join(staged, name))
      elif os.path.isfile(src):
        shutil.copyfile(src, os.path.join(staged, name))
    report = {"quant": spec, "source": os.path.abspath(export_dir),
              "params_bytes": {"float": dir_bytes(os.path.join(export_dir, "params")),
                               "quantized": dir_bytes(os.path.join(staged, "params"))},
              "array_bytes": {"float": quant_tree.nbytes(params),
                              "quantized": quant_tree.nbytes(qparams)},
              "relative_error": errors}
    with open(os.path.join(staged, REPORT_FILE), "w") as f:
      json.dump(report, f, indent=2)
    os.rename(staged, dest)
  finally:
    shutil.rmtree(staged, ignore_errors=True)
  return report
