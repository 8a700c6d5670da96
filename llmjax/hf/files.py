"""The files of a Hugging Face model directory: config.json and safetensors weights (no pickle).

Weights are read lazily: the index holds only names, shapes and dtypes from the safetensors
headers, and `read` pulls one tensor at a time from its memory-mapped file.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 tensors can be read)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax.hf.errors import HFError, PickleWeightsError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


def read_config(directory: str) -> dict:
  """config.json as a dict; HFError if the directory or file is missing or not JSON."""
  if not os.path.isdir(directory):
    raise HFError(f"{directory} is not a directory (expected a Hugging Face model directory)")
  return read_json(os.path.join(directory, "config.json"), HFError,
                   f"{directory} has no config.json: not a Hugging Face model directory")


def read_json(path: str, error: type[Exception], missing: str) -> dict:
  """A JSON file as a dict: `error(missing)` when there is none, `error` naming it when it is
  not readable JSON."""
  if not os.path.isfile(path):
    raise error(missing)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise error(f"{path} is not readable JSON: {e}") from e


@dataclasses.dataclass(frozen=True)
class Entry:
  file: str
  shape: tuple[int, ...]
  dtype: str


class WeightIndex:
  """key -> (file, shape, dtype) over model.safetensors or a sharded index; refuses *.bin."""

  def __init__(self, directory: str):
    self.directory = directory
    self.entries: dict[str, Entry] = {}
    for file in _weight_files(directory):
      try:
        with safe_open(file, framework="np") as f:
          for key in f.keys():
            piece = f.get_slice(key)
            self.entries[key] = Entry(file, tuple(piece.get_shape()), piece.get_dtype())
      except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise HFError(f"{file} is not a readable safetensors file: {e}") from e

  def read(self, key: str) -> np.ndarray:
    """One tensor, copied out of its memory-mapped file."""
    entry = self.entries[key]
    with safe_open(entry.file, framework="np") as f:
      return np.asarray(f.get_tensor(key))


def _weight_files(directory: str) -> list[str]:
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise HFError(f"{index} lists {missing[0]}, which does not exist")
    return files
  if os.path.isfile(single):
    return [single]
  pickles = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin")))
  if pickles:
    raise PickleWeightsError(
        f"{directory} has only pickled weights ({', '.join(pickles)}); llmjax reads safetensors "
        "only, since unpickling can run arbitrary code. Convert them once where you trust the "
        "file, e.g. transformers' from_pretrained(...).save_pretrained(dir, "
        "safe_serialization=True)")
  raise HFError(f"{directory} has no {SINGLE} or {INDEX}")


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
  """`path` as safetensors with the mode open() gives any other file (0666 less the umask)."""
  save_file(tensors, path, metadata={"format": "pt"})  # the format tag torch writes, which
  # transformers expects; safetensors creates the file 0600 whatever the umask
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def write(directory: str, tensors: dict[str, np.ndarray], config: dict) -> None:
  """model.safetensors + config.json, each written to a temporary name and renamed into place."""
  os.makedirs(directory, exist_ok=True)
  weights, config_path = os.path.join(directory, SINGLE), os.path.join(directory, "config.json")
  # reshape: ascontiguousarray makes a 0-d array (num_batches_tracked) 1-d
  save_safetensors({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()},
                   weights + ".tmp")
  with open(config_path + ".tmp", "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(weights + ".tmp", weights)
  os.replace(config_path + ".tmp", config_path)
