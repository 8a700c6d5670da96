"""Hugging Face ResNet <-> llmjax: logits and pooled features equal transformers', exact round
trips of every tensor (BatchNorm statistics included), torch's training-mode statistics update,
convert through an llmjax export, and clear errors for what llmjax does not express."""

import json
import os

import jax
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

from llmjax import hf
from llmjax.config import MeshConfig
from llmjax.hf import convert
from llmjax.models.resnet import ResNet
from llmjax.parallel import mesh as meshlib

# name -> (HF class, ResNetConfig fields): unusual depths and widths, both blocks; the
# classifying bottleneck is ResNet v1 (stride on the first 1x1) and downsamples in every stage.
CASES = {
    "basic": ("ResNetForImageClassification",
              dict(layer_type="basic", depths=[1, 2], hidden_sizes=[8, 16], num_labels=3)),
    "bottleneck": ("ResNetForImageClassification",
                   dict(layer_type="bottleneck", depths=[2, 1, 1], hidden_sizes=[16, 24, 32],
                        num_labels=5, downsample_in_first_stage=True,
                        downsample_in_bottleneck=True)),
    "base": ("ResNetModel", dict(layer_type="bottleneck", depths=[1, 1], hidden_sizes=[8, 16])),
}
SIZE = 32


def make(name: str, directory):
  """The named random HF ResNet saved to `directory`, BatchNorm weights and running statistics
  randomised (fresh ones are 1, 0, 0, 1 and would hide a mix-up); -> the torch model (eval)."""
  import torch
  import transformers as T
  cls, fields = CASES[name]
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(T, cls)(T.ResNetConfig(embedding_size=8, **fields)).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2), module.running_var.uniform_(0.5, 1.5)
  model.save_pretrained(str(directory))
  return model


def pixels(batch=2, seed=0):
  """Images [B, H, W, 3] for llmjax; transpose(0, 3, 1, 2) for torch."""
  return np.random.default_rng(seed).normal(size=(batch, SIZE, SIZE, 3)).astype(np.float32)


def torch_forward(model, images, train=False):
  import torch
  model.train(train)
  with torch.no_grad():
    out = model(torch.tensor(images.transpose(0, 3, 1, 2)))
  model.eval()
  return out


def state_dict(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
  """(case, HF directory, torch model, llmjax model, params, model_state)."""
  directory = tmp_path_factory.mktemp(request.param)
  torch_model = make(request.param, directory)
  model, params, model_state = hf.load(str(directory), with_model_state=True)
  return request.param, directory, torch_model, model, params, model_state


def forward(model, variables, images, train=False):
  return jax.jit(lambda v, x: model.apply(v, x, deterministic=not train,
                                          mutable=["batch_stats"] if train else False))(
      variables, images)


def test_outputs_equal_transformers(saved):
  name, _, torch_model, model, params, model_state = saved
  assert isinstance(model, ResNet) and set(model_state) == {"batch_stats"}
  x = pixels()
  ours = np.asarray(forward(model, {"params": params, **model_state}, x))
  out = torch_forward(torch_model, x)
  theirs = (out.logits if name != "base" else out.pooler_output[:, :, 0, 0]).numpy()
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_training_mode_statistics_follow_torch(saved, tmp_path):
  """One training-mode forward updates the running statistics as torch's BatchNorm2d does
  (momentum 0.1 = flax's 0.9; the unbiased batch variance into running_var). At 32 px the last
  stage is 1x1 or 2x2: a batch of 2 has 2 or 8 values per channel, where n/(n-1) is large."""
  name, _, torch_model, model, params, model_state = saved
  import copy
  reference = copy.deepcopy(torch_model)
  x = pixels(4, seed=1)
  out = torch_forward(reference, x, train=True)
  ours, updated = forward(model, {"params": params, **model_state}, x, train=True)
  theirs = (out.logits if name != "base" else out.pooler_output[:, :, 0, 0]).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  hf.save(model, params, str(tmp_path), model_state=dict(updated))
  written, want = load_file(str(tmp_path / "model.safetensors")), state_dict(reference)
  stats = [k for k in want if k.endswith(("running_mean", "running_var"))]
  assert stats
  for key in stats:
    np.testing.assert_allclose(written[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_hf_to_llmjax_to_hf_is_exact(saved, tmp_path):
  _, directory, torch_model, model, params, model_state = saved
  hf.save(model, params, str(tmp_path), model_state=model_state)
  original, written = load_file(str(directory / "model.safetensors")), \
      load_file(str(tmp_path / "model.safetensors"))
  assert set(written) == set(original)
  for key, value in original.items():  # num_batches_tracked: 0 in both (llmjax writes 0)
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  config = json.loads((tmp_path / "config.json").read_text())
  cls, fields = CASES[saved[0]]
  assert config["architectures"] == [cls] and config["depths"] == fields["depths"]
  assert config["hidden_sizes"] == fields["hidden_sizes"] and config["embedding_size"] == 8
  if "num_labels" in fields:
    assert len(config["id2label"]) == fields["num_labels"]


def test_llmjax_to_hf_to_llmjax_is_exact(saved, tmp_path):
  """Every variable random (variances positive), so no two tensors could be mixed up unseen."""
  _, _, _, model, _, _ = saved
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: np.abs(rng.normal(size=a.shape)).astype(a.dtype),
                           nn.unbox(hf.abstract_variables(model)))
  params = variables.pop("params")
  hf.save(model, params, str(tmp_path), model_state=variables)
  back, got_params, got_state = hf.load(str(tmp_path), with_model_state=True)
  assert back == model
  for want, got in ((params, got_params), (variables, got_state)):
    assert jax.tree.structure(want) == jax.tree.structure(got)
    jax.tree.map(np.testing.assert_array_equal, want, got)


def test_load_into_given_trees_and_onto_a_mesh(saved):
  """What init_from=hf: uses (load_params, load_model_state), and loading straight to shards."""
  _, directory, _, model, params, model_state = saved
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          {"params": params, **model_state})
  got = {"params": hf.load_params(str(directory), abstract.pop("params")),
         **hf.load_model_state(str(directory), abstract)}
  mesh = meshlib.make_mesh(MeshConfig(data=2, fsdp=4), jax.devices()[:8])
  _, sharded, sharded_state = hf.load(str(directory), mesh=mesh, rules="fsdp",
                                      with_model_state=True)
  for tree in (got, {"params": sharded, **sharded_state}):
    jax.tree.map(np.testing.assert_array_equal, tree, {"params": params, **model_state})
  assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(sharded_state))
  with pytest.raises(hf.WeightsMismatchError, match="batch_stats"):
    hf.load_model_state(str(directory), {})


