"""PEFT export of LoRA on a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE).

transformers 5 keeps each layer's experts as two 3-d parameters of one module
(`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]) and the router as a
2-d parameter (`mlp.gate.weight`), none an nn.Linear: PEFT reaches them with `target_parameters`
(its lora.ParamWrapper), not `target_modules`. Its factors per wrapped parameter [E, out, in]:
lora_A [E*R, in] (expert-major) and lora_B [out, R*E] (rank-major), the update of expert e being
B[:, r*E + e] A[e*R + r]. llmjax's separate gate and up factors become one rank r_g + r_u pair on
the fused gate_up_proj (block-diagonal B), exactly the same update. When a module carries both
parameters PEFT nests one wrapper in the other, gate_up_proj inside (`experts.base_layer.lora_*`)
and down_proj outside (`experts.lora_*`), in the order the module defines them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmjax.hf import mapping
from llmjax.hf.mapping import Tensor
from llmjax.hf.peft_layout import unscanned

_FUSED = (".experts.gate_up_proj", ".experts.down_proj")  # the order of the module's parameters
ROUTER = ".mlp.gate"  # an HF module whose LoRA is a target parameter ("weight"), not a module


@dataclasses.dataclass(frozen=True)
class ExpertSite:
  """One fused expert parameter with LoRA on some of its parts."""
  key: str  # the HF parameter ("model.layers.0.mlp.experts.gate_up_proj")
  parts: tuple[str, ...]  # llmjax kernel paths ("layer_0/mlp/experts/wg")
  lora: tuple[bool, ...]


def _lora_path(part: str, side: str) -> str:
  head, name = part.rsplit("/", 1)
  return f"{head}/lora/{name}_{side}"


def sites(tensors: list[Tensor], flat: dict, scanned: bool) -> list[ExpertSite]:
  out = []
  for t in tensors:
    if t.hf_key.endswith(_FUSED):
      lora = tuple(mapping.target(_lora_path(p, "a"), scanned)[0] in flat for p in t.paths)
      if any(lora):
        out.append(ExpertSite(t.hf_key, t.paths, lora))
  return out


def export(site: ExpertSite, flat: dict, scanned: bool) -> tuple[np.ndarray, np.ndarray]:
  """PEFT's (lora_A [E*R, in], lora_B [out, R*E]) of one fused parameter."""
  factors = [(np.asarray(unscanned(flat, _lora_path(p, "a"), scanned), np.float32),
              np.asarray(unscanned(flat, _lora_path(p, "b"), scanned), np.float32)) if on
             else None for p, on in zip(site.parts, site.lora)]
  shapes = [unscanned(flat, p, scanned).shape for p in site.parts]  # [E, in, out] each
  e, d_in, d_out = shapes[0]
  rank = sum(f[0].shape[-1] for f in factors if f is not None)
  a_ERI = np.zeros((e, rank, d_in), np.float32)
  b_EOR = np.zeros((e, d_out * len(site.parts), rank), np.float32)
  start = 0
  for k, f in enumerate(factors):
    if f is None:
      continue
    a, b = f  # [E, in, r], [E, r, out]
    r = a.shape[-1]
    a_ERI[:, start:start + r] = a.transpose(0, 2, 1)
    b_EOR[:, k * d_out:(k + 1) * d_out, start:start + r] = b.transpose(0, 2, 1)
    start += r
  return a_ERI.reshape(e * rank, d_in), b_EOR.transpose(1, 2, 0).reshape(-1, rank * e)


def weight_keys(chosen: list[ExpertSite]) -> dict[str, str]:
  """{HF parameter: the module path its factors are saved under} (nested wrappers)."""
  modules = {}
  for s in chosen:
    modules.setdefault(s.key.rsplit(".", 1)[0], []).append(s.key)
  out = {}
  for module, keys in modules.items():
    for key in keys:
      inner = len(keys) > 1 and key.endswith(_FUSED[0])
      out[key] = f"{module}.base_layer" if inner else module
  return out
