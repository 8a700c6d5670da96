"""Quantized image models (llmjax/models/quant_conv.py; docs/compression.md): a CNN's and a
ResNet's convolutions and dense kernels stored quantized through `llmjax quantize`'s export path
compute the float model's logits on numpy-dequantized kernels; int8 per channel of a trained
tiny CNN keeps its loss; bad input is refused naming the convolution."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from llmjax import checkpoint, treepaths
from llmjax import config as config_lib
from llmjax.config import ModelConfig
from llmjax.hf import api, convert
from llmjax.models import quant as quantlib
from llmjax.models import quant_tree
from llmjax.models.cnn import CNN
from llmjax.models.resnet import ResNet
from llmjax.weights import quantize as quantize_export


def model_cfg(preset: str, **overrides) -> ModelConfig:
  return ModelConfig(**config_lib.model_section(preset, **overrides).to_dict())


def tiny_cnn(in_channels=4, **overrides) -> CNN:
  """Two 3x3 convs (contractions 3x3x4 = 36 and 3x3x4 = 36), dense 32 -> 16 -> 4, 8x8 images."""
  cfg = model_cfg("cnn", **{"cnn_widths": "4,8", "cnn_hidden": 16, **overrides})
  return CNN(cfg, 4, in_channels=in_channels, image_size=8)


def tiny_resnet(**overrides) -> ResNet:
  cfg = model_cfg("resnet18", resnet_depths="1,1", resnet_widths="8,16", stem_width=8,
                  stem="small", **overrides)
  return ResNet(cfg, 4, in_channels=3, image_size=8)


def np_dequantized(stored: dict, spec, pack_axis: int) -> np.ndarray:
  """The stored kernel read back with numpy alone: nibbles unpacked along `pack_axis`, sign,
  zero point, the scale repeated over its tile, nf4's table."""
  q = np.moveaxis(np.asarray(stored["kernel"]), pack_axis, 0)
  if spec.bits == 4:
    lo, hi = (q & 15).astype(np.int32), (q >> 4).astype(np.int32)
    q = np.stack([lo, hi], axis=1).reshape((q.shape[0] * 2,) + q.shape[1:])
    if spec.kind != "nf4":
      q = np.where(q >= 8, q - 16, q)
  q = np.moveaxis(q, 0, pack_axis).astype(np.int32)

  def tiled(s):
    for axis, (a, b) in enumerate(zip(q.shape, s.shape)):
      s = np.repeat(s, a // b, axis=axis)
    return s
  if "kernel_zero" in stored:
    q = q - tiled(np.asarray(stored["kernel_zero"]).astype(np.int32))
  base = quantlib.NF4[q] if spec.kind == "nf4" else q.astype(np.float32)
  return base * tiled(np.asarray(stored["kernel_scale"]))


def write_float_export(model, variables, path) -> None:
  """An llmjax export of `model` as `llmjax export` writes one: params, model.json, statistics."""
  extra = {convert.MODEL_FILE: json.dumps(convert.describe(model))}
  checkpoint.export_params(jax.device_get(variables["params"]), dataclasses.asdict(model.cfg),
                           str(path), extra)
  convert.write_model_state({k: v for k, v in variables.items() if k != "params"}, str(path))


def test_quantized_image_models_through_an_export_equal_a_numpy_reference(tmp_path):
  """CNN (int4 in groups of 4 over the flattened 3x3xin contraction, asymmetric) and ResNet
  (int8 per output channel; its BatchNorm statistics carried over): the quantized export's model
  computes the float model's logits on numpy-dequantized kernels; every conv and dense kernel is
  stored quantized (4 bits packed along the output channels), BatchNorm and biases stay float."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  for model, x, text, n_kernels in ((tiny_cnn(), x, "int4:g4:asym", 4),
                                    (tiny_resnet(), x[..., :3], "int8", 7)):
    variables = nn.unbox(jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                                      deterministic=False))(x))
    if "batch_stats" in variables:  # statistics that are not the init's 0 / 1
      _, updates = jax.jit(lambda v, x: model.apply(v, x, deterministic=False,
                                                    mutable=["batch_stats"]))(variables, x)
      variables = {**variables, **updates}
    write_float_export(model, variables, tmp_path / text)
    report = quantize_export.quantize_export(str(tmp_path / text), str(tmp_path / f"q_{text}"),
                                             text)
    assert len(report["relative_error"]) == n_kernels, report["relative_error"]
    loaded = convert.load_export(str(tmp_path / f"q_{text}"))
    assert loaded.model.cfg.quant == text and type(loaded.model) is type(model)
    found = quant_tree.layouts(lambda: api.abstract_variables(loaded.model))
    spec, flat = quantlib.parse(text), dict(treepaths.items(loaded.params))
    ref = dict(treepaths.items(variables["params"]))
    for path, layout in found.items():
      stored = {k: flat[f"{path}/{k}"] for k in quant_tree.PARTS if f"{path}/{k}" in flat}
      float_shape = ref[f"{path}/kernel"].shape
      assert stored["kernel"].dtype == (np.int8 if spec.bits == 8 else np.uint8), path
      if spec.bits == 4 and len(float_shape) == 4:  # a conv: packed along its outputs
        assert stored["kernel"].shape == float_shape[:3] + (float_shape[3] // 2,), path
      ref[f"{path}/kernel"] = np_dequantized(stored, spec, layout.pack_axis)
    assert {p for p in flat if "conv" in p and p.endswith("/kernel_scale")}, flat.keys()
    assert all(flat[p].dtype == np.float32 for p in flat if p.endswith(("/bias", "/scale")))
    got = jax.jit(lambda v, x: loaded.model.apply(v, x, deterministic=True))(
        {"params": loaded.params, **loaded.model_state}, x)
    want = jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(
        {**variables, "params": treepaths.nest(ref)}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_int8_per_channel_of_a_trained_tiny_cnn_keeps_its_loss_within_1pct():
  """A tiny CNN trained to fit 16 images: int8 per output channel (convolutions included)
  changes its loss by under 1%; int4 per channel (g0) stays a working classifier."""
  model = tiny_cnn(in_channels=1)
  x = jax.random.normal(jax.random.PRNGKey(3), (16, 8, 8, 1))
  labels = jnp.arange(16) % 4
  params = nn.unbox(jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                                 deterministic=True))(x))["params"]
  tx = optax.adam(1e-2)

  def loss(model, params):
    logits = model.apply({"params": params}, x, deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def steps(params):
    def one(carry, _):
      params, opt_state = carry
      updates, opt_state = tx.update(jax.grad(lambda p: loss(model, p))(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(one, (params, tx.init(params)), None, length=18)[0][0]

  params = steps(params)
  before = float(jax.jit(lambda p: loss(model, p))(params))
  assert before < 0.5, before  # it learned the set (chance: log 4 = 1.39)
  for text, tolerance in (("int8", 0.01), ("int4:g0", 0.25)):
    qmodel = model.clone(cfg=dataclasses.replace(model.cfg, quant=text))
    found = quant_tree.layouts(lambda: api.abstract_variables(qmodel))
    assert {"conv0", "conv1", "hidden", "classifier"} == set(found)
    after = float(jax.jit(lambda p: loss(qmodel, p))(quant_tree.quantize_tree(params, found)))
    assert abs(after - before) <= tolerance * before, (text, before, after)


def test_bad_conv_quantization_is_one_line_exit_2_and_writes_nothing(tmp_path):
  """A group size that does not divide a convolution's 3x3xin contraction names the layer and
  both sizes; an odd output-channel count cannot pack 4-bit values; --group_size < 0."""
  from _cli import run
  model = tiny_cnn(in_channels=1, cnn_widths="3,8")
  variables = nn.unbox(jax.jit(lambda x: model.init(jax.random.PRNGKey(1), x,
                                                    deterministic=True))(jnp.zeros((1, 8, 8, 1))))
  write_float_export(model, variables, tmp_path / "f")
  bad = [(["--bits=8", "--group_size=4"],
          "conv0: group size 4 does not divide the input dimension 3x3x1 = 9"),
         (["--bits=4", "--group_size=0"], "conv0: 4-bit values pack two per byte along the "
          "kernel's axis 3, which must be even (kernel [3, 3, 1, 3])"),
         (["--bits=4", "--group_size=-1"], "--group_size=-1: must be positive, or 0")]
  for flags, message in bad:
    result = run("quantize", f"--checkpoint={tmp_path / 'f'}", *flags, f"--out={tmp_path / 'q'}")
    assert result.returncode == 2 and message in result.stderr, (flags, result.stderr)
    assert result.stderr.count("\n") == 1 and not (tmp_path / "q").exists()
