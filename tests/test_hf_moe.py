"""Mixtral, Qwen2-MoE (shared expert, a dense layer) and Qwen3-MoE (q/k norms, every other layer
sparse) against transformers: tiny random models, fp32, every parameter random (routers wide
enough that no top-k choice is a near tie). Logits on right-padded batches, greedy generation,
save -> transformers, both expert layouts on disk, sharded loads, a LoRA-on-experts PEFT
adapter, and the HF settings llmjax refuses."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax import generate as G  # noqa: E402
from llmjax.config import MeshConfig  # noqa: E402
from llmjax.parallel import mesh as meshlib  # noqa: E402

TOL, VOCAB, LENGTH = 1e-4, 64, 12
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               initializer_range=0.2, rms_norm_eps=1e-6, max_position_embeddings=32,
               bos_token_id=None, eos_token_id=None, pad_token_id=None, num_experts_per_tok=2)


def _configs() -> dict:
  T = transformers
  return {
      # every layer sparse, 4 experts of 24, a 6-token window on every layer
      "mixtral": T.MixtralConfig(**_COMMON, num_hidden_layers=2, intermediate_size=24,
                                 num_local_experts=4, sliding_window=6),
      # layer 1 dense (48 wide); experts 16 wide, not renormalised; a shared expert of 24
      "qwen2_moe": T.Qwen2MoeConfig(**_COMMON, num_hidden_layers=3, intermediate_size=48,
                                    num_experts=4, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, mlp_only_layers=[1],
                                    norm_topk_prob=False),
      # every other layer sparse (layer 1), top-3 of 5 renormalised, head_dim 10, biases
      "qwen3_moe": T.Qwen3MoeConfig(**dict(_COMMON, num_experts_per_tok=3), num_hidden_layers=2,
                                    intermediate_size=40, num_experts=5, moe_intermediate_size=12,
                                    decoder_sparse_step=2, norm_topk_prob=True, head_dim=10,
                                    attention_bias=True),
  }


CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM"}
EXPECTED = {  # what each directory becomes (fields besides the sizes)
    "mixtral": dict(n_experts=4, experts_per_token=2, d_ff=24, norm_topk_prob=True,
                    sliding_window=6, shared_d_ff=0, moe_layers=(True, True)),
    "qwen2_moe": dict(n_experts=4, moe_d_ff=16, d_ff=48, shared_d_ff=24, shared_expert_gate=True,
                      norm_topk_prob=False, qkv_bias=True, mlp_only_layers="1",
                      moe_layers=(True, False, True)),
    "qwen3_moe": dict(n_experts=5, experts_per_token=3, moe_d_ff=12, d_ff=40, qk_norm=True,
                      qkv_bias=True, o_bias=True, head_dim=10, decoder_sparse_step=2,
                      moe_layers=(False, True)),
}


def _make(name: str, directory, **save_kwargs):
  """The named random model saved to `directory`; -> torch model (eval)."""
  import torch
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(transformers, CLASSES[name])(_configs()[name]).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      router = key.endswith("mlp.gate.weight")
      p.normal_(1.0 if key.endswith("norm.weight") else 0.0, 1.0 if router else 0.2)
  model.save_pretrained(str(directory), **save_kwargs)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for name in _configs():
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), _make(name, directory))
  return out


def _right_padded(seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (3, LENGTH)).astype(np.int64)
  mask = np.ones_like(tokens)
  mask[1, LENGTH - 4:], mask[2, LENGTH - 8:] = 0, 0
  return tokens, mask


def _ours(model, params, tokens, mask):
  return np.asarray(jax.jit(lambda p, t, s, q: model.apply(
      {"params": p}, t, segment_ids_BL=s, positions_BL=q))(
          params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(H.hf_positions(mask))))


def _diff(ours, ref, mask) -> float:
  return float(np.abs(ours - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", list(CLASSES))
def test_logits_generation_and_save_match_transformers(saved, name, tmp_path):
  directory, ref_model = saved[name]
  with open(os.path.join(directory, "model.safetensors"), "rb") as f:  # the per-expert layout
    assert b".experts.0." in f.read(1 << 16)
  model, params = hf.load(directory)
  for field, value in EXPECTED[name].items():
    got = model.cfg.moe_layers() if field == "moe_layers" else getattr(model.cfg, field)
    assert got == value, field
  tokens, mask = _right_padded()
  ref = H.torch_out(ref_model, tokens, mask, position_ids=H.hf_positions(mask)).logits.numpy()
  assert np.abs(ref).max() > 0.5
  assert _diff(_ours(model, params, tokens, mask), ref, mask) <= TOL

  prompts, prompt_mask = G.left_pad([[5, 17, 3, 40, 42, 9, 11], [8, 1, 60, 23]])
  import torch
  with torch.no_grad():
    theirs = ref_model.generate(input_ids=torch.tensor(prompts.astype(np.int64)),
                                attention_mask=torch.tensor(prompt_mask.astype(np.int64)),
                                do_sample=False, max_new_tokens=6, pad_token_id=0)
  ours = G.generate(model, params, prompts, prompt_mask_BP=prompt_mask, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, prompts.shape[1]:].numpy())

  hf.save(model, params, str(tmp_path / "again"))
  again, info = type(ref_model).from_pretrained(str(tmp_path / "again"),
                                                output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert _diff(H.torch_out(again.eval(), tokens, mask).logits.numpy(),
               H.torch_out(ref_model, tokens, mask).logits.numpy(), mask) <= 1e-5
  assert hf.model_config(str(tmp_path / "again")) == model.cfg
  with open(tmp_path / "again" / "config.json") as f:
    assert json.load(f)["architectures"] == [CLASSES[name]]


def test_fused_layout_scanned_and_sharded_loads_equal_the_plain_one(saved, tmp_path):
  """transformers' fused layout on disk (save_original_format=False) reads as the per-expert
  one; a scanned Mixtral, a convert round trip and loads straight into shards hold the same
  numbers."""
  directory, ref_model = saved["mixtral"]
  _, params = hf.load(directory)
  ref_model.save_pretrained(str(tmp_path / "fused"), save_original_format=False)
  with open(tmp_path / "fused" / "model.safetensors", "rb") as f:
    assert b"experts.gate_up_proj" in f.read(1 << 16)
  _, fused = hf.load(str(tmp_path / "fused"))
  jax.tree.map(np.testing.assert_array_equal, fused, params)
  model, _ = hf.load(directory)  # no rows at all (an empty sample batch) is no error
  assert model.apply({"params": params}, jnp.zeros((0, 4), jnp.int32)).shape == (0, 4, VOCAB)
  _, scanned = hf.load(directory, scan_layers=True)
  assert scanned["layers"]["mlp"]["experts"]["wg"].shape == (2, 4, 32, 24)
  np.testing.assert_array_equal(scanned["layers"]["mlp"]["experts"]["wo"][1],
                                params["layer_1"]["mlp"]["experts"]["wo"])
  mesh = meshlib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  for name in ("mixtral", "qwen2_moe"):
    _, plain = hf.load(saved[name][0])
    _, sharded = hf.load(saved[name][0], mesh=mesh, rules="fsdp_tp")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, plain)
    assert len(sharded["layer_0"]["mlp"]["experts"]["wi"].sharding.device_set) == 8
  from llmjax.hf import convert  # llmjax convert, both ways
  convert.hf_to_export(saved["qwen2_moe"][0], str(tmp_path / "export"))
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "back"))
  jax.tree.map(np.testing.assert_array_equal, hf.load(str(tmp_path / "back"))[1],
               hf.load(saved["qwen2_moe"][0])[1])
  ep = meshlib.make_mesh(MeshConfig(data=2, expert=4))  # Mixtral's 4 experts, one per shard
  _, sharded = hf.load(directory, mesh=ep, rules="fsdp_ep")
  wi = sharded["layer_1"]["mlp"]["experts"]["wi"]
  assert {s.data.shape for s in wi.addressable_shards} == {(1, 32, 24)}
  np.testing.assert_array_equal(np.asarray(wi), params["layer_1"]["mlp"]["experts"]["wi"])


def test_what_llmjax_cannot_express_is_one_clear_error(saved, tmp_path):
  directory, _ = saved["qwen2_moe"]
  with open(os.path.join(directory, "config.json")) as f:
    raw = json.load(f)
  cases = {"no_shared": (dict(shared_expert_intermediate_size=0),
                         "qwen2_moe shared_expert_intermediate_size=0 is not supported"),
           "top_k": (dict(num_experts_per_tok=5), r"qwen2_moe num_experts_per_tok=5 must be in "
                                                  r"\[1, 4\]")}
  for case, (fields, message) in cases.items():
    os.makedirs(tmp_path / case)
    os.symlink(os.path.join(directory, "model.safetensors"),
               tmp_path / case / "model.safetensors")
    with open(tmp_path / case / "config.json", "w") as f:
      json.dump(dict(raw, **fields), f)
    with pytest.raises(hf.UnsupportedModelError, match=message):
      hf.load(str(tmp_path / case))
  with pytest.raises(hf.HFError, match="scan_layers=True needs every layer alike, but this "
                     "qwen2_moe mixes dense and sparse MLP layers"):
    hf.load(directory, scan_layers=True)


def test_lora_on_experts_and_router_equals_the_merged_kernels_and_presets_select(saved):
  """LoRA factors on every expert's projections and on the router compute what the base with
  W + scale * A B per expert computes (dropless and with capacity), which is what merging
  (export --merge) writes; the freezing presets pick the router, the shared experts or the
  experts alone."""
  import re
  from flax import linen as nn
  from llmjax.finetune import spec
  from llmjax.hf import mapping
  from llmjax.models.peft import Peft
  directory, _ = saved["qwen2_moe"]
  base, base_params = hf.load(directory)
  targets = "|".join(spec.LORA_TARGETS[k] for k in ("experts", "shared_experts", "router"))
  lora = Peft(lora_targets=f"({targets})", lora_rank=2, lora_alpha=4.0)
  model = base.clone(peft=lora)
  rng, flat = np.random.default_rng(0), mapping.flatten(base_params)
  shapes = mapping.flatten(nn.unbox(hf.abstract_params(model)))
  assert shapes["layer_0/mlp/experts/lora/wg_a"].shape == (4, 32, 2)
  assert shapes["layer_0/mlp/experts/lora/wo_b"].shape == (4, 2, 32)
  assert shapes["layer_2/mlp/router/lora/b"].shape == (2, 4)
  assert "layer_1/mlp/experts/lora/wi_a" not in shapes  # layer 1 is dense
  params = {p: flat[p] if p in flat else jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype)
            for p, a in shapes.items()}
  merged = dict(flat)
  for p in params:
    if p.endswith("/lora/a") or p.endswith("_a"):
      b = params[p[:-1] + "b"]
      kernel = p[:-len("/lora/a")] + "/kernel" if p.endswith("/lora/a") else \
          p.replace("/lora/", "/")[:-2]
      delta = np.matmul(np.asarray(params[p]), np.asarray(b)) * lora.lora_scale()
      merged[kernel] = np.asarray(flat[kernel]) + delta.reshape(flat[kernel].shape)
  from llmjax.finetune import lora as lora_lib  # what export --merge writes
  library = mapping.flatten(lora_lib.merged(mapping.unflatten(params), lora))
  assert set(library) == set(flat)
  for p, value in merged.items():
    np.testing.assert_allclose(np.asarray(library[p]), value, atol=1e-6, err_msg=p)
  tokens, mask = _right_padded(seed=4)
  ours = _ours(model, mapping.unflatten(params), tokens, mask)
  ref = _ours(base, mapping.unflatten(merged), tokens, mask)
  assert _diff(ours, _ours(base, base_params, tokens, mask), mask) > 1e-2
  assert _diff(ours, ref, mask) <= 1e-4
  capped = model.clone(cfg=model.cfg.__class__(**{**model.cfg.__dict__,
                                                   "moe_capacity_factor": 4.0}))
  assert _diff(_ours(capped, mapping.unflatten(params), tokens, mask), ref, mask) <= 1e-4
  for preset, want in (("router", r"layer_[02]/mlp/router/kernel"),
                       ("shared_experts", r"layer_[02]/mlp/(shared/w[igo]|shared_gate)/kernel"),
                       ("experts", r"layer_[02]/mlp/experts/w[igo]")):
    picked = {p for p in flat if re.fullmatch(spec.PRESETS[preset], p)}
    assert picked == {p for p in flat if re.fullmatch(want, p)} and picked, preset


def test_peft_adapter_with_lora_on_experts_router_and_shared_expert_loads_in_peft(saved,
                                                                                 tmp_path):
  import warnings
  import peft
  from flax import linen as nn
  from llmjax.hf import mapping
  from llmjax.models.peft import Peft
  directory, _ = saved["qwen2_moe"]
  base, base_params = hf.load(directory)
  lora = Peft(lora_targets=r"(.*/)?(attn/q|mlp/(router|experts/(wg|wi|wo)|shared/wi))",
              lora_rank=2, lora_alpha=4.0)
  model = base.clone(peft=lora)
  rng, flat = np.random.default_rng(1), mapping.flatten(base_params)
  params = mapping.unflatten({
      p: flat[p] if p in flat else jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype)
      for p, a in mapping.flatten(nn.unbox(hf.abstract_params(model))).items()})
  hf.save_adapter(model, params, lora, str(tmp_path / "adapter"), base_model_path=directory)
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    config = json.load(f)
  assert config["target_modules"] == ["q_proj", "shared_expert.up_proj"]
  assert config["target_parameters"] == ["down_proj", "gate.weight", "gate_up_proj"]
  assert config["rank_pattern"] == {"gate_up_proj": 4}
  torch_base = transformers.Qwen2MoeForCausalLM.from_pretrained(directory).eval()
  tokens, mask = _right_padded(seed=5)
  before = H.torch_out(torch_base, tokens, mask).logits.numpy()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    theirs_model = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
  assert not [w for w in caught if "adapter keys" in str(w.message)], caught
  theirs = H.torch_out(theirs_model, tokens, mask).logits.numpy()
  ours = _ours(model, params, tokens, mask)
  assert _diff(ours, before, mask) > 1e-2
  assert _diff(ours, theirs, mask) <= TOL
  with pytest.raises(hf.AdapterError, match="target_parameters=.* cannot be read into llmjax"):
    hf.load_peft(str(tmp_path / "adapter"))
