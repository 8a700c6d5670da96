"""The two ways a Hugging Face MoE checkpoint stores its experts, one seen as the other.

transformers 5 computes with fused expert tensors, one per layer and projection:
`mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj` [E, D, F];
the router is `mlp.gate.weight` [E, D]. Its `save_pretrained` writes by default the original
per-expert layout every published checkpoint has (and older transformers, vLLM and PEFT's
checkpoints name): Qwen-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`, Mixtral
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` and `block_sparse_moe.gate.weight`.

llmjax's tensor tables (hf/moe.py) name the fused layout. `DiskView` shows a directory in the
per-expert layout as fused tensors (each stacked from its experts' tensors when read: one layer's
projection on the host at a time); `to_disk` splits fused tensors back into the per-expert
layout for writing. A directory already in the fused layout (save_original_format=False) is read
as it is.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

# (fused projection, its parts in order) -> the per-expert names of each naming scheme
_PARTS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
NAMES = {"qwen": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
         "mixtral": {"gate": "w1", "up": "w3", "down": "w2"}}
_BLOCK = {"qwen": "mlp", "mixtral": "block_sparse_moe"}
_PER_EXPERT = re.compile(r"^(?P<layer>.*)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                         r"(?P<name>\w+)\.weight$")
_MIXTRAL_ROUTER = re.compile(r"^(?P<layer>.*)\.block_sparse_moe\.gate\.weight$")


@dataclasses.dataclass(frozen=True)
class _Virtual:
  shape: tuple[int, ...]
  dtype: str


class DiskView:
  """`index` (a files.WeightIndex) with each layer's complete per-expert tensors shown as the
  fused ones (and Mixtral's block_sparse_moe router as mlp.gate); anything incomplete is left as
  it is, for the key check to name."""

  def __init__(self, index, scheme: str):
    self.directory, self._index, names = index.directory, index, NAMES[scheme]
    by_name = {v: k for k, v in names.items()}
    groups: dict[str, dict[tuple[str, int], str]] = {}
    for key in index.entries:
      match = _PER_EXPERT.match(key)
      if match and match["name"] in by_name:
        groups.setdefault(match["layer"], {})[(by_name[match["name"]], int(match["e"]))] = key
    self.entries: dict = dict(index.entries)
    self._sources: dict[str, list[list[str]]] = {}  # fused key -> [part][expert] disk keys
    for layer, found in groups.items():
      n = 1 + max(e for _, e in found)
      for fused, parts in _PARTS.items():
        keys = [[found.get((p, e)) for e in range(n)] for p in parts]
        if any(k is None for row in keys for k in row):
          continue
        first = [index.entries[row[0]] for row in keys]
        shapes = {index.entries[k].shape for row in keys for k in row}
        if len({s[1] for s in shapes}) != 1 or len({s[0] for s in shapes}) != 1:
          continue  # ragged experts: left for the key check to name
        rows = sum(f.shape[0] for f in first)
        self._add(f"{layer}.mlp.experts.{fused}", keys,
                  _Virtual((n, rows, first[0].shape[1]), first[0].dtype))
    for key in list(index.entries):
      match = _MIXTRAL_ROUTER.match(key)
      if match and scheme == "mixtral":
        self._add(f"{match['layer']}.mlp.gate.weight", [[key]], index.entries[key])

  def _add(self, key: str, sources: list[list[str]], entry) -> None:
    for row in sources:
      for k in row:
        self.entries.pop(k, None)
    self.entries[key] = entry
    self._sources[key] = sources

  def read(self, key: str) -> np.ndarray:
    sources = self._sources.get(key)
    if sources is None:
      return self._index.read(key)
    if len(sources) == 1 and len(sources[0]) == 1:  # a renamed tensor
      return self._index.read(sources[0][0])
    # [E, rows of every part, in]: each expert's parts concatenated (gate rows, then up rows)
    return np.stack([np.concatenate([self._index.read(row[e]) for row in sources], axis=0)
                     for e in range(len(sources[0]))])


def to_disk(tensors: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
  """Fused expert tensors split into the per-expert layout of `scheme` (what transformers'
  save_pretrained writes); the rest unchanged (Mixtral's router renamed too)."""
  names, block, out = NAMES[scheme], _BLOCK[scheme], {}
  for key, value in tensors.items():
    match = re.match(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$", key)
    if match:
      layer, parts = match[1], _PARTS[match[2]]
      for e in range(value.shape[0]):
        for part, piece in zip(parts, np.split(value[e], len(parts), axis=0)):
          out[f"{layer}.{block}.experts.{e}.{names[part]}.weight"] = piece
    elif scheme == "mixtral" and key.endswith(".mlp.gate.weight"):
      out[key[:-len("mlp.gate.weight")] + "block_sparse_moe.gate.weight"] = value
    else:
      out[key] = value
  return out
