"""FLOP counts for every task's training step, and device peaks for MFU.

Forward FLOPs per sequence of length L (multiply-add = 2 FLOPs):
  2 * L * (matmul parameters in the blocks)               projections and MLP
  (a mixture-of-experts layer: the router D * E, the shared gate D, the k routed experts and
   the shared experts: the parameters one token multiplies, not the E experts it skips)
  + 4 * N * H * (L^2 per layer, 1/2 if causal; a local    scores q.k and weighted sum p.v
      layer of window w < L: L^2 / 2 - (L - w)^2 / 2)
  + the task's head:
      lm        2 * L * D * V                             logits at every position
      mlm       2 * L * D * D + 2 * L * D * V             BERT's transform, then the logits
      classify  2 * D * D (pooled [CLS]: BERT's pooler) + 2 * D * C   one vector per sequence;
                a decoder read at its last token: 2 * D * C only. No LM logits: none computed.
Recurrent networks (models/rnn.py; embedding width D, H units, G gates: 4 LSTM, 3 GRU, 1 simple):
  each layer and direction 2 * L * G * (in + H) * H   (in: D for the first layer, H or 2H after)
  + the head over the last layer's width E (H, or 2H both ways) in place of D; no attention.
Encoder-decoders, source length S and target length T: the encoder as above (bidirectional)
over S; each decoder block as above over T (causal), plus cross-attention: q and o projections
2 * T * 2 * D * N * H, k and v of the memory 2 * S * 2 * D * K * H, scores and sum 4 * T * S * N * H;
and the logits over T.
Image models (models/resnet.py, models/cnn.py), forward FLOPs per image of side S:
  sum over convolutions of 2 * H_out * W_out * k * k * C_in * C_out   (H_out = (H + 2*(k//2) - k)
                                                                       // stride + 1)
  + sum over dense layers of 2 * in * out
BatchNorm, ReLU, pooling, the residual adds and biases are not counted (ResNet-50 at 224 px:
4.1 G multiply-adds, the figure papers quote, so 8.2 GFLOPs). Embedding lookups, norms, softmax
and elementwise work are not counted either, as is conventional for MFU; nor are LoRA factors'
and adapters' own small matmuls. So Gemma 2's soft-capping (cap * tanh(x / cap) of every
attention score and every logit) adds nothing to the count, and a gated MLP (SwiGLU, GeGLU)
counts its three weight matrices.

Training (`train_flops`): forward + backward, where the backward is an activation-gradient pass
(each weight matmul once more, and attention's two products twice: both their operands are
activations) plus a weight-gradient pass over the *trainable* weight matmuls only (a frozen
weight's gradient is never taken: llmjax.finetune differentiates the trainable part alone):

  train = forward + (W + 2 * A) + W_trainable = 3 * forward - W_frozen

with W the forward FLOPs of weight matmuls, A those of attention's products and W_frozen the
part of W against frozen weights (by each weight group's frozen share of its elements). With
everything trainable this is the conventional 3 x forward. It is an upper bound when only the
top of a model trains: JAX also skips the activation gradients below the lowest trainable weight.
Work the step does without a backward (a distillation teacher's forward) is added once.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models import layers, resnet

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


@dataclasses.dataclass(frozen=True)
class Forward:
  """One example's forward FLOPs, and which parameters its weight matmuls read."""
  total: float  # every counted FLOP of the forward pass
  # (regex searched in "a/b/c" parameter paths, forward FLOPs of the matmuls against them)
  weights: tuple[tuple[str, float], ...] = ()
  no_grad: float = 0.0  # forward-only work in the step (a distillation teacher's), counted once

  def scaled(self, factor: float) -> "Forward":
    return Forward(self.total * factor, tuple((p, f * factor) for p, f in self.weights),
                   self.no_grad * factor)

  def plus(self, other: "Forward") -> "Forward":
    return Forward(self.total + other.total, self.weights + other.weights,
                   self.no_grad + other.no_grad)


# Weight groups of the Transformer family (paths of models/transformer.py, heads.py,
# encoder_decoder.py; searched, so an `encoder/` or `heads/<task>/` prefix still matches).
_BLOCKS = r"(^|/)(layer_\d+|layers)/(attn|mlp)/\w+/kernel$"
_EXPERTS = r"(^|/)(layer_\d+|layers)/mlp/experts/(lora/)?w[igo](_[ab])?$"  # models/moe.py (+ LoRA)
_SHARED = r"(^|/)(layer_\d+|layers)/mlp/shared/\w+/kernel$"
_CROSS_QO = r"(^|/)(layer_\d+|layers)/cross_attn/[qo]/kernel$"
_CROSS_KV = r"(^|/)(layer_\d+|layers)/cross_attn/[kv]/kernel$"


def _logits_weights(cfg: ModelConfig, untied: str) -> str:
  return r"(^|/)embed/embedding$" if cfg.tie_embeddings else rf"(^|/){untied}/kernel$"


