"""HF directories <-> llmjax exports (`DIR/params` orbax + `model_config.json`), and loading either.

An export written here is the same directory `llmjax export` writes (llmjax.checkpoint), plus
`model.json` (which module wraps the config: a BERT head, its label count; the special token ids;
the name of a tokenizer without files, "byte")
and `tokenizer/` (the HF tokenizer files), so `generate --checkpoint=DIR` needs nothing else.
A model with state besides its parameters (a ResNet's BatchNorm statistics) has it in
`model_state/`, an export of its own (orbax + checksums) beside `params/`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax import checkpoint
from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.treepaths import path_str
from llmjax.hf import api, tokens
from llmjax.models import heads
from llmjax.models.cnn import CNN
from llmjax.models.encoder_decoder import EncoderDecoder
from llmjax.models.resnet import ResNet
from llmjax.models.rnn import RNNClassifier, RNNLM
from llmjax.models.transformer import Transformer

MODEL_FILE, TOKENIZER_DIR, MODEL_STATE_DIR = "model.json", "tokenizer", "model_state"
# model.json's key for a tokenizer that has no files ("byte"), so readers need no --tokenizer.
TOKENIZER_NAME = "tokenizer"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                    "tokenizer.model", "spiece.model", "chat_template.jinja")
_MODULES = {"Transformer": Transformer, "Encoder": heads.Encoder, "MaskedLM": heads.MaskedLM,
            "PreTraining": heads.PreTraining, "SequenceClassifier": heads.SequenceClassifier,
            "DecoderClassifier": heads.DecoderClassifier, "ResNet": ResNet, "CNN": CNN,
            "EncoderDecoder": EncoderDecoder, "RNNLM": RNNLM, "RNNClassifier": RNNClassifier}
# Module fields besides cfg that an export records (and `rebuild` passes back).
_MODULE_FIELDS = ("num_labels", "pooler", "num_classes", "in_channels", "image_size", "pooling")


@dataclasses.dataclass
class Loaded:
  """A model ready to run: module, params, tokenizer directory (or None), special token ids."""
  model: nn.Module
  params: dict
  tokenizer_dir: str | None
  eos_token_ids: list[int]
  pad_token_id: int | None
  model_state: dict = dataclasses.field(default_factory=dict)  # {"batch_stats": ...} or {}
  decoder_start_token_id: int | None = None  # encoder-decoders: the decoder's first input
  task: object = None  # a training run's task (its decoding settings); None for other weights


def describe(model: nn.Module) -> dict:
  """The module class and its non-config fields, as JSON."""
  name = type(model).__name__
  if name not in _MODULES:
    raise UserError(f"cannot describe a {name}; known: {', '.join(_MODULES)}")
  extra = {f: getattr(model, f) for f in _MODULE_FIELDS if hasattr(model, f)}
  return {"class": name, **extra}


def rebuild(cfg: ModelConfig, description: dict) -> nn.Module:
  fields = dict(description)
  name = fields.pop("class", "Transformer")
  for special in ("eos_token_ids", "pad_token_id", "decoder_start_token_id", TOKENIZER_NAME):
    fields.pop(special, None)
  if name not in _MODULES:
    raise UserError(f"{MODEL_FILE}: unknown model class {name!r}; known: {', '.join(_MODULES)}")
  return _MODULES[name](cfg, **fields)


def hf_to_export(hf_path: str, out_dir: str, *, dtype: str = "float32") -> nn.Module:
  """Write an llmjax export of a HF directory (written aside, renamed when complete)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise UserError(f"--to={out_dir} already exists; choose a new directory")
  model, params, model_state = api.load(hf_path, dtype, with_model_state=True)
  special = tokens.generation_defaults(hf_path)
  tmp = out_dir + ".tmp-convert"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    checkpoint.export_params(params, dataclasses.asdict(model.cfg), tmp)
    write_model_state(model_state, tmp)
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
  if loaded.decoder_start_token_id is not None:
    overrides["decoder_start_token_id"] = loaded.decoder_start_token_id
  api.save(loaded.model, loaded.params, hf_path, config_overrides=overrides,
           model_state=loaded.model_state)
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
  abstract = nn.unbox(api.abstract_variables(model))
  _, params = checkpoint.load_exported(export_dir, abstract.pop("params"))
  tokenizer_dir = os.path.join(export_dir, TOKENIZER_DIR)
  return Loaded(model, params, tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
                list(description.get("eos_token_ids", [])), description.get("pad_token_id"),
                read_model_state(export_dir, abstract),
                description.get("decoder_start_token_id"))


def write_model_state(model_state: dict, export_dir: str) -> None:
  """`model_state` (if any) into export_dir/model_state/, written and verified as params are."""
  if model_state:
    checkpoint.export_params(model_state, {}, os.path.join(export_dir, MODEL_STATE_DIR))


def read_model_state(export_dir: str, abstract_state: dict) -> dict:
  """The model state `write_model_state` wrote, checked against `abstract_state` (the model's
  collections besides params); UserError if the model has state and the export does not."""
  if not abstract_state:
    return {}
  where = os.path.join(export_dir, MODEL_STATE_DIR)
  if not os.path.isdir(where):
    raise UserError(f"{export_dir} has no {MODEL_STATE_DIR}/: the model keeps "
                    f"{', '.join(sorted(abstract_state))} (BatchNorm statistics) besides its "
                    "parameters, and this export holds parameters only")
  return checkpoint.load_exported(where, abstract_state)[1]


def load_hf(path: str, dtype: str = "float32") -> Loaded:
  """A Hugging Face directory, its special ids from its (generation) config."""
  model, params, model_state = api.load(path, dtype, with_model_state=True)
  special = tokens.generation_defaults(path)
  return Loaded(model, params, path, special["eos_token_ids"], special["pad_token_id"],
                model_state, special["decoder_start_token_id"])


def with_dtype(loaded: Loaded, dtype: str) -> Loaded:
  """`loaded` with its parameters, and the computation, in `dtype`."""
  if dtype != loaded.model.cfg.param_dtype:
    cfg = dataclasses.replace(loaded.model.cfg, dtype=dtype, param_dtype=dtype)
    loaded.model = loaded.model.clone(cfg=cfg)
    loaded.params = jax.tree_util.tree_map_with_path(
        lambda path, x: x if _kept(path, x) else x.astype(dtype), loaded.params)
  return loaded


def _kept(path, x) -> bool:
  """A quantized kernel's integers and float32 scales stay as stored whatever the dtype."""
  return (not jnp.issubdtype(x.dtype, jnp.floating)
          or path_str(path).rsplit("/", 1)[-1] == "kernel_scale")


def _copy_tokenizer(source: str, dest: str) -> None:
  names = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
  if names:
    os.makedirs(dest, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(dest, name))
