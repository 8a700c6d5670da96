"""HF directories <-> llmjax exports (`DIR/params` orbax + `model_config.json`), and loading either.

An export written here is the same directory `llmjax export` writes (llmjax.checkpoint), plus
`model.json` (which module wraps the config: a BERT head, its label count; the special token ids)
and `tokenizer/` (the HF tokenizer files), so `generate --checkpoint=DIR` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
from flax import linen as nn

from llmjax import checkpoint
from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.hf import api, tokens
from llmjax.models import heads
from llmjax.models.transformer import Transformer

MODEL_FILE, TOKENIZER_DIR = "model.json", "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                    "tokenizer.model", "spiece.model", "chat_template.jinja")
_MODULES = {"Transformer": Transformer, "Encoder": heads.Encoder, "MaskedLM": heads.MaskedLM,
            "SequenceClassifier": heads.SequenceClassifier,
            "DecoderClassifier": heads.DecoderClassifier}


@dataclasses.dataclass
class Loaded:
  """A model ready to run: module, params, tokenizer directory (or None), special token ids."""
  model: nn.Module
  params: dict
  tokenizer_dir: str | None
  eos_token_ids: list[int]
  pad_token_id: int | None


def describe(model: nn.Module) -> dict:
  """The module class and its non-config fields, as JSON."""
  name = type(model).__name__
  if name not in _MODULES:
    raise UserError(f"cannot describe a {name}; known: {', '.join(_MODULES)}")
  extra = {f: getattr(model, f) for f in ("num_labels", "pooler") if hasattr(model, f)}
  return {"class": name, **extra}


def rebuild(cfg: ModelConfig, description: dict) -> nn.Module:
  fields = dict(description)
  name = fields.pop("class", "Transformer")
  fields.pop("eos_token_ids", None), fields.pop("pad_token_id", None)
  if name not in _MODULES:
    raise UserError(f"{MODEL_FILE}: unknown model class {name!r}; known: {', '.join(_MODULES)}")
  return _MODULES[name](cfg, **fields)


def hf_to_export(hf_path: str, out_dir: str, *, dtype: str = "float32") -> nn.Module:
  """Write an llmjax export of a HF directory (written aside, renamed when complete)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise UserError(f"--to={out_dir} already exists; choose a new directory")
  model, params = api.load(hf_path, dtype)
  special = tokens.generation_defaults(hf_path)
  tmp = out_dir + ".tmp-convert"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    checkpoint.export_params(params, dataclasses.asdict(model.cfg), tmp)
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
      json.dump({**describe(model), **special}, f, indent=2)
    _copy_tokenizer(hf_path, os.path.join(tmp, TOKENIZER_DIR))
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return model


def export_to_hf(export_dir: str, hf_path: str) -> nn.Module:
  """Write a HF directory (config, safetensors, tokenizer if the export has one) from an export."""
  loaded = load_export(export_dir)
  overrides = {"eos_token_id": (loaded.eos_token_ids[0] if len(loaded.eos_token_ids) == 1
                                else loaded.eos_token_ids or None),
               "pad_token_id": loaded.pad_token_id, "bos_token_id": None}
  api.save(loaded.model, loaded.params, hf_path, config_overrides=overrides)
  if loaded.tokenizer_dir:
    _copy_tokenizer(loaded.tokenizer_dir, hf_path)
  return loaded.model


def load_export(export_dir: str) -> Loaded:
  """An llmjax export (from `convert` or `llmjax export`), checksums verified."""
  config_file = os.path.join(export_dir, "model_config.json")
  if not os.path.isfile(config_file):
    raise UserError(f"{export_dir} is not an llmjax export (no model_config.json)")
  with open(config_file) as f:
    fields = json.load(f)
  unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelConfig)})
  if unknown:
    raise UserError(f"{config_file}: unknown model fields {unknown}")
  description = {}
  if os.path.isfile(os.path.join(export_dir, MODEL_FILE)):
    with open(os.path.join(export_dir, MODEL_FILE)) as f:
      description = json.load(f)
  model = rebuild(ModelConfig(**fields), description)
  abstract = nn.unbox(api.abstract_params(model))
  _, params = checkpoint.load_exported(export_dir, abstract)
  tokenizer_dir = os.path.join(export_dir, TOKENIZER_DIR)
  return Loaded(model, params, tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
                list(description.get("eos_token_ids", [])), description.get("pad_token_id"))


def load_any(spec: str, *, dtype: str = "float32") -> Loaded:
  """`hf:PATH` (a HF directory) or `DIR` (an llmjax export) -> Loaded."""
  if spec.startswith("hf:"):
    path = spec[3:]
    model, params = api.load(path, dtype)
    special = tokens.generation_defaults(path)
    return Loaded(model, params, path, special["eos_token_ids"], special["pad_token_id"])
  loaded = load_export(spec)
  if dtype != loaded.model.cfg.param_dtype:
    cfg = dataclasses.replace(loaded.model.cfg, dtype=dtype, param_dtype=dtype)
    loaded.model = loaded.model.clone(cfg=cfg)
    loaded.params = jax.tree.map(lambda x: x.astype(dtype), loaded.params)
  return loaded


def tokenizer_for(loaded: Loaded, spec: str | None):
  """`spec` ('byte' or 'hf:PATH') if given, else the checkpoint's own tokenizer; never a guess."""
  if spec:
    if spec.startswith("hf:"):
      return tokens.TextTokenizer(tokens.load_tokenizer(spec[3:]))
    from llmjax.data.tokenizers import get_tokenizer
    return get_tokenizer(spec)
  if loaded.tokenizer_dir is None:
    raise UserError("the checkpoint has no tokenizer/; pass --tokenizer=byte or "
                    "--tokenizer=hf:PATH (the one it was trained with)")
  return tokens.TextTokenizer(tokens.load_tokenizer(loaded.tokenizer_dir))


def _copy_tokenizer(source: str, dest: str) -> None:
  names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
  if names:
    os.makedirs(dest, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))