def block_matmul_params(cfg: ModelConfig) -> int:
  """Weights multiplied against every token in one dense block (biases and norms excluded)."""
  d, h = cfg.d_model, cfg.dim_per_head
  attention = d * h * (2 * cfg.n_heads + 2 * cfg.kv_heads)  # q, o and k, v
  mlp = (3 if cfg.mlp in layers.GATED else 2) * d * cfg.d_ff  # gated: wg, wi, wo
  return attention + mlp


def moe_matmul_params(cfg: ModelConfig) -> tuple[int, int, int]:
  """Weights one token multiplies in a sparse MLP: (router and shared gate, its k experts, the
  shared experts)."""
  d, per = cfg.d_model, 3 if cfg.mlp in layers.GATED else 2
  router = d * cfg.n_experts + (d if cfg.shared_expert_gate else 0)
  return router, cfg.experts_per_token * per * d * cfg.expert_d_ff, per * d * cfg.shared_width


def active_params(cfg: ModelConfig, params: dict) -> int:
  """Parameters one token uses: all of them but the (E - k) / E of every expert kernel it skips.

  `params`: parameter path -> shape (anything with .shape)."""
  experts = sum(_size(shape) for path, shape in params.items() if re.search(_EXPERTS, path))
  total = sum(_size(shape) for shape in params.values())
  if not cfg.n_experts:
    return total
  return total - experts * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts


def backbone_forward(cfg: ModelConfig, seq_len: int) -> Forward:
  """A text model's body over one sequence (its weight matmuls and attention), no head."""
  return _BACKBONES.get(cfg.arch, _transformer_forward)(cfg, seq_len)


def _transformer_forward(cfg: ModelConfig, seq_len: int) -> Forward:
  attention = 4.0 * cfg.n_heads * cfg.dim_per_head * sum(
      attended_pairs(cfg, seq_len, local) for local in cfg.local_layers())
  n_sparse = sum(cfg.moe_layers())
  if not n_sparse:
    matmul = 2.0 * seq_len * cfg.n_layers * block_matmul_params(cfg)
    return Forward(matmul + attention, ((_BLOCKS, matmul),))
  # Sparse layers: attention, the router and the k experts and shared ones a token reaches.
  dense_mlp = (3 if cfg.mlp in layers.GATED else 2) * cfg.d_model * cfg.d_ff
  router, experts, shared = (2.0 * seq_len * n_sparse * n for n in moe_matmul_params(cfg))
  blocks = 2.0 * seq_len * (cfg.n_layers * block_matmul_params(cfg) - n_sparse * dense_mlp)
  weights = ((_BLOCKS, blocks + router), (_EXPERTS, experts), (_SHARED, shared))
  return Forward(blocks + router + experts + shared + attention,
                 tuple(w for w in weights if w[1]))


def attended_pairs(cfg: ModelConfig, seq_len: int, local: bool) -> float:
  """(query, key) pairs one layer scores: L^2, half of it if causal, and in a local layer with
  window w < L the causal half less the triangle left of the window, w L - w^2 / 2."""
  full = float(seq_len) ** 2 / (2 if cfg.causal else 1)
  w = cfg.sliding_window
  if not local or w >= seq_len:
    return full
  return full - (seq_len - w) ** 2 / 2


_RNN_GATES = {"lstm": 4, "gru": 3, "simple": 1}


def _rnn_forward(cfg: ModelConfig, seq_len: int) -> Forward:
  """The recurrent stack: every layer and direction's input and recurrent kernels, per token."""
  directions, hidden = (2 if cfg.bidirectional else 1), cfg.rnn_hidden
  total, width = 0.0, cfg.d_model
  for _ in range(cfg.rnn_layers):
    total += directions * 2.0 * seq_len * _RNN_GATES[cfg.rnn_cell] * (width + hidden) * hidden
    width = directions * hidden
  return Forward(total, ((r"(^|/)rnn/layer_\d+/.*kernel$", total),))


# The text bodies by config.model.arch (every other arch: the Transformer), and the width their
# heads read.
_BACKBONES = {"rnn": _rnn_forward}
_HEAD_WIDTH = {"rnn": lambda cfg: cfg.rnn_hidden * (2 if cfg.bidirectional else 1)}


def head_width(cfg: ModelConfig) -> int:
  return _HEAD_WIDTH.get(cfg.arch, lambda c: c.d_model)(cfg)


def dense_forward(pattern: str, flops: float) -> Forward:
  """A weight matmul of `flops` FLOPs against the parameters `pattern` finds."""
  return Forward(flops, ((pattern, flops),))


def lm_forward(cfg: ModelConfig, seq_len: int) -> Forward:
  """A decoder with logits at every position (task lm)."""
  logits = 2.0 * seq_len * head_width(cfg) * cfg.vocab_size
  return backbone_forward(cfg, seq_len).plus(dense_forward(_logits_weights(cfg, "lm_head"),
                                                           logits))


