"""Collectives in the compiled MoE train step under each expert-parallel layout (docs/moe.md).

  python benchmarks/moe_collectives.py

On 8 simulated CPU devices (set here, before jax starts): the loop's own train step (forward,
backward, AdamW) of one Llama block with 8 experts, 2 per token, d 32, batch 8 x 16, lowered and
compiled for each (dispatch, mesh, rules); prints the count of each collective op in the HLO text.
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


def counts(hlo: str) -> dict:
  """Each op's instructions (async pairs counted once, by their -start)."""
  return {op: len(re.findall(rf"[ )]{op}(-start)?\(", hlo)) for op in OPS}


def main():
  print(f"jax {jax.__version__}, {len(jax.devices())} devices")
  for name, capacity, mesh, rules in CASES:
    b = common.build(experiment(capacity, mesh, rules))
    hlo = common.lower(b).compile().as_text()
    print(f"{name:>12}  {str(mesh):>24}  {rules:>8}  {counts(hlo)}", flush=True)


if __name__ == "__main__":
  main()
