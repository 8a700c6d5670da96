"""FLOP counts for Transformer and image-model training, and device peaks for MFU.

Forward FLOPs per sequence of length L (multiply-add = 2 FLOPs):
  2 * L * (matmul parameters in the blocks)               projections and MLP
  + n_layers * 4 * L^2 * N * H * (1/2 if causal)          scores q.k and weighted sum p.v
  + 2 * L * D * V                                         logits (tied or untied head)
Encoder-decoders, source length S and target length T: the encoder as above (bidirectional)
over S; each decoder block as above over T (causal), plus cross-attention: q and o projections
2 * T * 2 * D * N * H, k and v of the memory 2 * S * 2 * D * K * H, scores and sum 4 * T * S * N * H;
and the logits over T.
Training = 3 x forward (backward costs two forwards). Embedding lookups, norms, softmax and
elementwise work are not counted, as is conventional for MFU.

Image models (models/resnet.py, models/cnn.py), forward FLOPs per image of side S:
  sum over convolutions of 2 * H_out * W_out * k * k * C_in * C_out   (H_out = (H + 2*(k//2) - k)
                                                                       // stride + 1)
  + sum over dense layers of 2 * in * out
BatchNorm, ReLU, pooling, the residual adds and biases are not counted (ResNet-50 at 224 px:
4.1 G multiply-adds, the figure papers quote, so 8.2 GFLOPs). Training = 3 x forward x batch.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models import resnet

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


def encoder_decoder_forward_flops(cfg: ModelConfig, source_len: int, target_len: int) -> float:
  """Forward FLOPs of one (source, target) pair through an encoder-decoder (formula above)."""
  s, t, d, h = source_len, target_len, cfg.d_model, cfg.dim_per_head
  per_block = block_matmul_params(cfg)
  encoder = cfg.n_layers * (2.0 * s * per_block + 4.0 * s * s * cfg.n_heads * h)
  cross = (2.0 * t * 2 * d * cfg.n_heads * h + 2.0 * s * 2 * d * cfg.kv_heads * h
           + 4.0 * t * s * cfg.n_heads * h)
  self_attention = 4.0 * t * t * cfg.n_heads * h / 2
  decoder = (cfg.n_decoder_layers or cfg.n_layers) * (2.0 * t * per_block + self_attention + cross)
  return encoder + decoder + 2.0 * t * d * cfg.vocab_size


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  return 3.0 * batch_size * forward_flops_per_sequence(cfg, seq_len)


def _conv_out(size: int, kernel: int, stride: int) -> int:
  return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _resnet_macs(cfg: ModelConfig, size: int, channels: int, num_classes: int) -> int:
  kernel, stride, pool = resnet.STEMS[cfg.stem]
  size = _conv_out(size, kernel, stride)
  macs, c = size * size * kernel * kernel * channels * cfg.stem_width, cfg.stem_width
  size = _conv_out(size, 3, 2) if pool else size
  for _, _, convs, stride in resnet.block_plan(cfg):
    c_in, size_in = c, size
    for kernel, conv_stride, c_out in convs:
      size = _conv_out(size, kernel, conv_stride)
      macs, c = macs + size * size * kernel * kernel * c * c_out, c_out
    if c_in != c or stride != 1:  # the 1x1 projection shortcut
      macs += _conv_out(size_in, 1, stride) ** 2 * c_in * c
  return macs + c * num_classes


def _cnn_macs(cfg: ModelConfig, size: int, channels: int, num_classes: int) -> int:
  macs, c = 0, channels
  for width in resnet.ints(cfg.cnn_widths, "cnn_widths"):
    macs, c = macs + size * size * 9 * c * width, width  # 3x3, stride 1, padded
    size //= 2  # 2x2 max-pool
  return macs + size * size * c * cfg.cnn_hidden + cfg.cnn_hidden * num_classes


_IMAGE_MACS = {"resnet": _resnet_macs, "cnn": _cnn_macs}


def image_forward_flops(cfg: ModelConfig, image_size: int, channels: int,
                        num_classes: int) -> int:
  """Forward FLOPs of one square image through `cfg`'s image model (num_classes=0: no head)."""
  return 2 * _IMAGE_MACS[cfg.arch](cfg, image_size, channels, num_classes)


def image_train_flops_per_step(cfg: ModelConfig, batch_size: int, image_size: int, channels: int,
                               num_classes: int) -> int:
  return 3 * batch_size * image_forward_flops(cfg, image_size, channels, num_classes)


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