def test_convert_through_an_export_keeps_the_statistics(tmp_path):
  make("basic", tmp_path / "hf")
  convert.hf_to_export(str(tmp_path / "hf"), str(tmp_path / "export"))
  assert os.path.isdir(tmp_path / "export" / convert.MODEL_STATE_DIR)
  loaded = convert.load_export(str(tmp_path / "export"))
  assert set(loaded.model_state) == {"batch_stats"}
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "back"))
  original, back = load_file(str(tmp_path / "hf" / "model.safetensors")), \
      load_file(str(tmp_path / "back" / "model.safetensors"))
  assert set(original) == set(back)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def _edit_config(directory, **fields):
  path = directory / "config.json"
  path.write_text(json.dumps(json.loads(path.read_text()) | fields))


@pytest.mark.parametrize("field,value", [("layer_type", "preactivation"),
                                         ("hidden_act", "gelu")])
def test_unsupported_settings_are_named(tmp_path, field, value):
  make("base", tmp_path)
  _edit_config(tmp_path, **{field: value})
  with pytest.raises(hf.UnsupportedModelError, match=field):
    hf.load(str(tmp_path), with_model_state=True)


def test_state_must_be_asked_for_and_given(saved, tmp_path):
  _, directory, _, model, params, model_state = saved
  with pytest.raises(hf.HFError, match="with_model_state=True"):
    hf.load(str(directory))
  with pytest.raises(hf.HFError, match="batch_stats"):
    hf.save(model, params, str(tmp_path / "a"))
  stats = jax.tree.map(lambda x: x[:1], model_state)
  # Every statistic mismatches: the error names the first few with both shapes, then counts the rest.
  with pytest.raises(hf.WeightsMismatchError,
                     match=r"stage0_block0/bn1/mean: expected \[\d+\].* has \[1\].*\(and \d+ more\)"):
    hf.save(model, params, str(tmp_path / "b"), model_state=stats)
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_small_stem_has_no_hf_form(saved, tmp_path):
  import dataclasses
  _, _, _, model, params, model_state = saved
  small = model.clone(cfg=dataclasses.replace(model.cfg, stem="small"))
  with pytest.raises(hf.UnsupportedModelError, match="stem='small'"):
    hf.save(small, params, str(tmp_path), model_state=model_state)
