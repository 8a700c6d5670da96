"""Gemma 1/2/3 (text) against transformers: logits on the real tokens of padded batches, greedy
generation, save -> transformers, scanned == unrolled, a sharded load, and the refusals.

Tiny random models with unusual settings (head_dim not d_model / heads, grouped-query attention,
norm weights far from 0, a rope base other than the default), fp32."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import generate as G  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.config import MeshConfig  # noqa: E402
from llmjax.parallel import mesh as meshlib  # noqa: E402

TOL = 1e-4
_COMMON = dict(vocab_size=H.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=12,
               max_position_embeddings=H.MAX_LEN, rms_norm_eps=1e-6, initializer_range=0.2,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _configs() -> dict:
  """name -> (transformers config, causal-LM class). Windows of 4 and 5 tokens, shorter than
  the inputs; soft-caps small enough to bite; Gemma 3's 2:1 local/global unit with a local rope
  base of its own and linear rope scaling on the global layers."""
  return {
      "gemma": (transformers.GemmaConfig(**_COMMON, tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "default",
                                                          "rope_theta": 500.0}),
                "GemmaForCausalLM"),
      "gemma2": (transformers.Gemma2Config(**dict(_COMMON, num_hidden_layers=4),
                                           sliding_window=4, query_pre_attn_scalar=20,
                                           attn_logit_softcapping=3.0,
                                           final_logit_softcapping=2.0),
                 "Gemma2ForCausalLM"),
      "gemma3": (transformers.Gemma3TextConfig(
          **dict(_COMMON, num_hidden_layers=3), sliding_window=5, query_pre_attn_scalar=16,
          layer_types=["sliding_attention", "sliding_attention", "full_attention"],
          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 1000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}),
                 "Gemma3ForCausalLM"),
  }


def _make(name: str, directory):
  """A random model of `name` with every norm weight random too (transformers starts them at 0,
  which would hide a missing `1 +`), saved to `directory`; -> the torch model (eval)."""
  import torch
  config, cls = _configs()[name]
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(transformers, cls)(config).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      if "norm" in key:
        p.normal_(0.0, 0.5)
  model.save_pretrained(str(directory))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for name in _configs():
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), _make(name, directory))
  return out


def _logits(model, params, tokens, mask):
  apply = jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, segment_ids_BL=s,
                                                 positions_BL=q))  # one compile, not one per op
  return np.asarray(apply(params, jnp.asarray(tokens), jnp.asarray(mask),
                          jnp.asarray(H.hf_positions(mask))))


def _real_diff(ours, ref, mask) -> float:
  return float(np.abs(ours - ref)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", list(_configs()))
def test_logits_generation_and_save_match_transformers(saved, name, tmp_path):
  directory, ref_model = saved[name]
  tokens, mask = H.padded_batch(seed=1)
  ref = H.torch_out(ref_model, tokens, mask, position_ids=H.hf_positions(mask)).logits.numpy()
  assert np.abs(ref).max() > 0.5  # the comparison means something
  model, params = hf.load(directory)
  ours = _logits(model, params, tokens, mask)
  assert _real_diff(ours, ref, mask) <= TOL
  cfg = model.cfg
  if cfg.final_softcap:
    assert np.abs(ours).max() < cfg.final_softcap < np.abs(ours).max() * 1.5  # capped, and bites
  if name == "gemma2":  # the window changes the result: the parity above tests it
    unwindowed = model.clone(cfg=dataclasses.replace(cfg, sliding_window=0, layer_pattern=""))
    assert _real_diff(_logits(unwindowed, params, tokens, mask), ours, mask) > 1e-3
    # Blocked attention (small query blocks, so key blocks left of the window are skipped).
    blocked = model.clone(cfg=dataclasses.replace(cfg, attention_impl="blocked",
                                                  attention_block=4))
    np.testing.assert_allclose(_logits(blocked, params, tokens, mask), ours, atol=1e-5)
  if name == "gemma3":  # scanned layers (one scan over L, L, G: switches traced) are the same
    scanned, scanned_params = hf.load(directory, scan_layers=True)
    np.testing.assert_allclose(_logits(scanned, scanned_params, tokens, mask), ours, atol=1e-5)
  # Greedy decoding with the KV cache, left-padded prompts: the same tokens as transformers.
  prompts, prompt_mask = G.left_pad([[5, 17, 3, 99, 42], [8, 1, 64, 23, 7, 7, 30, 2, 11], [60]])
  import torch
  with torch.no_grad():
    ref_new = ref_model.generate(input_ids=torch.tensor(prompts, dtype=torch.long),
                                 attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, pad_token_id=0)
  ours_new = G.generate(model, params, prompts, prompt_mask_BP=prompt_mask, max_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(ours_new), ref_new[:, prompts.shape[1]:].numpy())
  # Saved by llmjax, loaded by transformers: the same model.
  hf.save(model, params, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == \
      [type(ref_model).__name__]
  again, info = type(ref_model).from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  np.testing.assert_allclose(H.torch_out(again.eval(), tokens, mask).logits.numpy(),
                             H.torch_out(ref_model, tokens, mask).logits.numpy(), atol=1e-5)


def test_sharded_load_equals_unsharded(saved):
  directory, _ = saved["gemma3"]  # every Gemma parameter kind: post-norms, q/k norms
  tokens, mask = H.padded_batch(seed=2)
  model, params = hf.load(directory)
  mesh = meshlib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  _, sharded = hf.load(directory, mesh=mesh, rules="fsdp_tp")
  assert sharded["layer_0"]["attn"]["q"]["kernel"].sharding.spec[:2] == ("fsdp", "tensor")
  np.testing.assert_allclose(_logits(model, sharded, tokens, mask),
                             _logits(model, params, tokens, mask), atol=1e-5)


def _edited(directory, tmp_path, **fields) -> str:
  out = tmp_path / "edited"
  shutil.copytree(directory, out)
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, **fields}))
  return str(out)


@pytest.mark.parametrize("name, fields, error, named", [
    ("gemma", dict(hidden_act="relu"), hf.UnsupportedModelError,
     "gemma hidden activation 'relu' is not supported"),
    ("gemma", dict(use_bidirectional_attention=True), hf.UnsupportedModelError,
     "gemma use_bidirectional_attention=true is not supported"),
    ("gemma2", dict(layer_types=["chunked_attention"] * 4), hf.UnsupportedModelError,
     r"gemma2 layer_types \['chunked_attention'\] are not supported"),
    ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default"},
                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     hf.UnsupportedModelError, "gemma3_text sliding_attention rope_type 'linear'"),
    # the config says q/k/v/o biases, the file has none: each named with its shape
    ("gemma", dict(attention_bias=True), hf.WeightsMismatchError,
     r"missing model\.layers\.0\.self_attn\.q_proj\.bias \(expected shape \[48\]\)"),
])
def test_bad_directories_are_refused_by_name(saved, tmp_path, name, fields, error, named):
  with pytest.raises(error, match=named):
    hf.load(_edited(saved[name][0], tmp_path, **fields))


# --- settings of other architectures that used to be refused (issue 28, item 4) -----------------


@pytest.mark.parametrize("name", ["gpt2_unscaled", "llama_geglu"])
def test_settings_once_refused_match_transformers(name, tmp_path):
  """GPT-2 without score scaling (scale_attn_weights=false -> query_pre_attn_scalar=1) and with
  gelu_fast (another name of tanh-GELU), and a Llama whose gate is tanh-GELU (hidden_act
  gelu_pytorch_tanh -> mlp geglu): equal logits, and saved back with the setting."""
  import torch
  ids = dict(vocab_size=H.VOCAB, initializer_range=0.2, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  if name == "gpt2_unscaled":
    ref_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **ids, n_positions=H.MAX_LEN, n_embd=32, n_layer=1, n_head=4, scale_attn_weights=False,
        activation_function="gelu_fast"))
    field, value = "scale_attn_weights", False
  else:
    ref_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **ids, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=H.MAX_LEN, hidden_act="gelu_pytorch_tanh"))
    field, value = "hidden_act", "gelu_pytorch_tanh"
  ref_model.eval().save_pretrained(str(tmp_path / "hf"))
  model, params = hf.load(str(tmp_path / "hf"))
  assert (model.cfg.query_pre_attn_scalar, model.cfg.mlp) == (
      (1, "gelu_tanh") if name == "gpt2_unscaled" else (0, "geglu"))
  tokens, mask = H.padded_batch(seed=3)
  ref = H.torch_out(ref_model, tokens, mask, position_ids=H.hf_positions(mask)).logits.numpy()
  assert _real_diff(_logits(model, params, tokens, mask), ref, mask) <= TOL
  hf.save(model, params, str(tmp_path / "back"))
  assert json.loads((tmp_path / "back" / "config.json").read_text())[field] == value


def test_lora_adapter_loads_in_peft_with_equal_logits(saved, tmp_path):
  """A LoRA on every projection of Gemma 2 (soft-capped, windowed) -> a PEFT adapter over the
  HF directory: PEFT's module names, transformers' logits; and back into llmjax exactly."""
  import peft
  from llmjax.hf import mapping
  from llmjax.models.peft import Peft
  directory, _ = saved["gemma2"]
  base, base_params = hf.load(directory)
  lora = Peft(lora_targets=r"(.*/)?(attn/(q|k|v|o)|mlp/(wi|wg|wo))", lora_rank=4,
              lora_alpha=8.0)
  model, rng = base.clone(peft=lora), np.random.default_rng(0)
  known = mapping.flatten(base_params)
  params = mapping.unflatten({
      path: known[path] if path in known else jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype)
      for path, a in mapping.flatten(nn.unbox(hf.abstract_params(model))).items()})
  hf.save_adapter(model, params, lora, str(tmp_path), base_model_path=directory)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                      "up_proj", "v_proj"]
  assert config["task_type"] == "CAUSAL_LM"
  ref = peft.PeftModel.from_pretrained(
      transformers.Gemma2ForCausalLM.from_pretrained(directory).eval(), str(tmp_path)).eval()
  tokens, mask = H.padded_batch(seed=4)
  mask[2] = 1  # PEFT runs with transformers' own positions: right padding only
  ours = _logits(model, params, tokens, mask)
  theirs = H.torch_out(ref, tokens, mask).logits.numpy()
  assert _real_diff(ours, theirs, mask) <= TOL
  again_model, again = hf.load_peft(str(tmp_path))
  assert _real_diff(_logits(again_model, again, tokens, mask), ours, mask) <= 1e-5


def test_flops_count_the_gated_mlp_and_nothing_for_soft_capping():
  from llmjax import flops
  from llmjax.config import ModelConfig
  from llmjax.models import presets
  cfg = ModelConfig(**{**presets.get("gemma2"), "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                       "head_dim": 12, "d_ff": 48, "sliding_window": 0, "layer_pattern": ""})
  # q, o: 4 heads of 12; k, v: 2 heads of 12; wg, wi, wo: 32 x 48 each
  assert flops.block_matmul_params(cfg) == 32 * 12 * (2 * 4 + 2 * 2) + 3 * 32 * 48
  uncapped = dataclasses.replace(cfg, attn_softcap=0.0, final_softcap=0.0)
  assert flops.lm_forward(cfg, 16).total == flops.lm_forward(uncapped, 16).total
