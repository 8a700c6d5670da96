"""Splash attention (models/splash.py) in Pallas interpret mode equals the XLA path, values to
1e-5 and gradients to 1e-4 in float32: causal with packed segments and grouped-query heads, and
the same with a sliding window and soft-capped scores; per (batch, heads) shard under a mesh;
a Gemma-2-shaped model's logits the same either way; what the kernel cannot tile is refused."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.experimental.pallas import tpu as pltpu

from llmjax import config as config_lib
from llmjax.config import MeshConfig, ModelConfig
from llmjax.errors import ConfigError
from llmjax.models import attention, splash
from llmjax.models.transformer import Transformer
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding

B, L, N, K, H = 2, 128, 4, 2, 8  # 128: the kernel's smallest tile


def inputs():
  rng = np.random.default_rng(0)
  shapes = ((B, L, N, H), (B, L, K, H), (B, L, K, H), (B, L, N, H))
  q, k, v, ct = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
  # Two documents and trailing padding (id 0) in row 0, one document and padding in row 1.
  segment_ids_BL = jnp.array([[1] * 50 + [2] * 70 + [0] * 8, [3] * 100 + [0] * 28], jnp.int32)
  return q, k, v, ct, attention.segment_mask(segment_ids_BL)


@functools.partial(jax.jit, static_argnums=0)  # one compile, not one per primitive run eagerly
def value_and_grads(core, q, k, v, ct):
  out, vjp = jax.vjp(core, q, k, v)
  return (out, *vjp(ct))


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (40, 5.0)])
def test_splash_equals_xla_attention_values_and_grads(window, softcap):
  q, k, v, ct, mask = inputs()
  cfg = ModelConfig(n_heads=N, n_kv_heads=K, d_model=N * H, attention_impl="splash",
                    attn_softcap=softcap, splash_block_q=128)
  scale = H**-0.5
  if softcap:
    xla = lambda q, k, v: attention.capped_attention(q, k, v, mask, True, scale, softcap, window)
  else:
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  want = value_and_grads(xla, q, k, v, ct)
  with pltpu.force_tpu_interpret_mode():
    got = value_and_grads(lambda q, k, v: splash.splash_attention(cfg, q, k, v, mask, scale,
                                                                   window), q, k, v, ct)
  for name, a, b, tol in zip(("out", "dq", "dk", "dv"), got, want, (1e-5, 1e-4, 1e-4, 1e-4)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


def test_splash_picks_tiles_from_the_length_and_refuses_what_it_cannot_tile():
  cfg = ModelConfig(attention_impl="splash")
  assert splash.block_size(cfg, 1024) == (512, 512)
  assert splash.block_size(cfg, 384) == (128, 128)
  assert splash.block_size(dataclasses.replace(cfg, splash_block_kv=256), 768) == (256, 256)
  assert attention.implementation(cfg, 256) == "splash"
  with pytest.raises(ConfigError, match=r"attention_impl='splash'.*multiple of 128.*got 100"):
    splash.block_size(cfg, 100)
  with pytest.raises(ConfigError, match=r"config.model.splash_block_q=192 must be a multiple"):
    splash.block_size(dataclasses.replace(cfg, splash_block_q=192), 384)


def test_splash_runs_per_shard_under_a_mesh():
  q, k, v, _, mask = inputs()
  cfg = ModelConfig(n_heads=N, n_kv_heads=K, d_model=N * H, attention_impl="splash")
  mesh = meshlib.make_mesh(MeshConfig(data=2, tensor=2, rules="tp"), jax.devices()[:4])
  with (jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_for("tp")),
        pltpu.force_tpu_interpret_mode()):
    got = jax.jit(lambda q, k, v: splash.splash_attention(cfg, q, k, v, mask, H**-0.5))(q, k, v)
  assert got.sharding.shard_shape(got.shape) == (B // 2, L, N // 2, H)  # per (batch, heads)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  context = meshlib.make_mesh(MeshConfig(data=2, context=2, rules="tp"), jax.devices()[:4])
  with (jax.set_mesh(context), nn.logical_axis_rules(sharding.rules_for("tp")),
        pytest.raises(ConfigError, match=r"'splash' does not run under context parallelism")):
    splash.splash_attention(cfg, q, k, v, mask, H**-0.5)


def test_a_gemma2_shaped_model_with_splash_equals_it_with_xla():
  """Through the model: soft-capped scores, local and global layers, packed rows, GQA."""
  model = config_lib.model_section("gemma2", vocab_size=64, d_model=32, n_layers=2, n_heads=N,
                                   n_kv_heads=K, head_dim=H, d_ff=64, max_len=L,
                                   sliding_window=48, layer_pattern="LG", attention_impl="xla")
  cfg = ModelConfig(**model.to_dict())
  assert cfg.attn_softcap and cfg.local_layers() == (True, False)
  tokens_BL = jnp.asarray(np.random.default_rng(1).integers(1, 64, (B, L)), jnp.int32)
  segment_ids_BL = jnp.array([[1] * 60 + [2] * 60 + [0] * 8, [1] * L], jnp.int32)
  variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens_BL)
  want = jax.jit(Transformer(cfg).apply)(variables, tokens_BL, segment_ids_BL=segment_ids_BL)
  with pltpu.force_tpu_interpret_mode():
    got = jax.jit(Transformer(dataclasses.replace(cfg, attention_impl="splash")).apply)(
        variables, tokens_BL, segment_ids_BL=segment_ids_BL)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
