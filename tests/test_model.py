"""Transformer: shapes per preset, causality by gradients, packed segments, scan/remat/bf16
equivalences, and logical axis names on every parameter."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import config as config_lib
from llmjax.models import transformer
from llmjax.models.transformer import Transformer, positions_from_segments
from llmjax.tasks.lm import LM
from llmjax.parallel import axes

VOCAB, D_MODEL, N_HEADS, D_FF, N_LAYERS, MAX_LEN = 64, 32, 4, 64, 2, 32
PRESET_OVERRIDES = {"gpt2": {}, "llama": {"n_kv_heads": 2}, "bert": {}}
PARAM_AXES = {axes.VOCAB, axes.EMBED, axes.MLP, axes.HEADS, axes.KV_HEADS, axes.HEAD_DIM,
              axes.LAYERS, axes.NORM, axes.POSITIONS, axes.TYPES}


def model_config(preset: str, **overrides) -> config_lib.ModelConfig:
  """A tiny, validated ModelConfig of a preset family (through the real config path)."""
  # attention_block 4 < the tests' lengths: on CPU every causal test here runs the blocked core.
  fields = dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, d_ff=D_FF,
                max_len=MAX_LEN, attention_block=4, **PRESET_OVERRIDES[preset])
  fields.update(overrides)
  section = config_lib.model_section(preset, **fields)
  return config_lib.resolve({"model": section.to_dict(), "data": {"seq_len": MAX_LEN}}).model


def init_params(cfg, seed=0):
  """Random parameters at the shapes the model's own (abstract) init gives.

  Host RNG instead of running `init`: on CPU the XLA compile of the RNG-heavy init costs ~10 s
  per config, and no test here depends on the init distribution (test_sharding runs it).
  """
  abstract = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    mean = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(mean + cfg.init_std * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


@functools.lru_cache(maxsize=None)
def forward(cfg):
  """(logits, final hidden) from the model's apply, jitted once per config: compiles are the cost
  of this file, so tests share shapes [2, 16] and always pass segment ids."""
  model = Transformer(cfg)

  @jax.jit
  def apply(params, tokens_BL, segment_ids_BL, positions_BL=None, token_types_BL=None):
    kwargs = dict(segment_ids_BL=segment_ids_BL, positions_BL=positions_BL,
                  token_types_BL=token_types_BL)
    return (model.apply({"params": params}, tokens_BL, **kwargs),
            model.apply({"params": params}, tokens_BL, return_hidden=True, **kwargs))
  return apply


def logits_of(cfg, params, tokens_BL, segment_ids_BL=None, **kwargs):
  segment_ids_BL = jnp.ones_like(tokens_BL) if segment_ids_BL is None else segment_ids_BL
  return forward(cfg)(params, tokens_BL, segment_ids_BL, **kwargs)[0]


def random_tokens(seed, shape):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, VOCAB, dtype=jnp.int32)


def stack_layers(params, n_layers=N_LAYERS):
  """Unscanned params (layer_i/...) -> scanned params (layers/... with a leading layer axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params[f"layer_{i}"] for i in range(n_layers)])
  return out


def loss_fn(model, params, tokens_BL, segment_ids_BL):
  batch = {"tokens": tokens_BL, "segment_ids": segment_ids_BL}
  terms = LM(None).loss(model, {"params": params}, batch, rng=None, train=False)
  return terms.loss_sum / terms.weight


@pytest.fixture(scope="module", params=list(PRESET_OVERRIDES))
def preset(request):
  cfg = model_config(request.param)
  return request.param, cfg, init_params(cfg)


# --- shapes -----------------------------------------------------------------------------------


def test_output_shapes_and_finite(preset):
  name, cfg, params = preset
  tokens = random_tokens(1, (2, 16))
  logits, hidden = forward(cfg)(params, tokens, jnp.ones_like(tokens))
  assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
  assert hidden.shape == (2, 16, D_MODEL)
  assert np.isfinite(np.asarray(logits)).all()
  assert np.std(np.asarray(logits)) > 0  # not a constant function


def test_llama_is_gqa_with_untied_head():
  cfg = model_config("llama")
  params = init_params(cfg)
  head_dim = D_MODEL // N_HEADS
  assert params["layer_0"]["attn"]["q"]["kernel"].shape == (D_MODEL, N_HEADS, head_dim)
  assert params["layer_0"]["attn"]["k"]["kernel"].shape == (D_MODEL, 2, head_dim)
  assert params["layer_0"]["attn"]["v"]["kernel"].shape == (D_MODEL, 2, head_dim)
  assert params["lm_head"]["kernel"].shape == (D_MODEL, VOCAB)
  assert "pos_embed" not in params  # rotary positions
  # The head is untied: scaling it scales the logits, whatever the embedding table holds.
  tokens = random_tokens(1, (2, 16))
  base = logits_of(cfg, params, tokens)
  doubled = dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 2})
  np.testing.assert_allclose(logits_of(cfg, doubled, tokens), base * 2, rtol=1e-5, atol=1e-6)


