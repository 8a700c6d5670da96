"""BART (BartForConditionalGeneration) <-> EncoderDecoder against transformers itself: logits
parity on right-padded pairs, round trips both ways (exact but for the two position rows BART
never reads), greedy and beam search token-identical to transformers' generate, the architecture
`hf.save` picks for an encoder-decoder, and one clear error per unsupported variant."""

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
from llmjax import generate, hf  # noqa: E402
from llmjax.cli import convert as convert_cli  # noqa: E402
from llmjax.config import ModelConfig  # noqa: E402
from llmjax.models import presets  # noqa: E402
from llmjax.models.encoder_decoder import EncoderDecoder  # noqa: E402

TOL = 1e-4
# name -> BartConfig overrides: BART's own GELU, unscaled and tied; and the reverse of each, with
# more decoder than encoder layers, and the decoder's own heads and MLP width.
CONFIGS = {
    "gelu_unscaled_tied": dict(encoder_layers=2, decoder_layers=1),
    "relu_scaled_untied": dict(activation_function="relu", scale_embedding=True,
                               encoder_layers=1, decoder_layers=2, tie_word_embeddings=False,
                               decoder_attention_heads=2, decoder_ffn_dim=48),
}
POSITIONS = ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, torch model) for every config, built once per module."""
  out = {}
  for seed, (name, overrides) in enumerate(CONFIGS.items()):
    directory = tmp_path_factory.mktemp(name)
    out[name] = (str(directory), H.make_bart(directory, seed, **overrides))
  return out


def _logits(model, params, batch):
  source, source_mask, target, target_mask = map(jnp.asarray, batch)
  # Jitted: one compile, not one per operation (the sharded loads would compile each op anew).
  return np.asarray(jax.jit(model.apply)({"params": params}, source, target,
                                         source_mask_BS=source_mask, target_mask_BT=target_mask))


def _max_diff_on_real(ours, ref, target_mask) -> float:
  return float(np.abs(ours - ref)[target_mask.astype(bool)].max())


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(saved, name):
  directory, ref_model = saved[name]
  model, params = hf.load(directory)
  hf_config = ref_model.config
  assert type(model) is EncoderDecoder
  assert (model.cfg.pos_emb, model.cfg.embed_norm) == ("learned", True)
  assert (model.cfg.n_layers, model.cfg.n_decoder_layers) == (hf_config.encoder_layers,
                                                              hf_config.decoder_layers)
  assert model.cfg.embed_scale == hf_config.scale_embedding
  assert ("lm_head" in params) != hf_config.tie_word_embeddings
  assert params["decoder"]["pos_embed"]["embedding"].shape == (H.MAX_LEN, 32)
  assert np.abs(np.asarray(params["final_logits_bias"])).max() > 0.1  # random, so it is tested
  batch = H.seq2seq_batch(seed=1)
  ref = H.torch_seq2seq_logits(ref_model, *batch)
  assert np.abs(ref).max() > 0.5  # the comparison means something
  diff = _max_diff_on_real(_logits(model, params, batch), ref, batch[3])
  print(f"{name}: max |llmjax - transformers| = {diff:.2e}")
  assert diff <= TOL


# --- round trips ---------------------------------------------------------------------------------


MODEL_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                "decoder_ffn_dim", "max_position_embeddings", "activation_function",
                "scale_embedding", "tie_word_embeddings", "dropout", "attention_dropout",
                "activation_dropout", "model_type", "architectures")


def _assert_same_but_unread_positions(a: dict, b: dict):
  """Equal tensors, except position rows 0-1 (never read); `b`'s are the zeros save writes."""
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    if key in POSITIONS:
      assert np.abs(a[key][:2]).max() > 0  # the source's rows differ, so the skip is needed
      np.testing.assert_array_equal(b[key][:2], 0, err_msg=key)
      np.testing.assert_array_equal(a[key][2:], b[key][2:], err_msg=key)
    else:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_to_llmjax_to_hf_is_exact_but_the_unread_position_rows(saved, name, tmp_path):
  directory, ref_model = saved[name]
  model, params = hf.load(directory)
  hf.save(model, params, str(tmp_path))
  _assert_same_but_unread_positions(load_file(os.path.join(directory, "model.safetensors")),
                                    load_file(str(tmp_path / "model.safetensors")))
  with open(os.path.join(directory, "config.json")) as f, open(tmp_path / "config.json") as g:
    source, written = json.load(f), json.load(g)
  assert {k: written[k] for k in MODEL_FIELDS} == {k: source[k] for k in MODEL_FIELDS}
  again, info = transformers.BartForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _assert_same_but_unread_positions({k: v.numpy() for k, v in ref_model.state_dict().items()},
                                    {k: v.numpy() for k, v in again.state_dict().items()})
  batch = H.seq2seq_batch(seed=2)  # rows 0-1 are never read: the logits are the same bits
  np.testing.assert_array_equal(H.torch_seq2seq_logits(again.eval(), *batch),
                                H.torch_seq2seq_logits(ref_model, *batch))


