"""Llama 3.x (rope scaling), Qwen2, Qwen3 and Mistral against transformers: tiny random models
with unusual settings (head dims that are not d_model / heads, GQA and MQA, windows shorter than
the input, random norm weights and biases), fp32. Logits on the real tokens of right-padded
batches, greedy generation past the window, save -> transformers, sharded loads, scanned ==
unrolled, PEFT LoRA export, the blocked sliding-window core, FLOPs and bad input."""

import dataclasses
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import flops, hf  # noqa: E402
from llmjax import generate as G  # noqa: E402
from llmjax.config import MeshConfig, ModelConfig  # noqa: E402
from llmjax.config_checks import validate_model_features  # noqa: E402
from llmjax.errors import ConfigError  # noqa: E402
from llmjax.hf import mapping  # noqa: E402
from llmjax.models import attention, presets  # noqa: E402
from llmjax.models.peft import Peft  # noqa: E402
from llmjax.parallel import mesh as meshlib  # noqa: E402

TOL, VOCAB, LENGTH = 1e-4, 64, 16
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
               initializer_range=0.2, rms_norm_eps=1e-6, max_position_embeddings=32,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
_ROPE = dict(rope_theta=10000.0, original_max_position_embeddings=8)


def _configs() -> dict:
  """name -> transformers config: every feature these families add, in a few tiny models."""
  T = transformers
  llama = dict(_COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=12)
  return {
      # Llama 3.1's rope, biases on attention only (q, k, v and o).
      "llama3": T.LlamaConfig(**llama, attention_bias=True, rope_parameters=dict(
          _ROPE, rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0)),
      "llama_yarn": T.LlamaConfig(**llama, tie_word_embeddings=True, rope_parameters=dict(
          _ROPE, rope_type="yarn", factor=4.0, beta_fast=8.0)),
      "llama_linear": T.LlamaConfig(**llama, mlp_bias=True, rope_parameters=dict(
          rope_type="linear", rope_theta=500.0, factor=2.0)),
      # Positions past max_position_embeddings: NTK scaling of the base.
      "llama_dynamic": T.LlamaConfig(**dict(llama, max_position_embeddings=12), rope_parameters=dict(
          rope_type="dynamic", rope_theta=10000.0, factor=3.0)),
      # Layer 0 global, layers 1-2 within a 4-token window; q/k/v biases; tied.
      "qwen2": T.Qwen2Config(**_COMMON, num_hidden_layers=3, num_key_value_heads=2,
                             use_sliding_window=True, sliding_window=4, max_window_layers=1,
                             tie_word_embeddings=True),
      # head_dim 10 (40 != 32), one KV head, q/k norms, attention biases, alternating window.
      "qwen3": T.Qwen3Config(**_COMMON, num_hidden_layers=2, num_key_value_heads=1, head_dim=10,
                             attention_bias=True, use_sliding_window=True, sliding_window=5,
                             layer_types=["sliding_attention", "full_attention"]),
      "mistral": T.MistralConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2,
                                 head_dim=6, sliding_window=5),
  }


CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def _make(name: str, directory):
  """The named random model (every parameter random: norm scales around 1) saved to
  `directory`; -> torch model (eval)."""
  import torch
  config = _configs()[name]
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(transformers, CLASSES[config.model_type])(config).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      p.normal_(1.0 if key.endswith("norm.weight") else 0.0, 0.2)
  model.save_pretrained(str(directory))
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
  mask[1, LENGTH - 5:], mask[2, LENGTH - 10:] = 0, 0
  return tokens, mask


def _ours(model, params, tokens, mask):
  # jitted: one compile per model, not one per primitive run eagerly
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                                segment_ids_BL=jnp.asarray(mask),
                                positions_BL=jnp.asarray(H.hf_positions(mask))))


def _diff(ours, ref, mask) -> float:
  return float(np.abs(ours - ref)[mask.astype(bool)].max())


