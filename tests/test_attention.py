"""Attention cores: the blocked causal core computes what jax's XLA attention computes, values
and gradients, with grouped-query heads, packed-segment masks and a last block shorter than the
others; "auto" picks it for causal models on CPU."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax.models import attention

B, L, N, K, H = 2, 19, 4, 2, 8  # 19 = 4 blocks of 5 with a last block of 4


def qkv(dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = ((B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H))
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def packed_mask():
  segment_ids_BL = jnp.array([[1] * 7 + [2] * 12, [1] * 15 + [0] * 4], jnp.int32)
  return attention.segment_mask(segment_ids_BL)


# Jitted: run eagerly, each of the blocked core's many primitives compiled on its own (a minute).
@jax.jit
def xla_core(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


@jax.jit
def blocked_core(q, k, v, mask):
  return attention.blocked_causal_attention(q, k, v, mask, block=5)


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per primitive run eagerly
def value_and_grads(core, q, k, v, ct, mask):
  out, vjp = jax.vjp(lambda q, k, v: core(q, k, v, mask), q, k, v)
  return (out, *vjp(ct))


@pytest.mark.parametrize("masked", [True, False])
def test_blocked_equals_xla_attention_values_and_grads(masked):
  q, k, v, ct = qkv(jnp.float32)
  mask = packed_mask() if masked else None
  want = value_and_grads(xla_core, q, k, v, ct, mask)
  got = value_and_grads(blocked_core, q, k, v, ct, mask)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def test_blocked_never_sees_the_future():
  q, k, v, _ = qkv(jnp.float32)
  later = 11
  k2, v2 = k.at[:, later:].add(1.0), v.at[:, later:].add(1.0)
  a = blocked_core(q, k, v, None)
  b = blocked_core(q, k2, v2, None)
  np.testing.assert_array_equal(a[:, :later], b[:, :later])
  assert np.abs(np.asarray(a[:, later:] - b[:, later:])).min() > 0


def test_blocked_bfloat16_stays_close_to_float32():
  q, k, v, _ = qkv(jnp.float32)
  want = xla_core(q, k, v, packed_mask())
  got = blocked_core(*(x.astype(jnp.bfloat16) for x in (q, k, v)), packed_mask())
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_auto_picks_blocked_for_causal_models_on_cpu_only_when_blocks_can_be_skipped():
  base = config_lib.resolve({"model": config_lib.model_section("llama").to_dict()}).model
  assert jax.default_backend() == "cpu"
  assert attention.implementation(base, 128) == "blocked"
  assert attention.implementation(base, base.attention_block) == "xla"  # one block: nothing skipped
  assert attention.implementation(dataclasses.replace(base, causal=False), 128) == "xla"
  assert attention.implementation(dataclasses.replace(base, attention_impl="xla"), 128) == "xla"


def test_cudnn_falls_back_to_xla_only_when_auto_chose_it():
  if jax.default_backend() != "cpu":
    pytest.skip("needs a backend without cuDNN")
  q, k, v, _ = qkv(jnp.bfloat16)
  want = xla_core(q, k, v, packed_mask())
  got = attention.fused_attention(q, k, v, packed_mask(), True, "cudnn", fallback=True)
  np.testing.assert_array_equal(got, want)  # this CPU has no cuDNN: XLA ran
  with pytest.raises(RuntimeError, match="cuDNN"):
    attention.fused_attention(q, k, v, packed_mask(), True, "cudnn", fallback=False)


def test_auto_on_gpu_picks_cudnn_for_half_precision_only(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  base = config_lib.resolve({"model": config_lib.model_section("llama").to_dict()}).model
  assert attention.implementation(dataclasses.replace(base, dtype="bfloat16"), 128) == "cudnn"
  assert attention.implementation(base, 128) == "xla"