def _bart_model(kind: str) -> EncoderDecoder:
  base = dict(vocab_size=H.VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=H.MAX_LEN)
  if kind == "preset":
    return EncoderDecoder(ModelConfig(**{**presets.get("bart"), **base}))
  # untied, scaled, 2 encoder / 3 decoder layers (with their own heads and MLP width),
  # tanh-GELU, stacked layers
  return EncoderDecoder(ModelConfig(**{**presets.get("bart"), **base, "n_decoder_layers": 3,
                                       "n_decoder_heads": 2, "d_ff_decoder": 48,
                                       "tie_embeddings": False, "embed_scale": True,
                                       "mlp": "gelu_tanh", "scan_layers": True}))


@pytest.mark.parametrize("kind", ["preset", "untied_scanned"])
def test_llmjax_to_hf_to_llmjax_is_exact_and_transformers_agrees(kind, tmp_path):
  model = _bart_model(kind)
  rng = np.random.default_rng(0)  # random values of the right shapes; no init to compile
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, size=a.shape), a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  hf.save(model, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == ["BartForConditionalGeneration"]
  again_model, again = hf.load(str(tmp_path), scan_layers=model.cfg.scan_layers)
  assert again_model.cfg == dataclasses.replace(
      model.cfg, n_decoder_layers=model.cfg.n_decoder_layers or model.cfg.n_layers)
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ref_model, info = transformers.BartForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  batch = H.seq2seq_batch(seed=3)
  ref = H.torch_seq2seq_logits(ref_model.eval(), *batch)
  assert np.abs(ref).max() > 0.5
  assert _max_diff_on_real(_logits(model, params, batch), ref, batch[3]) <= TOL


# --- which architecture hf.save picks --------------------------------------------------------


def _encoder_decoder(preset: str, **overrides) -> EncoderDecoder:
  return EncoderDecoder(ModelConfig(**{**presets.get(preset), "vocab_size": H.VOCAB,
                                       "d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64,
                                       "max_len": H.MAX_LEN, **overrides}))


@pytest.mark.parametrize("preset,overrides,expected", [
    ("bart", {}, "bart"),
    ("marian", {}, "marian"),
    # only the positions and the embedding norm decide between the two
    ("marian", dict(pos_emb="learned", embed_norm=True), "bart"),
    ("bart", dict(pos_emb="sinusoidal", embed_norm=False), "marian"),
])
def test_save_picks_the_architecture_that_expresses_the_model(preset, overrides, expected,
                                                              tmp_path):
  model = _encoder_decoder(preset, **overrides)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  hf.save(model, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model_type"] == expected


def test_save_says_why_neither_fits(tmp_path):
  model = _encoder_decoder("bart", embed_norm=False)  # learned positions, no embedding norm
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        nn.unbox(hf.abstract_params(model)))
  with pytest.raises(hf.UnsupportedModelError,
                     match=r"as MarianMTModel: needs pos_emb='sinusoidal', model has 'learned'; "
                           r"as BartForConditionalGeneration: needs embed_norm=True, model has "
                           r"False\)$"):
    hf.save(model, params, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


# --- generation against transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def generating(tmp_path_factory):
  """A random BART whose EOS is likely (rows end at different steps), loaded by llmjax too,
  and right-padded sources."""
  path = tmp_path_factory.mktemp("bart_generate")
  theirs = H.make_bart(path, seed=8, eos_bias=3.0)
  rng = np.random.default_rng(0)
  source_BS = rng.integers(3, H.VOCAB, (3, 9))
  mask_BS = np.ones_like(source_BS)
  for row, length in ((1, 6), (2, 3)):
    mask_BS[row, length:], source_BS[row, length:] = 0, H.BART_PAD
  return theirs, hf.load(str(path)), source_BS, mask_BS


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(1, 1.0, False), (4, 1.0, False), (4, 0.6, True)])
def test_greedy_and_beam_search_equal_transformers_generate(generating, num_beams,
                                                            length_penalty, early_stopping):
  import torch
  theirs, (model, params), source_BS, mask_BS = generating
  budget = 12
  with torch.no_grad():
    ref_BN = theirs.generate(input_ids=torch.tensor(source_BS),
                             attention_mask=torch.tensor(mask_BS), num_beams=num_beams,
                             max_new_tokens=budget, length_penalty=length_penalty,
                             early_stopping=early_stopping, do_sample=False).numpy()
  assert (ref_BN[:, 0] == H.BART_EOS).all()  # BART starts the decoder with </s>
  ours_BN = np.asarray(generate.translate(
      model, params, source_BS, source_mask_BS=mask_BS, max_new_tokens=budget,
      num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
      eos_ids=[H.BART_EOS], decoder_start_id=H.BART_EOS, pad_id=H.BART_PAD))
  padded_BN = np.full_like(ours_BN, H.BART_PAD)
  padded_BN[:, :ref_BN.shape[1] - 1] = ref_BN[:, 1:]
  np.testing.assert_array_equal(ours_BN, padded_BN)
  ends = {int(np.argmax(row == H.BART_EOS)) if (row == H.BART_EOS).any() else None
          for row in ours_BN}
  assert len(ends) > 1 and ends != {None}, f"rows should end at different steps: {ends}"