EXPECTED = {  # what each directory becomes (fields besides the sizes)
    "llama3": dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=8,
                   qkv_bias=True, o_bias=True, head_dim=12, n_kv_heads=2),
    "llama_yarn": dict(rope_scaling="yarn", rope_beta_fast=8.0, tie_embeddings=True),
    "llama_linear": dict(rope_scaling="linear", rope_theta=500.0, mlp_bias=True),
    "llama_dynamic": dict(rope_scaling="dynamic", rope_factor=3.0, max_len=12),
    "qwen2": dict(qkv_bias=True, o_bias=False, sliding_window=4, layer_pattern="GLL"),
    "qwen3": dict(qk_norm=True, qkv_bias=True, o_bias=True, head_dim=10, n_kv_heads=1,
                  sliding_window=5, layer_pattern="LG"),
    "mistral": dict(sliding_window=5, layer_pattern="", head_dim=6, use_bias=False),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_logits_match_transformers_on_right_padded_batches(saved, name):
  directory, ref_model = saved[name]
  model, params = hf.load(directory)
  for field, value in EXPECTED[name].items():
    assert getattr(model.cfg, field) == value, field
  tokens, mask = _right_padded()
  ref = H.torch_out(ref_model, tokens, mask, position_ids=H.hf_positions(mask)).logits.numpy()
  assert np.abs(ref).max() > 0.5
  assert _diff(_ours(model, params, tokens, mask), ref, mask) <= TOL


def _torch_greedy(ref_model, tokens, mask, n_new):
  import torch
  with torch.no_grad():
    out = ref_model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             do_sample=False, max_new_tokens=n_new, pad_token_id=0)
  return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("name,scan", [("qwen2", True), ("mistral", False)])
def test_greedy_generation_past_the_window_is_token_identical(saved, name, scan):
  directory, ref_model = saved[name]
  tokens, mask = G.left_pad([[5, 17, 3, 40, 42, 9, 11, 23, 31, 8], [8, 1, 60, 23, 7, 7, 30]])
  ref = _torch_greedy(ref_model, tokens.astype(np.int64), mask.astype(np.int64), 8)
  model, params = hf.load(directory, scan_layers=scan)
  ours = np.asarray(G.generate(model, params, tokens, prompt_mask_BP=mask, max_new_tokens=8))
  np.testing.assert_array_equal(ours, ref)


def test_save_loads_in_transformers_with_the_same_logits(saved, tmp_path):
  tokens, mask = _right_padded(seed=1)
  for name, (directory, ref_model) in saved.items():
    model, params = hf.load(directory)
    hf.save(model, params, str(tmp_path / name))
    again, info = type(ref_model).from_pretrained(str(tmp_path / name), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
    ref = H.torch_out(ref_model, tokens, mask).logits.numpy()
    assert _diff(H.torch_out(again.eval(), tokens, mask).logits.numpy(), ref, mask) <= 1e-5, name
    assert hf.model_config(str(tmp_path / name)) == model.cfg, name


@pytest.mark.parametrize("rules", ["dp", "fsdp", "tp", "fsdp_tp"])
def test_sharded_loads_equal_the_unsharded_one(saved, rules):
  directory, _ = saved["qwen2"]
  _, params = hf.load(directory)
  mesh = meshlib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  _, sharded = hf.load(directory, mesh=mesh, rules=rules)
  assert jax.tree.structure(sharded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(sharded["layer_0"]["attn"]["q"]["kernel"].sharding.device_set) == 8


def test_scanned_blocked_equals_unrolled_xla_with_a_layer_pattern(saved):
  directory, ref_model = saved["qwen2"]  # layers G, L, L: the scan switches per layer
  model, params = hf.load(directory)
  scanned, scanned_params = hf.load(directory, scan_layers=True)
  scanned = scanned.clone(cfg=dataclasses.replace(scanned.cfg, attention_impl="blocked",
                                                  attention_block=4))
  assert scanned_params["layers"]["attn"]["q"]["bias"].shape == (3, 4, 8)
  tokens, mask = _right_padded(seed=2)
  ours = _ours(model, params, tokens, mask)
  np.testing.assert_allclose(_ours(scanned, scanned_params, tokens, mask)[mask.astype(bool)],
                             ours[mask.astype(bool)], atol=1e-5)


def test_peft_lora_adapter_loads_in_peft_with_equal_logits(saved, tmp_path):
  import peft
  directory, _ = saved["qwen3"]
  base, base_params = hf.load(directory)
  lora = Peft(lora_targets=r"(.*/)?(attn/(q|k|v|o)|mlp/(wi|wg|wo))", lora_rank=2, lora_alpha=4.0)
  model = base.clone(peft=lora)
  rng = np.random.default_rng(0)  # the base's weights, random LoRA factors (B too: not zero)
  base_flat = mapping.flatten(base_params)
  params = mapping.unflatten({
      p: base_flat[p] if p in base_flat else jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype)
      for p, a in mapping.flatten(nn.unbox(hf.abstract_params(model))).items()})
  hf.save_adapter(model, params, lora, str(tmp_path / "adapter"), base_model_path=directory)
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    config = json.load(f)
  assert config["task_type"] == "CAUSAL_LM"
  assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                      "up_proj", "v_proj"]
  torch_base = transformers.Qwen3ForCausalLM.from_pretrained(directory).eval()
  tokens, mask = _right_padded(seed=3)
  before = H.torch_out(torch_base, tokens, mask).logits.numpy()  # PEFT wraps torch_base in place
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    theirs_model = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
  assert not [w for w in caught if "adapter keys" in str(w.message)], caught
  theirs = H.torch_out(theirs_model, tokens, mask).logits.numpy()
  ours = _ours(model, params, tokens, mask)
  assert _diff(ours, before, mask) > 1e-2  # the adapter changes the model
  assert _diff(ours, theirs, mask) <= TOL


