"""Marian (MarianMTModel) <-> EncoderDecoder against transformers itself: logits parity on
right-padded pairs, exact round trips both ways, `llmjax convert`, sharded loading, and a clear
error for each kind of seq2seq directory llmjax does not read."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _hf_helpers as H  # noqa: E402
from llmjax import hf  # noqa: E402
from llmjax.cli import convert as convert_cli  # noqa: E402
from llmjax.config import MeshConfig, ModelConfig  # noqa: E402
from llmjax.models import presets  # noqa: E402
from llmjax.models.encoder_decoder import EncoderDecoder  # noqa: E402
from llmjax.parallel import mesh as meshlib  # noqa: E402
from llmjax.parallel import sharding  # noqa: E402

TOL = 1e-4
# name -> MarianConfig overrides: each activation, scaled and unscaled embeddings, more encoder
# than decoder layers and the reverse, tied and untied output projections.
CONFIGS = {
    "swish_scaled_tied": dict(activation_function="swish", scale_embedding=True,
                              encoder_layers=2, decoder_layers=1, tie_word_embeddings=True),
    "gelu_unscaled_untied": dict(activation_function="gelu", scale_embedding=False,
                                 encoder_layers=1, decoder_layers=2, tie_word_embeddings=False),
    # the decoder with heads and an MLP width of its own
    "relu_scaled_untied": dict(activation_function="relu", scale_embedding=True,
                               encoder_layers=1, decoder_layers=1, tie_word_embeddings=False,
                               decoder_attention_heads=2, decoder_ffn_dim=48),
}
MESHES = {"dp": dict(data=8), "fsdp": dict(data=1, fsdp=8), "tp": dict(data=4, tensor=2),
          "fsdp_tp": dict(data=1, fsdp=4, tensor=2),
          # The expert presets on a model without experts: the batch also splits over `expert`,
          # every weight is placed as under the preset without it.
          "ep": dict(data=2, expert=4), "fsdp_ep": dict(data=1, fsdp=4, expert=2),
          "fsdp_tp_ep": dict(data=1, fsdp=2, tensor=2, expert=2)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, torch model) for every config, built once per module."""
  out = {}
  for seed, (name, overrides) in enumerate(CONFIGS.items()):
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), H.make_marian(directory, seed, **overrides))
  return out


def _logits(model, params, batch):
  source, source_mask, target, target_mask = map(jnp.asarray, batch)
  # Jitted: one compile, not one per operation (the sharded loads would compile each op anew).
  return np.asarray(jax.jit(model.apply)({"params": params}, source, target,
                                         source_mask_BS=source_mask, target_mask_BT=target_mask))


def _max_diff_on_real(ours, ref, target_mask) -> float:
  return float(np.abs(ours - ref)[target_mask.astype(bool)].max())


def _parity(directory, ref_model, **load_kwargs):
  """(model, params, max |llmjax - transformers| logits over the real target positions)."""
  model, params = hf.load(directory, **load_kwargs)
  batch = H.seq2seq_batch(seed=1)
  ref = H.torch_seq2seq_logits(ref_model, *batch)
  assert np.abs(ref).max() > 0.5  # the comparison means something
  return model, params, _max_diff_on_real(_logits(model, params, batch), ref, batch[3])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(saved, name):
  model, params, diff = _parity(*saved[name])
  hf_config = saved[name][1].config
  assert type(model) is EncoderDecoder
  assert (model.cfg.n_layers, model.cfg.n_decoder_layers) == (hf_config.encoder_layers,
                                                              hf_config.decoder_layers)
  assert model.cfg.embed_scale == hf_config.scale_embedding
  assert model.cfg.tie_embeddings == hf_config.tie_word_embeddings
  assert ("lm_head" in params) != hf_config.tie_word_embeddings
  assert np.abs(np.asarray(params["final_logits_bias"])).max() > 0.1  # random, so it is tested
  assert diff <= TOL


def test_scanned_layers_load_with_parity(saved):
  _, params, diff = _parity(*saved["gelu_unscaled_untied"], scan_layers=True)
  assert params["encoder"]["layers"]["attn"]["q"]["kernel"].shape == (1, 32, 4, 8)
  assert params["decoder"]["layers"]["cross_attn"]["k"]["kernel"].shape == (2, 32, 4, 8)
  assert diff <= TOL


# --- round trips ---------------------------------------------------------------------------------