# --- unsupported variants: one clear error each, from hf.load and `llmjax convert` ----------------


def _copy_with(directory, dest, **config):
  os.makedirs(dest)
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dest, "config.json"), "w") as f:
    json.dump({**cfg, **config}, f)
  save_file(load_file(os.path.join(directory, "model.safetensors")),
            os.path.join(dest, "model.safetensors"))
  return str(dest)


BAD = {
    "classification_head": (dict(architectures=["BartForSequenceClassification"]),
                            r"architecture 'BartForSequenceClassification' is not supported; "
                            r"supported for bart: BartForConditionalGeneration$"),
    "pre_norm": (dict(normalize_before=True), r"bart normalize_before=true is not supported"),
    "heads_not_dividing": (dict(decoder_attention_heads=5),
                           r"bart d_model=32 is not a multiple of 5 attention heads"),
}


@pytest.mark.parametrize("case", BAD)
def test_unsupported_variants_fail_clearly(saved, case, tmp_path, capsys):
  overrides, message = BAD[case]
  bad = _copy_with(saved["gelu_unscaled_tied"][0], tmp_path / "bad", **overrides)
  with pytest.raises(hf.UnsupportedModelError, match=message):
    hf.load(bad)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    convert_cli.main(["llmjax convert", f"--from=hf:{bad}", f"--to={tmp_path / 'export'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert re.search(message.rstrip("$"), err), err
  assert not os.path.exists(tmp_path / "export")