def test_bert_token_types_change_the_output():
  cfg = model_config("bert")
  params = init_params(cfg)
  assert params["type_embed"]["embedding"].shape == (2, D_MODEL)
  tokens = random_tokens(1, (2, 16))
  zeros = logits_of(cfg, params, tokens, token_types_BL=jnp.zeros_like(tokens))
  ones = logits_of(cfg, params, tokens, token_types_BL=jnp.ones_like(tokens))
  default = logits_of(cfg, params, tokens)
  np.testing.assert_allclose(default, zeros, rtol=1e-5, atol=1e-6)  # None means type 0
  assert np.abs(np.asarray(ones - zeros)).max() > 1e-4


# --- causality by gradients -------------------------------------------------------------------


def _apply_with_embedding_offset(model, params, tokens_BL, delta_BLD, **kwargs):
  """Logits with `delta` added to the token embeddings: d logits / d delta = d logits / d input."""
  def interceptor(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.module.name == "embed" and context.method_name == "__call__":
      out = out + delta_BLD
    return out
  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, tokens_BL, **kwargs)


def input_dependence(cfg, params, tokens_BL):
  """[B, L, B, L] bool: output (b, t) has a nonzero gradient w.r.t. input embedding (b', s)."""
  model = Transformer(cfg)
  batch, length = tokens_BL.shape
  w_V = jax.random.normal(jax.random.PRNGKey(7), (cfg.vocab_size,))

  def out_BL(delta_BLD):
    logits_BLV = _apply_with_embedding_offset(model, params, tokens_BL, delta_BLD)
    return jnp.einsum("blv,v->bl", logits_BLV, w_V)

  jac = jax.jit(jax.jacrev(out_BL))(jnp.zeros((batch, length, cfg.d_model)))
  return np.asarray(jnp.any(jac != 0, axis=-1))


def test_causal_presets_never_see_the_future(preset):
  name, cfg, params = preset
  length = 8
  dep = input_dependence(cfg, params, random_tokens(4, (2, length)))
  past_and_present = np.tril(np.ones((length, length), bool))
  assert not dep[0, :, 1, :].any() and not dep[1, :, 0, :].any()  # rows of a batch never mix
  for b in range(2):
    if cfg.causal:
      np.testing.assert_array_equal(dep[b, :, b, :], past_and_present)
    else:  # bidirectional encoder: every position sees every other
      assert name == "bert"
      assert dep[b, :, b, :].all()


# --- packed segments --------------------------------------------------------------------------


def test_positions_from_segments_restart_per_segment():
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0],
                           [1, 2, 2, 3, 3, 3, 3, 3, 3]], jnp.int32)
  np.testing.assert_array_equal(positions_from_segments(segment_ids),
                                [[0, 1, 2, 0, 1, 2, 3, 0, 1],
                                 [0, 0, 1, 0, 1, 2, 3, 4, 5]])


N1, N2 = 7, 9  # packed row: segment 1 then segment 2; 16 tokens


def packed_pair(tokens_L):
  """Row 0: segments 1 and 2 packed; row 1: segment 2's tokens alone (then padding, id 0)."""
  tokens_BL = jnp.stack([tokens_L, jnp.concatenate([tokens_L[N1:], tokens_L[:N1]])])
  segment_ids_BL = jnp.array([[1] * N1 + [2] * N2, [1] * N2 + [0] * N1], jnp.int32)
  return tokens_BL, segment_ids_BL


def test_packed_segments_are_isolated(preset):
  name, cfg, params = preset
  tokens = random_tokens(5, (N1 + N2,))
  other = tokens.at[N1:].set((tokens[N1:] + 1 + jnp.arange(N2)) % VOCAB)
  tokens_BL, segment_ids_BL = packed_pair(tokens)
  a = np.asarray(logits_of(cfg, params, tokens_BL, segment_ids_BL))
  b = np.asarray(logits_of(cfg, params, packed_pair(other)[0], segment_ids_BL))
  np.testing.assert_array_equal(a[0, :N1], b[0, :N1])  # exactly: nothing leaks from segment 2
  assert np.abs(a[0, N1:] - b[0, N1:]).max() > 1e-4  # the change did reach segment 2
  # Segment 2 restarts its positions: packed, it computes what it computes alone.
  np.testing.assert_allclose(a[0, N1:], a[1, :N2], rtol=1e-5, atol=1e-5)


