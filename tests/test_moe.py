"""Mixture of experts (models/moe.py): routing and combining equal numpy, dropless equals every
expert on every token weighted, the capacity rule, the auxiliary losses, scanned == unrolled,
active-parameter FLOPs, and each bad option refused naming its key."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import config as config_lib
from llmjax import flops
from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.models import moe
from llmjax.models.transformer import Transformer

D, E, K, F, B, L = 16, 4, 2, 24, 2, 8
CFG = ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=32, moe_d_ff=F,
                  max_len=16, mlp="swiglu", norm="rmsnorm", use_bias=False, pos_emb="rope",
                  n_experts=E, experts_per_token=K)


def np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_silu(x):
  return x / (1 + np.exp(-x))


def mlp_apply(cfg, x_BLD, seed=0):
  """(params, output, sown statistics) of one MoeMlp on x."""
  layer = moe.MoeMlp(cfg)
  params = nn.unbox(layer.init(jax.random.PRNGKey(seed), x_BLD))["params"]
  y, sown = layer.apply({"params": params}, x_BLD, mutable=[moe.AUX])
  return jax.device_get(params), np.asarray(y), jax.device_get(sown[moe.AUX])


def np_routes(params, x_TD, norm_topk):
  """numpy routing: (logits, probabilities, top-k weights, top-k experts)."""
  logits = x_TD.astype(np.float64) @ params["router"]["kernel"]
  probs = np_softmax(logits)
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
  weights = np.take_along_axis(probs, experts, -1)
  if norm_topk:
    weights = weights / weights.sum(-1, keepdims=True)
  return logits, probs, weights, experts


def np_every_expert(params, x_TD):
  """[T, E, D]: every expert's SwiGLU output on every token."""
  ex = {k: np.asarray(v, np.float64) for k, v in params["experts"].items()}
  gate = np.einsum("td,edf->tef", x_TD, ex["wg"])
  up = np.einsum("td,edf->tef", x_TD, ex["wi"])
  return np.einsum("tef,efd->ted", np_silu(gate) * up, ex["wo"])


@pytest.mark.parametrize("norm_topk", [True, False])
def test_dropless_routing_combine_and_losses_equal_numpy(norm_topk):
  cfg = dataclasses.replace(CFG, norm_topk_prob=norm_topk)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, L, D)))
  params, y, sown = mlp_apply(cfg, jnp.asarray(x))
  x_TD = x.reshape(-1, D).astype(np.float64)
  logits, probs, weights, experts = np_routes(params, x_TD, norm_topk)
  # jax's routing itself.
  w, i, p = moe.route(jnp.asarray(logits, jnp.float32), K, norm_topk)
  np.testing.assert_array_equal(np.asarray(i), experts)
  np.testing.assert_allclose(np.asarray(w), weights, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(p), probs, rtol=1e-5)
  # Dense reference: every expert on every token, weighted by its routing weight (0 unpicked).
  dense_TE = np.zeros_like(probs)
  np.put_along_axis(dense_TE, experts, weights, -1)
  want = np.einsum("ted,te->td", np_every_expert(params, x_TD), dense_TE)
  np.testing.assert_allclose(y.reshape(-1, D), want, rtol=1e-5, atol=1e-6)
  # Switch load balancing: E * sum_e (picks of e / T) * mean probability of e; z: mean lse^2.
  picks = np.bincount(experts.ravel(), minlength=E) / x_TD.shape[0]
  np.testing.assert_allclose(sown["aux_loss"][0], E * np.sum(picks * probs.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(sown["z_loss"][0], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(sown["load"][0], picks / K, rtol=1e-6)
  assert sown["dropped"][0] == 0.0


def np_capacity_keep(experts_BLK, slots):
  """The rule, by hand: within a row each expert takes first choices in token order, then second
  choices, up to `slots`; -> kept [B, L, K]."""
  kept = np.zeros(experts_BLK.shape, bool)
  for b in range(experts_BLK.shape[0]):
    taken = np.zeros(E, int)
    for j in range(K):
      for t in range(experts_BLK.shape[1]):
        e = experts_BLK[b, t, j]
        if taken[e] < slots:
          kept[b, t, j], taken[e] = True, taken[e] + 1
  return kept


def test_capacity_large_equals_dropless_and_small_drops_by_the_rule():
  x = jnp.asarray(jax.random.normal(jax.random.PRNGKey(2), (B, L, D)))
  params, dropless, _ = mlp_apply(CFG, x)
  big = dataclasses.replace(CFG, moe_capacity_factor=float(E))  # a slot for every pick
  _, y_big, sown_big = mlp_apply(big, x)
  np.testing.assert_allclose(y_big, dropless, rtol=1e-5, atol=1e-6)
  assert sown_big["dropped"][0] == 0.0
  small = dataclasses.replace(CFG, moe_capacity_factor=0.5)
  slots = moe.capacity(0.5, L, K, E)
  assert slots == math.ceil(0.5 * L * K / E) == 2
  _, y_small, sown_small = mlp_apply(small, x)
  x_TD = np.asarray(x).reshape(-1, D).astype(np.float64)
  _, _, weights, experts = np_routes(params, x_TD, True)
  kept = np_capacity_keep(experts.reshape(B, L, K), slots).reshape(-1, K)
  assert 0 < kept.sum() < kept.size  # some picks dropped, some kept: the rule is exercised
  dense_TE = np.zeros((x_TD.shape[0], E))
  np.put_along_axis(dense_TE, experts, weights * kept, -1)  # a dropped pick adds nothing
  want = np.einsum("ted,te->td", np_every_expert(params, x_TD), dense_TE)
  np.testing.assert_allclose(y_small.reshape(-1, D), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sown_small["dropped"][0], 1 - kept.mean(), rtol=1e-6)


def test_scanned_equals_unrolled_with_shared_gated_expert():
  cfg = dataclasses.replace(CFG, n_shared_experts=1, shared_expert_gate=True,
                            moe_capacity_factor=1.0)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (B, L), 0, 32)
  unrolled = Transformer(cfg)
  params = nn.unbox(unrolled.init(jax.random.PRNGKey(0), tokens))["params"]
  layer_keys = [f"layer_{i}" for i in range(cfg.n_layers)]
  stacked = {k: v for k, v in params.items() if k not in layer_keys}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in layer_keys])
  assert stacked["layers"]["mlp"]["shared_gate"]["kernel"].shape == (2, D, 1)
  # jitted: op-by-op dispatch of the unrolled model costs more CPU than compiling it
  y, sown = jax.jit(lambda p: unrolled.apply({"params": p}, tokens, mutable=[moe.AUX]))(params)
  scanned = Transformer(dataclasses.replace(cfg, scan_layers=True))
  y_scan, sown_scan = jax.jit(lambda p: scanned.apply({"params": p}, tokens,
                                                      mutable=[moe.AUX]))(stacked)
  np.testing.assert_allclose(np.asarray(y_scan), np.asarray(y), rtol=1e-5, atol=1e-5)
  a, b = moe.aux_stats(sown[moe.AUX]), moe.aux_stats(sown_scan[moe.AUX])
  assert a["load"].shape == (E,)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5), a, b)


