"""Gemma 1/2/3 (text) against transformers: logits on the real tokens of padded batches, greedy
generation, save -> transformers, scanned == unrolled, a sharded load, and the refusals.

Tiny random models with unusual settings (head_dim not d_model / heads, grouped-query attention,
norm weights far from 0, a rope base other than the default), fp32."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

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
  """name -> (transformers config, causal-LM class)."""
  return {
      "gemma": (transformers.GemmaConfig(**_COMMON, tie_word_embeddings=False,
                                         rope_parameters={"rope_type": "default",
                                                          "rope_theta": 500.0}),
                "GemmaForCausalLM"),
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
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens),
                                segment_ids_BL=jnp.asarray(mask),
                                positions_BL=jnp.asarray(H.hf_positions(mask))))


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
  # Scanned layers compute the same function.
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
  directory, _ = saved["gemma"]
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


@pytest.mark.parametrize("fields, named", [
    (dict(attention_bias=True), "gemma attention_bias=true"),
    (dict(hidden_act="relu"), "gemma hidden activation 'relu'"),
    (dict(use_bidirectional_attention=True), "gemma use_bidirectional_attention"),
])
def test_inexpressible_settings_are_refused_by_name(saved, tmp_path, fields, named):
  with pytest.raises(hf.UnsupportedModelError, match=named):
    hf.load(_edited(saved["gemma"][0], tmp_path, **fields))


# --- settings of other architectures that used to be refused (issue 28, item 4) -----------------


def test_gpt2_without_score_scaling_matches_transformers(tmp_path):
  import torch
  config = transformers.GPT2Config(vocab_size=H.VOCAB, n_positions=H.MAX_LEN, n_embd=32,
                                   n_layer=1, n_head=4, scale_attn_weights=False,
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(0)
  ref_model = transformers.GPT2LMHeadModel(config).eval()
  ref_model.save_pretrained(str(tmp_path / "hf"))
  model, params = hf.load(str(tmp_path / "hf"))
  assert model.cfg.query_pre_attn_scalar == 1
  tokens, mask = H.padded_batch(seed=3)
  ref = H.torch_out(ref_model, tokens, mask, position_ids=H.hf_positions(mask)).logits.numpy()
  assert _real_diff(_logits(model, params, tokens, mask), ref, mask) <= TOL
  hf.save(model, params, str(tmp_path / "back"))
  assert json.loads((tmp_path / "back" / "config.json").read_text())["scale_attn_weights"] is False