def test_packed_positions_matter_for_learned_embeddings():
  """Guards the test above: with positions not restarted, segment 2 would differ from alone."""
  cfg = model_config("gpt2")
  params = init_params(cfg)
  tokens_BL, segment_ids_BL = packed_pair(random_tokens(5, (N1 + N2,)))
  no_restart = logits_of(cfg, params, tokens_BL, segment_ids_BL,
                         positions_BL=jnp.broadcast_to(jnp.arange(N1 + N2), tokens_BL.shape))
  assert np.abs(np.asarray(no_restart[0, N1:] - no_restart[1, :N2])).max() > 1e-4


# --- scanned vs unrolled, remat, bf16 ---------------------------------------------------------


def test_scanned_stack_equals_unrolled():
  cfg = model_config("llama")  # gpt2 scanned == unrolled is covered by the remat test below
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  params = init_params(cfg)
  scanned = stack_layers(params)
  abstract = jax.eval_shape(Transformer(scanned_cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 8), jnp.int32))["params"]
  abstract = nn.unbox(abstract)
  assert jax.tree.structure(abstract) == jax.tree.structure(scanned)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, scanned)
  tokens_BL, segment_ids_BL = packed_pair(random_tokens(6, (N1 + N2,)))
  unrolled_out = logits_of(cfg, params, tokens_BL, segment_ids_BL)
  scanned_out = logits_of(scanned_cfg, scanned, tokens_BL, segment_ids_BL)
  np.testing.assert_allclose(scanned_out, unrolled_out, rtol=1e-5, atol=1e-5)


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.fixture(scope="module")
def remat_reference():
  cfg = model_config("gpt2")
  params = init_params(cfg)
  tokens = random_tokens(8, (2, 16))
  segment_ids = jnp.array([[1] * 9 + [2] * 7, [1] * 16], jnp.int32)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: loss_fn(Transformer(cfg), p, tokens, segment_ids)))
  loss, grads = value_and_grad(params)
  return cfg, params, tokens, segment_ids, loss, grads


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", False), ("full", True)])
def test_remat_policies_do_not_change_loss_or_grads(remat_reference, remat, scan):
  cfg, params, tokens, segment_ids, ref_loss, ref_grads = remat_reference
  cfg = dataclasses.replace(cfg, remat=remat, scan_layers=scan)
  if scan:
    params, ref_grads = stack_layers(params), stack_layers(ref_grads)
  f = lambda p: loss_fn(Transformer(cfg), p, tokens, segment_ids)
  # The policy is really applied (otherwise equality would say nothing).
  policies = [e.params.get("policy") for e in _equations(jax.make_jaxpr(f)(params).jaxpr)
              if "policy" in e.params]
  assert policies and all(p == transformer.REMAT_POLICIES[remat] for p in policies)
  loss, grads = jax.jit(jax.value_and_grad(f))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7), grads,
               ref_grads)


def test_bfloat16_compute_with_float32_params_stays_close():
  # A larger init scale makes the logits O(1), so the tolerance below means something.
  cfg32 = model_config("llama", init_std=0.1)
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  params = init_params(cfg32)
  params16 = init_params(cfg16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  tokens = random_tokens(9, (2, 16))
  segment_ids = jnp.ones_like(tokens)
  run = lambda cfg: jax.jit(lambda p: (Transformer(cfg).apply({"params": p}, tokens),
                                       loss_fn(Transformer(cfg), p, tokens, segment_ids)))(params)
  (logits32, loss32), (logits16, loss16) = run(cfg32), run(cfg16)
  assert logits16.dtype == jnp.bfloat16
  logits32, logits16 = np.asarray(logits32), np.asarray(logits16.astype(jnp.float32))
  assert np.isfinite(logits16).all()
  assert np.std(logits32) > 0.3
  diff = np.abs(logits16 - logits32).max()
  assert 0 < diff < 0.1  # really computed in bf16, and close
  assert loss16.dtype == jnp.float32
  assert abs(float(loss16) - float(loss32)) < 0.02


# --- logical axis names -----------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", list(PRESET_OVERRIDES))
def test_every_parameter_has_logical_axis_names(name, scan):
  cfg = model_config(name, scan_layers=scan)
  boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 10
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) <= PARAM_AXES, where
    is_block = "layers" in where
    assert (leaf.names[0] == axes.LAYERS) == (scan and is_block), where
