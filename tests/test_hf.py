"""llmjax.hf against transformers itself: logits parity (fp32, padded batches), round trips both
ways, sharded loading, and a named error for each kind of bad directory."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.config import MeshConfig, ModelConfig  # noqa: E402
from llmjax.models import heads, presets  # noqa: E402
from llmjax.models.peft import Peft  # noqa: E402
from llmjax.models.transformer import Transformer  # noqa: E402
from llmjax.parallel import mesh as meshlib  # noqa: E402

TOL = 1e-4
DECODERS = ("gpt2", "llama_gqa_untied", "llama_mha_tied")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, torch model) for every tiny architecture, built once per module."""
  out = {}
  for name in H.configs():
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), H.make(name, directory))
  return out


def _max_diff_on_real(ours, ref, mask) -> float:
  return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


def _decoder_parity(directory, ref_model, **load_kwargs):
  """Max |llmjax - transformers| logits on the real tokens of a left- and right-padded batch."""
  model, params = hf.load(directory, **load_kwargs)
  tokens, mask = H.padded_batch(seed=1)
  positions = H.hf_positions(mask)
  ref = H.torch_out(ref_model, tokens, mask, position_ids=positions).logits.numpy()
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                              segment_ids_BL=jnp.asarray(mask), positions_BL=jnp.asarray(positions))
  assert np.abs(ref).max() > 0.5  # the comparison means something
  return model, params, _max_diff_on_real(ours, ref, mask)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_logits_match_transformers(saved, name):
  assert _decoder_parity(*saved[name])[2] <= TOL


def test_bert_hidden_pooled_mlm_and_classifier_match_transformers(saved):
  tokens, mask = H.padded_batch(seed=2)
  mask[2] = mask[2, ::-1]  # BERT is padded on the right
  types = (np.arange(tokens.shape[1])[None] >= 5).astype(np.int64).repeat(4, 0)
  inputs = dict(attention_mask_BL=jnp.asarray(mask), token_types_BL=jnp.asarray(types))
  for name in ("bert", "bert_mlm", "bert_cls"):
    directory, ref_model = saved[name]
    model, params = hf.load(directory)
    ref = H.torch_out(ref_model, tokens, mask, token_type_ids=types)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), **inputs)
    if name == "bert":
      assert isinstance(model, heads.Encoder)
      assert _max_diff_on_real(ours[0], ref.last_hidden_state.numpy(), mask) <= TOL
      assert np.abs(np.asarray(ours[1]) - ref.pooler_output.numpy()).max() <= TOL
    elif name == "bert_mlm":
      assert isinstance(model, heads.MaskedLM)
      assert _max_diff_on_real(ours, ref.logits.numpy(), mask) <= TOL
    else:
      assert isinstance(model, heads.SequenceClassifier) and model.num_labels == 3
      assert np.abs(np.asarray(ours) - ref.logits.numpy()).max() <= TOL


def test_scanned_layers_load_with_parity(saved):
  _, params, diff = _decoder_parity(*saved["llama_gqa_untied"], scan_layers=True)
  assert params["layers"]["attn"]["k"]["kernel"].shape == (2, 32, 2, 8)
  assert diff <= TOL


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied", "bert_mlm", "bert_cls"])
def test_hf_to_llmjax_to_hf_loads_in_transformers_with_equal_logits(saved, name, tmp_path):
  directory, ref_model = saved[name]
  model, params = hf.load(directory)
  hf.save(model, params, str(tmp_path))
  cls = type(ref_model)
  again, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens, mask = H.padded_batch(seed=3)
  np.testing.assert_array_equal(H.torch_out(again.eval(), tokens, mask).logits.numpy(),
                                H.torch_out(ref_model, tokens, mask).logits.numpy())


def _llmjax_model(kind: str):
  base = dict(vocab_size=H.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=H.MAX_LEN)
  if kind == "gpt2":
    return Transformer(ModelConfig(**{**presets.get("gpt2"), **base}))
  if kind == "llama_scan_bf16":
    return Transformer(ModelConfig(**{**presets.get("llama"), **base, "n_kv_heads": 2,
                                      "scan_layers": True, "param_dtype": "bfloat16",
                                      "dtype": "bfloat16"}))
  return heads.MaskedLM(ModelConfig(**{**presets.get("bert"), **base}))


@pytest.mark.parametrize("kind", ["gpt2", "llama_scan_bf16", "bert_mlm"])
def test_llmjax_to_hf_to_llmjax_params_equal(kind, tmp_path):
  model = _llmjax_model(kind)
  rng = np.random.default_rng(0)  # random values of the right shapes; no init to compile
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  hf.save(model, params, str(tmp_path))
  again_model, again = hf.load(str(tmp_path), model.cfg.param_dtype,
                               scan_layers=model.cfg.scan_layers)
  assert again_model.cfg == model.cfg and type(again_model) is type(model)
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_sharded_index_and_placement_on_a_mesh(saved, tmp_path):
  directory, ref_model = saved["llama_gqa_untied"]
  ref_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  mesh = meshlib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  _, params, diff = _decoder_parity(str(tmp_path), ref_model, mesh=mesh, rules="fsdp_tp")
  q = params["layer_0"]["attn"]["q"]["kernel"]  # [embed, heads, head_dim]
  assert isinstance(q.sharding, NamedSharding)
  assert q.sharding.spec[0] == "fsdp" and q.sharding.spec[1] == "tensor"
  assert diff <= TOL


