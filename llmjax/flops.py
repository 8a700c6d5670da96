"""FLOP counts for Transformer training, and device peaks for MFU.

Forward FLOPs per sequence of length L (multiply-add = 2 FLOPs):
  2 * L * (matmul parameters in the blocks)               projections and MLP
  + n_layers * 4 * L^2 * N * H * (1/2 if causal)          scores q.k and weighted sum p.v
  + 2 * L * D * V                                         logits (tied or untied head)
Training = 3 x forward (backward costs two forwards). Embedding lookups, norms, softmax and
elementwise work are not counted, as is conventional for MFU.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig

# Dense datasheet peaks in FLOP/s by dtype, keyed by a substring of jax's device_kind; the
# first matching key wins, so more specific names come first.
PEAKS = {
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},
    "TPU v6": {"bfloat16": 918e12},
}


def block_matmul_params(cfg: ModelConfig) -> int:
  """Weights multiplied against every token in one block (biases and norms excluded)."""
  d, h = cfg.d_model, cfg.dim_per_head
  attention = d * h * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # q, o and k, v
  mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.d_ff
  return attention + mlp


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
  matmul = 2.0 * seq_len * cfg.n_layers * block_matmul_params(cfg)
  attention = cfg.n_layers * 4.0 * seq_len**2 * cfg.n_heads * cfg.dim_per_head
  if cfg.causal:
    attention /= 2
  logits = 2.0 * seq_len * cfg.d_model * cfg.vocab_size
  return matmul + attention + logits


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  return 3.0 * batch_size * forward_flops_per_sequence(cfg, seq_len)


def device_peak(device_kind: str, dtype: str) -> float | None:
  """Datasheet dense peak for this device and dtype, or None when unknown (CPUs)."""
  for key, peaks in PEAKS.items():
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def matmul_shots(dtype: str, n: int, repeats: int) -> list[dict]:
  """`repeats` single [n, n] @ [n, n] jitted matmuls on the default device, one compile: each
  shot's wall and process-CPU seconds (user + system, all threads) and FLOP/s by both."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  shots = []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    matmul(a).block_until_ready()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    shots.append({"wall_s": wall, "cpu_s": cpu, "flops_per_s": 2.0 * n**3 / wall,
                  "flops_per_cpu_s": 2.0 * n**3 / cpu})
  return shots


def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul on the default device (median of `repeats`)."""
  wall_s = statistics.median(shot["wall_s"] for shot in matmul_shots(dtype, n, repeats))
  return 2.0 * n**3 / wall_s