def test_sparse_layer_pattern_and_active_flops():
  cfg = dataclasses.replace(CFG, n_layers=4, decoder_sparse_step=2, mlp_only_layers="3",
                            n_shared_experts=1)
  assert cfg.moe_layers() == (False, True, False, False)  # (i + 1) % 2 == 0, layer 3 dense
  tokens = jnp.zeros((1, L), jnp.int32)
  params = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
  shapes = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.value.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(
                params, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  assert shapes["layer_1/mlp/experts/wi"] == (E, D, F)
  assert shapes["layer_1/mlp/router/kernel"] == (D, E)
  assert shapes["layer_0/mlp/wi/kernel"] == (D, 32) and "layer_3/mlp/wi/kernel" in shapes
  total = sum(math.prod(s) for s in shapes.values())
  experts = 3 * E * D * F
  assert flops.active_params(cfg, shapes) == total - experts * (E - K) // E
  # Forward: dense layers as before; the sparse one counts router, k experts and the shared one.
  dense = dataclasses.replace(cfg, n_experts=0)
  sparse_mlp = D * E + K * 3 * D * F + 3 * D * F
  got = flops.backbone_forward(cfg, L).total - flops.backbone_forward(dense, L).total
  assert got == 2 * L * (sparse_mlp - 3 * D * cfg.d_ff)


def resolve(model=None, mesh=None):
  c = config_lib.base_config()
  c.model = config_lib.model_section("llama", **(model or {})).to_dict()
  c.mesh.update(mesh or {})
  return config_lib.resolve(c)


@pytest.mark.parametrize("model,mesh,words", [
    (dict(n_experts=4, experts_per_token=5), {}, "experts_per_token=5"),
    (dict(n_experts=4, experts_per_token=0), {}, "experts_per_token=0"),
    (dict(n_experts=4, moe_capacity_factor=-1.0), {}, "moe_capacity_factor=-1.0"),
    (dict(n_experts=6), dict(data=1, expert=4, rules="fsdp_ep"), "config.mesh.expert=4"),
    (dict(n_experts=4, n_layers=2, decoder_sparse_step=2, scan_layers=True), {},
     "scan_layers"),
    (dict(n_experts=4, mlp_only_layers="9"), {}, "mlp_only_layers"),
])
def test_bad_moe_options_name_the_key(model, mesh, words):
  with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("=", "=")):
    resolve(model, mesh)


def test_moe_options_on_rnn_or_resnet_are_refused():
  for preset in ("rnn", "resnet18"):
    c = config_lib.base_config()
    c.model = config_lib.model_section(preset, n_experts=4).to_dict()
    with pytest.raises(ConfigError, match="config.model.n_experts=4 is a mixture-of-experts"):
      config_lib.resolve(c)