def test_load_params_into_an_abstract_tree(saved):
  directory, _ = saved["gpt2"]
  model = hf.build(directory, scan_layers=True)
  abstract = nn.unbox(hf.abstract_params(model))
  params = hf.load_params(directory, abstract)
  assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 32, 4, 8)
  wrong = dict(abstract, embed={"embedding": jax.ShapeDtypeStruct((128, 32), jnp.float32)})
  with pytest.raises(hf.WeightsMismatchError, match=r"embed/embedding: expected \[128, 32\].*"
                     r"checkpoint has \[100, 32\]"):
    hf.load_params(directory, wrong)


# --- bad input: each gives its own named error --------------------------------------------------


def _copy(directory, dest, *, config=None, tensors=None):
  os.makedirs(dest, exist_ok=True)
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(config or {})
  with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump(cfg, f)
  weights = load_file(os.path.join(directory, "model.safetensors"))
  save_file(tensors(weights) if tensors else weights, os.path.join(dest, "model.safetensors"))
  return str(dest)


def test_unsupported_model_type_lists_the_supported_ones(saved, tmp_path):
  bad = _copy(saved["gpt2"][0], tmp_path, config={"model_type": "t5", "auto_map": {"x": "y"}})
  with pytest.raises(hf.UnsupportedModelError,
                     match="model_type 't5'.*supported: gpt2, llama, bert"):
    hf.load(bad)
  bad = _copy(saved["bert"][0], tmp_path / "b",
              config={"architectures": ["BertForQuestionAnswering"]})
  with pytest.raises(hf.UnsupportedModelError, match="BertForQuestionAnswering.*BertForMaskedLM"):
    hf.load(bad)


def test_missing_unexpected_and_misshaped_tensors_are_each_named(saved, tmp_path):
  def edit(w):
    w = dict(w)
    del w["transformer.h.1.mlp.c_fc.bias"]
    w["transformer.h.0.attn.extra"] = np.zeros((3,), np.float32)
    w["transformer.wpe.weight"] = w["transformer.wpe.weight"][:40]
    return w
  bad = _copy(saved["gpt2"][0], tmp_path, tensors=edit)
  with pytest.raises(hf.WeightsMismatchError) as e:
    hf.load(bad)
  message = str(e.value)
  assert "missing transformer.h.1.mlp.c_fc.bias (expected shape [128])" in message
  assert "unexpected transformer.h.0.attn.extra (shape [3])" in message
  assert "transformer.wpe.weight has shape [40, 32], expected [64, 32]" in message


def test_pickled_weights_are_refused(saved, tmp_path):
  _copy(saved["gpt2"][0], tmp_path)
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
  with pytest.raises(hf.PickleWeightsError, match="pytorch_model.bin.*safetensors only"):
    hf.load(str(tmp_path))


def test_unsupported_settings_and_inexpressible_exports(saved, tmp_path):
  bad = _copy(saved["llama_mha_tied"][0], tmp_path / "a",
              config={"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                          "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}})
  with pytest.raises(hf.UnsupportedModelError, match="rope_type 'longrope' is not supported"):
    hf.load(bad)
  rope_gpt = Transformer(ModelConfig(**{**presets.get("gpt2"), "pos_emb": "rope"}))
  with pytest.raises(hf.UnsupportedModelError, match="pos_emb='learned', model has 'rope'"):
    hf.save(rope_gpt, {}, str(tmp_path / "b"))  # refused before any parameter is read
  assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("peft, named", [
    (Peft(lora_targets=".*attn/q", lora_rank=4), r"LoRA factors \(lora_rank=4"),
    (Peft(lora_targets=".*attn/q", lora_rank=4, adalora=True), "AdaLoRA factors"),
    (Peft(prompt_length=3), r"prompt tuning \(prompt_length=3\)"),
    (Peft(prefix_length=2), r"prefix tuning \(prefix_length=2\)"),
    (Peft(adapter_dim=8), r"bottleneck adapters \(adapter_dim=8\)"),
])
def test_save_refuses_fine_tuning_parameters_hf_would_drop(peft, named, tmp_path):
  cfg = ModelConfig(**presets.get("gpt2"))
  for model in (Transformer(cfg, peft), heads.SequenceClassifier(cfg, 2, peft)):
    with pytest.raises(hf.UnsupportedModelError, match=named + ".*`llmjax export --out=hf:") as e:
      hf.save(model, {}, str(tmp_path / "out"))  # refused before any parameter is read
    assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "out")


# --- Llama with projection biases (attention_bias = mlp_bias <-> use_bias) ---------------------