def mlm_forward(cfg: ModelConfig, seq_len: int) -> Forward:
  """An encoder with BERT's masked-LM head (transform, then logits) at every position."""
  d, length = cfg.d_model, seq_len
  return backbone_forward(cfg, length).plus(
      dense_forward(r"(^|/)transform/kernel$", 2.0 * length * d * d)).plus(
      dense_forward(_logits_weights(cfg, "decoder"), 2.0 * length * d * cfg.vocab_size))


def classify_forward(cfg: ModelConfig, seq_len: int, num_classes: int, pooled: bool) -> Forward:
  """A sequence classifier: one vector per sequence (BERT's pooler on [CLS] when `pooled`, a
  decoder's last token otherwise) -> C logits; no LM logits."""
  d = cfg.d_model
  out = backbone_forward(cfg, seq_len).plus(
      dense_forward(r"(^|/)classifier/kernel$", 2.0 * head_width(cfg) * num_classes))
  return out.plus(dense_forward(r"(^|/)pooler/dense/kernel$", 2.0 * d * d)) if pooled else out


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of a decoder LM over one sequence (lm_forward's total)."""
  return lm_forward(cfg, seq_len).total


def encoder_decoder_forward(cfg: ModelConfig, source_len: int, target_len: int) -> Forward:
  """One (source, target) pair through an encoder-decoder (formula above), by weight group."""
  s, t, d, h = source_len, target_len, cfg.d_model, cfg.dim_per_head
  dec = cfg.decoder_stack()  # its own heads and MLP width
  n_dec, nh_dec = cfg.n_decoder_layers or cfg.n_layers, dec.n_heads * dec.dim_per_head
  encoder_matmul = cfg.n_layers * 2.0 * s * block_matmul_params(cfg)
  encoder_attention = cfg.n_layers * 4.0 * s * s * cfg.n_heads * h
  decoder_matmul = n_dec * 2.0 * t * block_matmul_params(dec)
  decoder_attention = n_dec * (4.0 * t * t * nh_dec / 2 + 4.0 * t * s * nh_dec)
  cross_qo = n_dec * 2.0 * t * 2 * d * nh_dec
  cross_kv = n_dec * 2.0 * s * 2 * d * dec.kv_heads * dec.dim_per_head
  logits = 2.0 * t * d * cfg.vocab_size
  weights = ((r"(^|/)encoder/" + _BLOCKS[len("(^|/)"):], encoder_matmul),
             (r"(^|/)decoder/" + _BLOCKS[len("(^|/)"):], decoder_matmul),
             (_CROSS_QO, cross_qo), (_CROSS_KV, cross_kv),
             (_logits_weights(cfg, "lm_head"), logits))
  total = (encoder_matmul + encoder_attention + decoder_matmul + decoder_attention + cross_qo
           + cross_kv + logits)
  return Forward(total, weights)


def encoder_decoder_forward_flops(cfg: ModelConfig, source_len: int, target_len: int) -> float:
  """Forward FLOPs of one (source, target) pair through an encoder-decoder (formula above)."""
  return encoder_decoder_forward(cfg, source_len, target_len).total


def train_flops(forward: Forward, params: dict | None = None,
                trainable: frozenset | None = None) -> float:
  """Training FLOPs of one example: 3 * forward - W_frozen (module docstring) + no_grad work.

  `params`: parameter path -> shape (anything with .shape); `trainable`: the paths that train
  (None: all). A weight group's frozen share is that of its elements.
  """
  frozen = 0.0
  if trainable is not None and params:
    for pattern, flops in forward.weights:
      found = re.compile(pattern)
      sizes = {path: _size(shape) for path, shape in params.items() if found.search(path)}
      total = sum(sizes.values())
      if total:
        frozen += flops * sum(n for p, n in sizes.items() if p not in trainable) / total
  return 3.0 * forward.total - frozen + forward.no_grad


def _size(shape) -> int:
  out = 1
  for n in getattr(shape, "shape", shape):
    out *= int(n)
  return out


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> float:
  """A decoder LM's training FLOPs for a batch, every parameter training (3 x forward)."""
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


def image_forward(cfg: ModelConfig, image_size: int, channels: int, num_classes: int) -> Forward:
  """An image model's forward: the classifier exactly, the convolutions (and a CNN's hidden
  layer) as one group whose frozen share is by elements (an approximation: a convolution's
  weights are used once per output pixel, which differs by stage)."""
  total = float(image_forward_flops(cfg, image_size, channels, num_classes))
  body = float(image_forward_flops(cfg, image_size, channels, 0))
  return Forward(total, ((r"^(?!(.*/)?classifier/).*kernel$", body),
                         (r"(^|/)classifier/kernel$", total - body)))


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


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted [n, n] @ [n, n] matmul on the default device (median of `repeats`),
  measured once per process: every later run in the process (tests, notebooks) compares against
  the same figure instead of paying a compile and a dozen GFLOP again."""
  wall_s = statistics.median(shot["wall_s"] for shot in matmul_shots(dtype, n, repeats))
  return 2.0 * n**3 / wall_s