def test_dropless_all_to_all_equals_one_device_values_and_grads():
  """expert=4 (x fsdp=2), expert=8 and fsdp=2 x expert=2 x tensor=2 (fsdp_tp_ep: the expert
  width split over `tensor`, gathered for the call) on 8 devices: tokens travel by all-to-all
  (shard_map), and the layer's output and gradients (kernels, expert LoRA, input) equal one
  device's."""
  from llmjax.config import MeshConfig
  from llmjax.models import peft as peftlib
  from llmjax.parallel import mesh as meshlib
  from llmjax.parallel import sharding
  cfg = dataclasses.replace(CFG, n_experts=8, n_layers=1)
  layer = moe.MoeMlp(cfg, peftlib.Peft(lora_targets="experts/w[ig]", lora_rank=2))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, D))
  boxed = layer.init(jax.random.PRNGKey(0), x)["params"]
  params = nn.unbox(boxed)
  lora = params["experts"]["lora"]  # B starts at zero: make the LoRA update count
  lora["wi_b"] = jax.random.normal(jax.random.PRNGKey(2), lora["wi_b"].shape) * 0.1

  def loss(p, x):
    y = layer.apply({"params": p}, x)
    return jnp.sum(y * jnp.cos(jnp.arange(D))[None, None]), y
  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (want_loss, want_y), want_grads = jax.jit(step)(params, x)
  for mesh, rules in [(dict(fsdp=2, expert=4), "fsdp_ep"), (dict(expert=8), "ep"),
                      (dict(fsdp=2, expert=2, tensor=2), "fsdp_tp_ep")]:
    mc = MeshConfig(**{"data": 1, "fsdp": 1, "tensor": 1, "rules": rules, **mesh})
    mesh_ = meshlib.make_mesh(mc)
    # the parameters placed as the rules shard them (fsdp_tp_ep: E over expert, D over fsdp,
    # F over tensor), which the shard_map gathers but for E
    placed = jax.device_put(params, sharding.logical_shardings(boxed, mesh_, sharding.rules_for(
        rules)))
    sizes = {"fsdp": 1, "tensor": 1, **mesh}
    assert placed["experts"]["wi"].addressable_shards[0].data.shape == (
        8 // sizes["expert"], D // sizes["fsdp"], F // sizes["tensor"])
    with jax.set_mesh(mesh_), nn.logical_axis_rules(sharding.rules_for(rules)):
      compiled = jax.jit(step).lower(placed, x).compile()
      (got_loss, got_y), got_grads = compiled(placed, x)
    hlo = compiled.as_text()
    # 3 forward (tokens, counts, results) + 2 backward: the dropless path really is all-to-all
    assert len(re.findall(r"[ )]all-to-all(-start)?\(", hlo)) == 5, rules
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got_grads, want_grads)
  assert np.abs(want_grads[0]["experts"]["lora"]["wi_a"]).max() > 0


def test_dropless_all_to_all_under_scan_with_remat_equals_one_device():
  """A scanned, rematerialised stack of sparse layers under fsdp_ep (fsdp=2 x expert=4): the
  shard_map runs inside the scan body and again in the backward's recomputation; the loss, every
  gradient and the sown statistics equal one device's."""
  from llmjax.config import MeshConfig
  from llmjax.parallel import mesh as meshlib
  from llmjax.parallel import sharding
  cfg = dataclasses.replace(CFG, scan_layers=True, remat="full")
  model = Transformer(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (8, L), 0, 32)
  boxed = model.init(jax.random.PRNGKey(0), tokens)["params"]
  params = nn.unbox(boxed)

  def loss(p):
    logits, sown = model.apply({"params": p}, tokens, mutable=[moe.AUX])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return nll, (logits, moe.aux_stats(sown[moe.AUX]))
  step = jax.value_and_grad(loss, has_aux=True)
  (want_loss, (want_y, want_stats)), want_grads = jax.jit(step)(params)
  mc = MeshConfig(data=1, fsdp=2, expert=4, tensor=1, rules="fsdp_ep")
  mesh_, rules = meshlib.make_mesh(mc), sharding.rules_for("fsdp_ep")
  placed = jax.device_put(params, sharding.logical_shardings(boxed, mesh_, rules))
  with jax.set_mesh(mesh_), nn.logical_axis_rules(rules):
    compiled = jax.jit(step).lower(placed).compile()
    (got_loss, (got_y, got_stats)), got_grads = compiled(placed)
  # the forward scan body holds the 3 all-to-alls (tokens, counts, results), the backward body
  # their recomputation (remat: nothing saved) and the 2 transposes
  assert len(re.findall(r"[ )]all-to-all(-start)?\(", compiled.as_text())) == 3 + 3 + 2
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_stats, want_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_grads, want_grads)
  assert want_stats["load"].shape == (E,)
  assert np.abs(want_grads["layers"]["mlp"]["experts"]["wi"]).max() > 0