def _biased_llama(directory, seed: int, **config):
  """A random LlamaForCausalLM with biases on every projection, saved to `directory`."""
  import torch
  base = dict(vocab_size=H.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=H.MAX_LEN, rms_norm_eps=1e-6,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**base, **config})).eval()
  with torch.no_grad():  # HF initialises biases to zero, which would hide a mis-mapped one
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, 0.2)
  model.save_pretrained(str(directory))
  return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_with_biases_loads_with_parity(kv_heads, tmp_path):
  ref_model = _biased_llama(tmp_path, kv_heads, num_key_value_heads=kv_heads,
                            attention_bias=True, mlp_bias=True)
  model, params, diff = _decoder_parity(str(tmp_path), ref_model)
  assert model.cfg.use_bias and model.cfg.kv_heads == kv_heads
  assert params["layer_0"]["attn"]["k"]["bias"].shape == (kv_heads, 8)
  assert params["layer_1"]["mlp"]["wg"]["bias"].shape == (64,)
  assert diff <= TOL
  assert hf.model_config(str(tmp_path)) == model.cfg


def _stdlib_gpt_smoke() -> ModelConfig:
  """The main job's model (experiments/lm/stdlib_gpt.py) at its smoke size."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "lm", "stdlib_gpt.py")
  spec = importlib.util.spec_from_file_location("stdlib_gpt", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return ModelConfig(**module.get_config("smoke").model.to_dict())


def _biased_llmjax_model(kind: str) -> Transformer:
  if kind == "stdlib_gpt_smoke":
    return Transformer(_stdlib_gpt_smoke())
  base = dict(vocab_size=H.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=H.MAX_LEN,
              use_bias=True)
  extra = dict(n_kv_heads=2) if kind == "gqa_untied" else dict(tie_embeddings=True)
  return Transformer(ModelConfig(**{**presets.get("llama"), **base, **extra}))


@pytest.mark.parametrize("kind", ["mha_tied", "gqa_untied", "stdlib_gpt_smoke"])
def test_llmjax_llama_with_biases_exports_with_parity(kind, tmp_path):
  model = _biased_llmjax_model(kind)
  assert model.cfg.use_bias and model.cfg.mlp == "swiglu" and model.cfg.pos_emb == "rope"
  rng = np.random.default_rng(0)  # biases random too, so each one's mapping is exercised
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, size=a.shape), a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  hf.save(model, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    written = json.load(f)
  assert written["attention_bias"] is True and written["mlp_bias"] is True
  ref_model, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path),
                                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens, mask = H.padded_batch(seed=4)  # ids < H.VOCAB, within every model's vocabulary
  positions = H.hf_positions(mask)
  ref = H.torch_out(ref_model.eval(), tokens, mask, position_ids=positions).logits.numpy()
  ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens),
                              segment_ids_BL=jnp.asarray(mask), positions_BL=jnp.asarray(positions))
  assert np.abs(ref).max() > 0.5
  assert _max_diff_on_real(ours, ref, mask) <= TOL
  again_model, again = hf.load(str(tmp_path))
  assert again_model.cfg == model.cfg
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("attention_bias,mlp_bias", [(True, False), (False, True)])
def test_llama_with_one_kind_of_bias_has_those_biases_only(saved, tmp_path, attention_bias,
                                                           mlp_bias):
  """attention_bias: q, k, v and o biases; mlp_bias: the MLP's (their parity with transformers:
  test_hf_families). This file has no bias at all, so loading names the missing ones."""
  bad = _copy(saved["llama_mha_tied"][0], tmp_path,
              config={"attention_bias": attention_bias, "mlp_bias": mlp_bias})
  cfg = hf.model_config(bad)
  assert (cfg.use_bias, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) == (
      False, attention_bias, attention_bias, mlp_bias)
  missing = "self_attn.o_proj.bias" if attention_bias else "mlp.down_proj.bias"
  with pytest.raises(hf.WeightsMismatchError, match=f"missing model.layers.0.{missing}"):
    hf.load(bad)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_hf_export_files_have_the_mode_the_umask_gives(umask, tmp_path):
  """model.safetensors is as readable as config.json (safetensors alone writes 0600)."""
  model = _llmjax_model("gpt2")
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), nn.unbox(hf.abstract_params(model)))
  old = os.umask(umask)
  try:
    hf.save(model, params, str(tmp_path))
  finally:
    os.umask(old)
  modes = {name: os.stat(tmp_path / name).st_mode & 0o777
           for name in ("model.safetensors", "config.json")}
  assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_a_long_mismatch_lists_five_tensors_and_counts_the_rest(saved, tmp_path):
  """One line, capped: a checkpoint of another model names 5 of its problems, then how many more."""
  bad = _copy(saved["gpt2"][0], tmp_path, tensors=lambda w: {
      k: v for k, v in w.items() if not k.startswith("transformer.h.")})
  with pytest.raises(hf.WeightsMismatchError) as e:
    hf.load(bad)
  message = str(e.value)
  assert "\n" not in message and len(message) < 600, message
  assert message.count("missing transformer.h.") == 5
  assert re.search(r"\(and \d+ more\)$", message), message