MODEL_FIELDS = ("vocab_size", "decoder_vocab_size", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                "decoder_ffn_dim", "max_position_embeddings", "activation_function",
                "scale_embedding", "tie_word_embeddings", "share_encoder_decoder_embeddings",
                "dropout", "attention_dropout", "activation_dropout", "model_type",
                "architectures")


def _assert_same_tensors(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", ["swish_scaled_tied", "gelu_unscaled_untied"])
def test_hf_to_llmjax_to_hf_is_exact(saved, name, tmp_path):
  directory, ref_model = saved[name]
  model, params = hf.load(directory)
  hf.save(model, params, str(tmp_path))
  # The files: the same keys (transformers itself never saves the sinusoid tables) and tensors.
  _assert_same_tensors(load_file(os.path.join(directory, "model.safetensors")),
                       load_file(str(tmp_path / "model.safetensors")))
  # The config: every field that decides what the model computes or how it trains.
  with open(os.path.join(directory, "config.json")) as f, open(tmp_path / "config.json") as g:
    source, written = json.load(f), json.load(g)
  assert {k: written[k] for k in MODEL_FIELDS} == {k: source[k] for k in MODEL_FIELDS}
  # What transformers makes of them: every tensor of the state dict, and so the logits.
  again, info = transformers.MarianMTModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _assert_same_tensors({k: v.numpy() for k, v in again.state_dict().items()},
                       {k: v.numpy() for k, v in ref_model.state_dict().items()})
  batch = H.seq2seq_batch(seed=2)
  np.testing.assert_array_equal(H.torch_seq2seq_logits(again.eval(), *batch),
                                H.torch_seq2seq_logits(ref_model, *batch))


def _marian_model(kind: str) -> EncoderDecoder:
  base = dict(vocab_size=H.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=H.MAX_LEN)
  if kind == "preset":
    return EncoderDecoder(ModelConfig(**{**presets.get("marian"), **base}))
  # untied, unscaled, 2 encoder / 3 decoder layers, GELU, stacked layers
  return EncoderDecoder(ModelConfig(**{**presets.get("marian"), **base, "n_decoder_layers": 3,
                                       "tie_embeddings": False, "embed_scale": False,
                                       "mlp": "gelu", "scan_layers": True}))


@pytest.mark.parametrize("kind", ["preset", "untied_scanned"])
def test_llmjax_to_hf_to_llmjax_is_exact_and_transformers_agrees(kind, tmp_path):
  model = _marian_model(kind)
  rng = np.random.default_rng(0)  # random values of the right shapes; no init to compile
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, size=a.shape), a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  hf.save(model, params, str(tmp_path))
  again_model, again = hf.load(str(tmp_path), scan_layers=model.cfg.scan_layers)
  assert type(again_model) is EncoderDecoder
  # n_decoder_layers=0 means "as many as the encoder"; a HF config names the number.
  assert again_model.cfg == dataclasses.replace(
      model.cfg, n_decoder_layers=model.cfg.n_decoder_layers or model.cfg.n_layers)
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # transformers reads every tensor it uses from the file, and computes what llmjax computes.
  ref_model, info = transformers.MarianMTModel.from_pretrained(str(tmp_path),
                                                               output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  batch = H.seq2seq_batch(seed=3)
  ref = H.torch_seq2seq_logits(ref_model.eval(), *batch)
  assert np.abs(ref).max() > 0.5
  assert _max_diff_on_real(_logits(model, params, batch), ref, batch[3]) <= TOL


# --- llmjax convert --------------------------------------------------------------------------


def _convert(*args):
  convert_cli.main(["llmjax convert", *args])


def test_convert_cli_hf_to_export_to_hf_keeps_the_logits(saved, tmp_path, capsys):
  directory, ref_model = saved["gelu_unscaled_untied"]
  export, back = tmp_path / "export", tmp_path / "back"
  _convert(f"--from=hf:{directory}", f"--to={export}")
  assert "converted EncoderDecoder (1 layers, d_model 32)" in capsys.readouterr().out
  assert os.path.isdir(export / "params")
  _convert(f"--from={export}", f"--to=hf:{back}")
  assert str(back) in capsys.readouterr().out
  with open(back / "config.json") as f:  # the source's special ids come through the export
    written = json.load(f)
  assert written["pad_token_id"] == H.MARIAN_PAD and written["eos_token_id"] == 0
  again, info = transformers.MarianMTModel.from_pretrained(str(back), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  batch = H.seq2seq_batch(seed=4)
  np.testing.assert_array_equal(H.torch_seq2seq_logits(again.eval(), *batch),
                                H.torch_seq2seq_logits(ref_model, *batch))


# --- sharded loading -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unsharded(saved):
  directory, _ = saved["swish_scaled_tied"]
  model, params = hf.load(directory)
  batch = H.seq2seq_batch(seed=5)
  return batch, _logits(model, params, batch)


# Where each preset puts an attention projection [embed, heads, head_dim] and the embedding
# [vocab, embed], written out independently of sharding.RULES.
PLACEMENT = {"dp": ((), ()), "fsdp": (("fsdp",), (None, "fsdp")),
             "tp": ((None, "tensor"), ("tensor",)),
             "fsdp_tp": (("fsdp", "tensor"), ("tensor", "fsdp"))}
PLACEMENT.update(ep=PLACEMENT["dp"], fsdp_ep=PLACEMENT["fsdp"], fsdp_tp_ep=PLACEMENT["fsdp_tp"])


def _spec(array) -> tuple:
  spec = tuple(array.sharding.spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


@pytest.mark.parametrize("rules", list(sharding.RULES))
def test_sharded_load_equals_unsharded(saved, unsharded, rules):
  assert set(MESHES) == set(sharding.RULES)
  directory, _ = saved["swish_scaled_tied"]
  mesh = meshlib.make_mesh(MeshConfig(**MESHES[rules]))
  model, params = hf.load(directory, mesh=mesh, rules=rules)
  q = params["decoder"]["layer_0"]["cross_attn"]["q"]["kernel"]
  assert q.sharding.mesh.devices.size == 8
  assert (_spec(q), _spec(params["embed"]["embedding"])) == PLACEMENT[rules]
  batch, expected = unsharded
  np.testing.assert_allclose(_logits(model, params, batch), expected, atol=1e-5, rtol=0)


# --- bad input: one clear error each, from hf.load and from `llmjax convert` (exit 2, one line) --


def _copy_with(directory, dest, **config):
  os.makedirs(dest)
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump({**cfg, **config}, f)
  save_file(load_file(os.path.join(directory, "model.safetensors")),
            os.path.join(dest, "model.safetensors"))
  return str(dest)


def _mbart(dest):
  import torch
  torch.manual_seed(0)
  transformers.MBartForConditionalGeneration(transformers.MBartConfig(
      vocab_size=H.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
      decoder_ffn_dim=64, max_position_embeddings=H.MAX_LEN)).save_pretrained(str(dest))
  return str(dest)


def _separate_embeddings(saved, dest):
  """An untied Marian whose encoder embeds with a table of its own (transformers v5 would use it)."""
  directory, _ = saved["gelu_unscaled_untied"]
  _copy_with(directory, dest)
  weights = load_file(os.path.join(dest, "model.safetensors"))
  weights["model.encoder.embed_tokens.weight"] = weights["model.encoder.embed_tokens.weight"] + 1
  save_file(weights, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
  return str(dest)


BAD = {
    "mbart": (lambda saved, dest: _mbart(dest), hf.UnsupportedModelError,
              r"model_type 'mbart' is not supported; supported: .*marian, bart"),
    "separate_vocabularies": (
        lambda saved, dest: _copy_with(saved["swish_scaled_tied"][0], dest,
                                       share_encoder_decoder_embeddings=False),
        hf.UnsupportedModelError, r"share_encoder_decoder_embeddings=false.*not supported"),
    "heads_not_dividing": (
        lambda saved, dest: _copy_with(saved["swish_scaled_tied"][0], dest,
                                       decoder_attention_heads=5),
        hf.UnsupportedModelError, r"marian d_model=32 is not a multiple of 5 attention heads"),
    "separate_embeddings": (_separate_embeddings, hf.UnsupportedModelError,
                            r"model\.encoder\.embed_tokens\.weight differs from "
                            r"model\.shared\.weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_directories_fail_clearly_in_the_api_and_the_cli(saved, case, tmp_path, capsys):
  make, error, message = BAD[case]
  assert issubclass(error, hf.HFError)
  bad = make(saved, tmp_path / "bad")
  capsys.readouterr()  # transformers' progress bars while saving
  with pytest.raises(error, match=message):
    hf.load(bad)
  with pytest.raises(SystemExit) as e:
    _convert(f"--from=hf:{bad}", f"--to={tmp_path / 'export'}")
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert re.search(message, err), err
  assert not os.path.exists(tmp_path / "export")
