"""Rotary scaling: the inverse frequencies (and yarn's cos/sin scale) of `config.rope_scaling`.

Each kind follows transformers' `modeling_rope_utils` step by step, in float32 like torch:
- linear: every frequency divided by the factor (positions stretched by it);
- llama3: long wavelengths (beyond original / low_freq_factor) divided by the factor, short ones
  (below original / high_freq_factor) kept, a smooth blend in between (Llama 3.1);
- yarn: a ramp between interpolated and extrapolated frequencies over the dims whose rotation
  count at the original context lies between beta_slow and beta_fast, and cos/sin scaled by the
  attention factor;
- dynamic: NTK scaling of the base once the input's longest position passes max_len, computed
  from the positions of the call (what transformers' cached update amounts to when positions only
  grow, as in one generation).
Static kinds are computed on the host once; "dynamic" depends on the positions, so it is traced.
"none" returns None: layers.rope keeps its own computation (the default frequencies).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
  exponent_H = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent_H)).astype(np.float32)


def _llama3(cfg: ModelConfig, dim: int) -> np.ndarray:
  inv_freq_H = _base_inv_freq(cfg.rope_theta, dim)
  original = cfg.rope_original_max_len or cfg.max_len
  low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
  low_wavelen, high_wavelen = original / low, original / high
  wavelen_H = (np.float32(2 * math.pi) / inv_freq_H).astype(np.float32)
  scaled_H = np.where(wavelen_H > low_wavelen, inv_freq_H / np.float32(factor), inv_freq_H)
  smooth_H = ((np.float32(original) / wavelen_H - np.float32(low)) /
              np.float32(high - low)).astype(np.float32)
  smoothed_H = (1 - smooth_H) * scaled_H / np.float32(factor) + smooth_H * scaled_H
  medium_H = ~(wavelen_H < high_wavelen) & ~(wavelen_H > low_wavelen)
  return np.where(medium_H, smoothed_H, scaled_H).astype(np.float32)


def yarn_attention_factor(cfg: ModelConfig) -> float:
  """The cos/sin scale: config.rope_attention_factor, else 0.1 ln(factor) + 1 (1 if factor <= 1)."""
  if cfg.rope_attention_factor:
    return cfg.rope_attention_factor
  return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


def _yarn(cfg: ModelConfig, dim: int) -> np.ndarray:
  base, factor = cfg.rope_theta, cfg.rope_factor
  original = cfg.rope_original_max_len or cfg.max_len

  def correction_dim(rotations: float) -> float:
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
  if cfg.rope_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # transformers' guard against a zero-width ramp
  pos_freqs_H = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) /
                         np.float32(dim)).astype(np.float32)
  extrapolated_H, interpolated_H = 1.0 / pos_freqs_H, 1.0 / (np.float32(factor) * pos_freqs_H)
  ramp_H = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) /
                   np.float32(high - low), 0, 1).astype(np.float32)
  keep_H = 1 - ramp_H  # the share of each dim's extrapolated (unscaled) frequency
  return (interpolated_H * (1 - keep_H) + extrapolated_H * keep_H).astype(np.float32)


def _dynamic(cfg: ModelConfig, dim: int, positions_BL: jax.Array) -> jax.Array:
  seq_len = jnp.maximum(jnp.max(positions_BL) + 1, cfg.max_len).astype(jnp.float32)
  factor = cfg.rope_factor
  base = cfg.rope_theta * ((factor * seq_len / cfg.max_len) - (factor - 1)) ** (dim / (dim - 2))
  exponent_H = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return 1.0 / base ** exponent_H


def frequencies(cfg: ModelConfig, dim: int, positions_BL: jax.Array):
  """(inverse frequencies [dim / 2] or None for the default ones, cos/sin scale)."""
  kind = cfg.rope_scaling
  if kind == "none":
    return None, 1.0
  if kind == "linear":
    return jnp.asarray(_base_inv_freq(cfg.rope_theta, dim) / np.float32(cfg.rope_factor)), 1.0
  if kind == "llama3":
    return jnp.asarray(_llama3(cfg, dim)), 1.0
  if kind == "yarn":
    return jnp.asarray(_yarn(cfg, dim)), yarn_attention_factor(cfg)
  if kind == "dynamic":
    return _dynamic(cfg, dim, positions_BL), 1.0
  raise ValueError(f"unknown rope_scaling {kind!r}")  # config validation names the choices
