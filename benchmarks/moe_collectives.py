"""Collectives in the compiled MoE train step under each expert-parallel layout (docs/moe.md).

  python benchmarks/moe_collectives.py

On 8 simulated CPU devices (set here, before jax starts): the loop's own train step (forward,
backward, AdamW) of one Llama block with 8 experts, 2 per token, d 32, batch 8 x 16, lowered and
compiled for each (dispatch, mesh, rules); prints the count of each collective op in the HLO text
and the bytes of their results on one device (an all-gather's result is the gathered array).
"""

from __future__ import annotations

import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import bench_common as common  # noqa: E402
from llmjax import config as config_lib  # noqa: E402

OPS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
CASES = [("capacity 1.0", 1.0, dict(data=8), "dp"), ("capacity 1.0", 1.0, dict(expert=8), "ep"),
         ("capacity 1.0", 1.0, dict(fsdp=2, expert=4), "fsdp_ep"),
         ("dropless", 0.0, dict(data=8), "dp"), ("dropless", 0.0, dict(expert=8), "ep"),
         ("dropless", 0.0, dict(fsdp=2, expert=4), "fsdp_ep")]


def experiment(capacity: float, mesh: dict, rules: str):
  model = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
               max_len=16, n_experts=8, experts_per_token=2, moe_d_ff=32,
               moe_capacity_factor=capacity)
  return config_lib.resolve({
      "model": config_lib.model_section("llama", **model).to_dict(),
      "mesh": dict(data=1, fsdp=1, tensor=1, expert=1, rules=rules) | mesh,
      "data": dict(seq_len=16), "train": dict(batch_size=8, steps=10)})


_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1,
          "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(text: str) -> list[int]:
  """Bytes of each array shape ("f32[8,16]{1,0}") in an HLO result type."""
  found = []
  for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", text):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    found.append(size * _BYTES.get(dtype, 4))
  return found


def counts(hlo: str) -> dict:
  """{op: (instructions, result bytes)} per device (async pairs counted once, by their -start,
  whose result tuple ends with the output)."""
  found = {op: [0, 0] for op in OPS}
  for line in hlo.splitlines():
    for op in OPS:
      m = re.search(rf"= (.*?) {op}(-start)?\(", line)
      if m:
        sizes = _shape_bytes(m.group(1))
        found[op][0] += 1
        found[op][1] += sizes[-1] if m.group(2) else sum(sizes)
  return {op: tuple(v) for op, v in found.items()}


def main():
  print(f"jax {jax.__version__}, {len(jax.devices())} devices")
  for name, capacity, mesh, rules in CASES:
    b = common.build(experiment(capacity, mesh, rules))
    hlo = common.lower(b).compile().as_text()
    cells = "  ".join(f"{op} {n} ({b / 1024:.1f} KiB)" for op, (n, b) in counts(hlo).items())
    print(f"{name:>12}  {str(mesh):>24}  {rules:>8}  {cells}", flush=True)


if __name__ == "__main__":
  main()