def _dot_generals(jaxpr):
  """Every dot_general of a jaxpr, inside nested (jitted) calls too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        yield from _dot_generals(inner)


def test_blocked_sliding_window_equals_xla_and_computes_fewer_blocks():
  rng = np.random.default_rng(0)
  h = 5  # no key extent is 5: the q.k products are the dot_generals contracting 5
  q = jnp.asarray(rng.normal(size=(2, 24, 4, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 24, 2, h)), jnp.float32) for _ in range(2))
  segments = np.ones((2, 24), np.int32)
  segments[1, 20:] = 0  # padding
  mask = attention.segment_mask(jnp.asarray(segments))
  window, block = 6, 4
  xla = jax.jit(lambda *a: attention.fused_attention(*a, True, "xla", False, window=window))(
      q, k, v, mask)  # jitted: one compile each, not one per eager op
  blocked = jax.jit(lambda *a: attention.blocked_causal_attention(*a, block, window=window))(
      q, k, v, mask)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(xla), atol=1e-5)
  # against the definition: query i sees keys (i - window, i] of its segment
  i, j = np.arange(24)[:, None], np.arange(24)[None, :]
  explicit = mask & jnp.asarray((j <= i) & (j > i - window))[None, None]
  reference = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=explicit)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(reference), atol=1e-5)
  # the tiles: 6 query blocks; each needs at most 3 key blocks, full causal needs up to 6
  assert attention.computed_key_blocks(24, block, window) == 1 + 2 + 3 + 3 + 3 + 3
  assert attention.computed_key_blocks(24, block) == 1 + 2 + 3 + 4 + 5 + 6
  # and the traced program computes exactly those scores (batch 2, 2 KV heads of 2 queries)
  jaxpr = jax.make_jaxpr(lambda *a: attention.blocked_causal_attention(*a, block, window=window))(
      q, k, v, mask).jaxpr
  scores = sum(math.prod(e.outvars[0].aval.shape) for e in _dot_generals(jaxpr)
               if math.prod(e.invars[0].aval.shape[d]
                            for d in e.params["dimension_numbers"][0][0]) == h)
  tiles = lambda w: sum((end - start) * (end - first)  # noqa: E731
                        for start, end, first in attention.blocked_ranges(24, block, w))
  assert scores == 2 * 2 * 2 * tiles(window) and tiles(window) < tiles(0)


def test_flops_count_the_window():
  base = dict(presets.get("mistral"), vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
              d_ff=48, max_len=64)
  full = ModelConfig(**dict(base, sliding_window=0))
  windowed = ModelConfig(**dict(base, sliding_window=8, layer_pattern="LG"))
  length, nh = 32, 4 * 8
  attention_full = 2 * 4.0 * nh * length**2 / 2
  local = length**2 / 2 - (length - 8) ** 2 / 2  # 8 * 32 - 32 = 224 pairs
  assert local == 224
  matmul = flops.backbone_forward(full, length).total - attention_full
  assert flops.backbone_forward(windowed, length).total == matmul + 4.0 * nh * (local +
                                                                                 length**2 / 2)


def test_bad_input_is_named(saved, tmp_path):
  directory, _ = saved["llama3"]
  with open(os.path.join(directory, "config.json")) as f:
    raw = json.load(f)
  os.makedirs(tmp_path / "longrope")
  for name in ("model.safetensors",):
    os.symlink(os.path.join(directory, name), tmp_path / "longrope" / name)
  with open(tmp_path / "longrope" / "config.json", "w") as f:
    json.dump(dict(raw, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                         "long_factor": [1.0] * 6, "short_factor": [1.0] * 6,
                                         "original_max_position_embeddings": 8}), f)
  with pytest.raises(hf.UnsupportedModelError, match="llama rope_parameters.rope_type "
                     "'longrope' is not supported"):
    hf.load(str(tmp_path / "longrope"))
  qwen3, _ = saved["qwen3"]
  os.makedirs(tmp_path / "shape")
  from safetensors.numpy import load_file, save_file
  weights = load_file(os.path.join(qwen3, "model.safetensors"))
  weights["model.layers.1.self_attn.q_norm.weight"] = np.ones(8, np.float32)
  save_file(weights, str(tmp_path / "shape" / "model.safetensors"))
  os.symlink(os.path.join(qwen3, "config.json"), tmp_path / "shape" / "config.json")
  with pytest.raises(hf.WeightsMismatchError, match=r"model.layers.1.self_attn.q_norm.weight "
                     r"has shape \[8\], expected \[10\]"):
    hf.load(str(tmp_path / "shape"))
  bert_window = ModelConfig(**dict(presets.get("bert"), sliding_window=4))
  with pytest.raises(ConfigError, match="sliding_window=4 needs a causal decoder"):
    validate_model_features(bert_window)
  with pytest.raises(ConfigError, match="layer_pattern='LX'"):
    validate_model_features(ModelConfig(**dict(presets.get("mistral"), layer_pattern="LX")))


def test_the_directorys_own_tokenizer_eos_ids_and_chat_template(saved, tmp_path):
  """What init_from=hf: and generate --checkpoint=hf: read: the tokenizer files, several EOS
  ids (generation_config.json), the chat template kept through convert."""
  from llmjax.hf import convert
  from llmjax import weights
  directory = tmp_path / "qwen2"
  saved["qwen2"][1].save_pretrained(str(directory))
  H.save_char_tokenizer(directory)
  template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
  tokenizer = hf.load_tokenizer(str(directory))
  tokenizer.chat_template = template
  tokenizer.save_pretrained(str(directory))
  transformers.GenerationConfig(eos_token_id=[1, 2], pad_token_id=0).save_pretrained(
      str(directory))
  loaded = convert.load_hf(str(directory))
  assert loaded.eos_token_ids == [1, 2] and loaded.pad_token_id == 0
  source = weights.parse(f"hf:{directory}", "train.init_from")
  text = source.tokenizer()
  assert text.decode(text.encode("hello.")) == "hello." and len(text.encode("hello.")) == 6
  assert text.hf.chat_template == template
  convert.hf_to_export(str(directory), str(tmp_path / "export"))
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "again"))
  assert hf.load_tokenizer(str(tmp_path / "again")).chat_template == template
  with open(tmp_path / "again" / "config.json") as f:
    assert json.load(f)["eos_token_id"] == [1, 2]


def test_prefix_tuning_keeps_the_window_with_and_without_the_cache():
  """Prefix tuning's explicit masks (no cache; the cache's slots when decoding) hold the window
  of the local layers, and every query still sees the whole prefix."""
  from llmjax.models.transformer import Transformer, init_cache
  cfg = ModelConfig(**dict(presets.get("mistral"), vocab_size=VOCAB, d_model=32, n_layers=2,
                           n_heads=4, n_kv_heads=2, d_ff=48, max_len=32, sliding_window=3,
                           layer_pattern="LG"))
  model = Transformer(cfg, Peft(prefix_length=2))
  tokens = jnp.asarray(np.random.default_rng(4).integers(1, VOCAB, (2, 12)), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
  full = jax.jit(model.apply)({"params": params}, tokens)
  cached, _ = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode=True,
                                                 prefill=True, mutable=["cache"]))(
      params, init_cache(model, 2, 12), tokens)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=1e-5)
  unwindowed = model.clone(cfg=dataclasses.replace(cfg, sliding_window=0, layer_pattern=""))
  assert np.abs(np.asarray(jax.jit(unwindowed.apply)({"params": params}, tokens)) -
                np.asarray(full))[:, 3:].max() > 1e-3  # the window changes later positions
