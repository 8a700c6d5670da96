"""Image models: ResNet and CNN shapes, torch's padding, zero-init residuals, logical names,
BatchNorm on a sharded batch equal to one device, BatchNorm's written-out backward equal to
autodiff, the stem's max-pool, 1x1 convs as products, the ResNet's CPU compile option, the CNN
learning, and the FLOP formula."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llmjax import config as config_lib
from llmjax import flops
from llmjax.config import MeshConfig, ModelConfig
from llmjax.errors import ConfigError
from llmjax.models import resnet
from llmjax.models.cnn import CNN
from llmjax.models.resnet import ResNet
from llmjax.models.vision import image_model
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding
from llmjax.train.compile_options import compiler_options


def model_cfg(preset="resnet18", **overrides) -> ModelConfig:
  """A preset's ModelConfig, shrunk: two stages of one block, 8 and 16 channels."""
  tiny = dict(resnet_depths="1,1", resnet_widths="8,16", stem_width=8) if preset != "cnn" else {}
  return ModelConfig(**config_lib.model_section(preset, **(tiny | overrides)).to_dict())


def images(batch=2, size=33, channels=3, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, channels))


def init(model, x, boxed=False):
  """Variables, jitted (eager init compiles every small op on its own: seconds per model), from
  an "rbg" key, which compiles in a third of threefry's time."""
  key = jax.random.key(1, impl="rbg")
  variables = jax.jit(lambda x: model.init(key, x, deterministic=True))(x)
  return variables if boxed else nn.unbox(variables)


def train_apply(model, variables, x):
  """(outputs, updated batch_stats) of one training-mode forward."""
  return jax.jit(lambda v, x: model.apply(v, x, deterministic=False, mutable=["batch_stats"]))(
      variables, x)


def eval_apply(model, variables, x):
  return jax.jit(lambda v, x: model.apply(v, x, deterministic=True))(variables, x)


@pytest.mark.parametrize("preset,stem", [("resnet18", "imagenet"), ("resnet50", "small")])
def test_shapes(preset, stem):
  cfg = model_cfg(preset, stem=stem)
  x = images()  # odd side: every stride-2 layer rounds up, as torch's
  variables = init(ResNet(cfg, 5), x)
  assert set(variables) == {"params", "batch_stats"}
  logits, updates = train_apply(ResNet(cfg, 5), variables, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  body = {k: v for k, v in variables["params"].items() if k != "classifier"}
  features = eval_apply(ResNet(cfg, 0), variables | {"params": body}, x)
  assert features.shape == (2, 16)
  # The 3x3 conv of a bottleneck carries the stride (v1.5); stem and stage strides as HF's.
  kernels = {p: a.shape for p, a in _flat(variables["params"]).items() if p.endswith("kernel")}
  if preset == "resnet50":
    assert kernels["stage1_block0/conv1/kernel"] == (1, 1, 8, 4)
    assert kernels["stage1_block0/conv2/kernel"] == (3, 3, 4, 4)
  assert kernels["stem/conv/kernel"] == ((7, 7) if stem == "imagenet" else (3, 3)) + (3, 8)
  assert kernels["stage1_block0/proj_conv/kernel"] == (1, 1, 8, 16)


def _flat(tree) -> dict:
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_conv_padding_equals_torch_at_stride_2(kernel):
  import torch
  x = np.asarray(images(1, 9, 3))
  conv = resnet.conv(model_cfg(), 4, kernel, 2, "c")
  params = nn.unbox(conv.init(jax.random.PRNGKey(0), x))
  ours = np.asarray(conv.apply(params, x))
  weight = np.asarray(params["params"]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
  theirs = torch.nn.functional.conv2d(torch.tensor(x.transpose(0, 3, 1, 2)),
                                      torch.tensor(weight), stride=2, padding=kernel // 2)
  assert ours.shape == (1, 5, 5, 4)
  np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=1e-5)


@pytest.mark.parametrize("stride,size", [(1, 8), (2, 9)])
def test_pointwise_conv_equals_flax_conv_with_its_init_and_gradients(stride, size):
  """A 1x1 conv as a matrix product: nn.Conv's kernel (same init), values and gradients."""
  x = images(2, size, 6)
  ours = resnet.conv(model_cfg(), 4, 1, stride, "c")
  theirs = nn.Conv(4, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)), use_bias=False,
                   kernel_init=resnet._CONV_INIT, name="c")
  assert isinstance(ours, resnet.PointwiseConv)
  params = nn.unbox(ours.init(jax.random.PRNGKey(0), x))
  np.testing.assert_array_equal(params["params"]["kernel"],
                                theirs.init(jax.random.PRNGKey(0), x)["params"]["kernel"])
  w = jax.random.normal(jax.random.PRNGKey(1), (2, (size - 1) // stride + 1,
                                                (size - 1) // stride + 1, 4))
  def run(module):
    return jax.value_and_grad(lambda p, x: jnp.sum(module.apply(p, x) * w), (0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), run(ours),
               run(theirs))


def test_stem_max_pool_equals_torch_and_reduce_window_with_its_gradient():
  """The nine-view max-pool: torch's MaxPool2d(3, 2, 1) values (odd and even sides) and the
  gradient of flax's reduce_window max-pool on tie-free input."""
  import torch
  flax_pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  for x in (images(2, 9, 3), jax.random.normal(jax.random.PRNGKey(1), (1, 10, 7, 2))):
    ours = resnet.max_pool_3x3_s2(x)
    theirs = torch.nn.functional.max_pool2d(torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)),
                                            3, 2, 1)
    np.testing.assert_array_equal(ours, theirs.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ours, flax_pool(x))
    w = jax.random.normal(jax.random.PRNGKey(2), ours.shape)
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * w))(x)
             for f in (resnet.max_pool_3x3_s2, flax_pool)]
    np.testing.assert_array_equal(*grads)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_residual_blocks_start_as_their_shortcut(block):
  cfg = model_cfg(resnet_block=block, zero_init_residual=True)
  x = jax.nn.relu(images(2, 8, 8))  # a block's input is a ReLU output
  for width, stride in ((8, 1), (16, 2)):  # identity shortcut; projection
    blk = resnet.Block(cfg, resnet.BLOCKS[block](width, stride))
    projected = (width, stride) != (8, 1)

    @jax.jit
    def outputs(v, x):
      """(block output, relu(shortcut)) in training and in inference mode."""
      pairs = []
      for deterministic in (False, True):
        out = blk.apply(v, x, deterministic=deterministic, mutable=["batch_stats"])[0]
        shortcut = x
        if projected:  # the block's own projection, run alone
          p, stats = v["params"], v["batch_stats"]
          shortcut = resnet.conv(cfg, width, 1, stride, "c").apply({"params": p["proj_conv"]}, x)
          shortcut = resnet.batch_norm(cfg, "bn").apply(
              {"params": p["proj_bn"], "batch_stats": stats["proj_bn"]}, shortcut,
              deterministic=deterministic, mutable=["batch_stats"])[0]
        pairs.append((out, jax.nn.relu(shortcut)))
      return pairs

    variables = init(blk, x)
    for out, want in outputs(variables, x):
      np.testing.assert_allclose(out, want, atol=1e-6)
    scales = {name: bn["scale"] for name, bn in variables["params"].items() if "bn" in name}
    last = f"bn{len(blk.convs)}"
    assert not np.any(scales.pop(last)) and all(np.all(s == 1) for s in scales.values())


@pytest.mark.parametrize("model", [ResNet(model_cfg("resnet50"), 4),
                                   CNN(model_cfg("cnn", cnn_widths="4,8", cnn_hidden=16), 4)],
                         ids=["resnet", "cnn"])
def test_every_variable_has_logical_names(model):
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), model.example_input(),
                                            deterministic=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                        for x in leaves)
  known = {a for rules in sharding.RULES.values() for a, _ in rules} | {"norm"}
  assert {n for x in leaves for n in x.names} <= known  # every name is in the presets


_BN_MODEL = ResNet(model_cfg("resnet50", resnet_widths="12,20", stem_width=12), 3)


def _bn_step(variables, x, labels):
  logits, updates = _BN_MODEL.apply(variables, x, deterministic=False, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
  return loss, updates["batch_stats"]


@pytest.fixture(scope="module")
def one_device_bn():
  """(boxed variables, images, labels, loss, updated statistics) on one device."""
  x, labels = images(16, 17), jnp.arange(16) % 3
  boxed = init(_BN_MODEL, x, boxed=True)
  return (boxed, x, labels) + tuple(jax.jit(_bn_step)(nn.unbox(boxed), x, labels))


@pytest.mark.parametrize("rules,mesh", [("dp", dict(data=8)), ("fsdp", dict(data=2, fsdp=4))])
def test_batchnorm_on_a_sharded_batch_equals_one_device(rules, mesh, one_device_bn):
  """No axis_name: under jit the batch mean is over the global batch however it is split.
  Widths 12 and 20 do not divide 8 or 4: image parameters are replicated, so any width runs."""
  boxed, x, labels, want_loss, want_stats = one_device_bn
  variables = nn.unbox(boxed)

  device_mesh = meshlib.make_mesh(MeshConfig(**mesh), jax.devices()[:8])
  rule_set = sharding.rules_for(rules)
  placed = sharding.logical_shardings(boxed, device_mesh, rule_set)
  batch = sharding.batch_sharding(device_mesh)
  with nn.logical_axis_rules(rule_set), jax.set_mesh(device_mesh):
    sharded = jax.jit(_bn_step, in_shardings=(placed, batch, batch))
    loss, stats = sharded(jax.device_put(variables, placed), jax.device_put(x, batch),
                          jax.device_put(labels, batch))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               want_stats)
  # The statistics did move, and by the global batch: not one device's share of it.
  assert not np.allclose(want_stats["stem"]["bn"]["mean"], 0)


def reference_normalize(x_NC, scale_C, bias_C, epsilon):
  """BatchNorm's training normalisation written plainly: autodiff takes its gradient."""
  mean_1C = jnp.mean(x_NC, 0, keepdims=True)
  var_1C = jnp.mean(jnp.square(x_NC - mean_1C), 0, keepdims=True)
  y_NC = (x_NC - mean_1C) * (jax.lax.rsqrt(var_1C + epsilon) * scale_C[None]) + bias_C[None]
  return y_NC, mean_1C[0], var_1C[0]


def _sgd_losses(variables, x, labels, steps=3, lr=0.01):
  """Losses and final variables of `steps` plain SGD steps of _BN_MODEL (statistics updating)."""
  @jax.jit
  def step(variables):
    grad_fn = jax.value_and_grad(lambda p: _bn_step({**variables, "params": p}, x, labels),
                                 has_aux=True)
    (loss, stats), grads = grad_fn(variables["params"])
    params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    return {"params": params, "batch_stats": stats}, loss
  losses = []
  for _ in range(steps):
    variables, loss = step(variables)
    losses.append(loss)
  return np.array(losses), variables


def test_batchnorm_backward_equals_autodiff_and_trains_alike(one_device_bn, monkeypatch):
  """resnet.normalize_batch's hand-written backward (its reductions taken together) against
  autodiff of the plain formula: the vector-Jacobian product with every output used, then three
  SGD steps of a tiny ResNet, equal within float32 rounding."""
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  x_NC = jax.random.normal(k[0], (40, 6)) * 3 + 1
  scale_C, bias_C = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1, 1, 6)
  cotangents = (jax.random.normal(k[1], (40, 6)), jax.random.normal(k[2], (6,)),
                jax.random.normal(k[3], (6,)))
  for fn in (resnet.normalize_batch, reference_normalize):
    out, vjp = jax.vjp(lambda *a, fn=fn: fn(*a, 1e-5), x_NC, scale_C, bias_C)
    if fn is resnet.normalize_batch:
      got = out, vjp(cotangents)
  want = out, vjp(cotangents)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)

  boxed, x, labels = one_device_bn[:3]
  variables = nn.unbox(boxed)
  losses, trained = _sgd_losses(variables, x, labels)
  monkeypatch.setattr(resnet, "normalize_batch", reference_normalize)
  want_losses, want_trained = _sgd_losses(variables, x, labels)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert losses[-1] < losses[0]  # it trained: the comparison is over moving parameters
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), trained,
               want_trained)


def test_the_resnet_declares_its_cpu_compile_option_and_other_models_keep_the_default(
    one_device_bn):
  """A ResNet step compiles with YNNPACK's reductions on CPU, and its loss and gradients equal
  the backend default's within float32 rounding; a model that declares nothing (a Transformer,
  the main job) keeps the backend's option."""
  one = meshlib.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  key = "xla_cpu_experimental_ynn_fusion_type"
  resnet_options = compiler_options(one, _BN_MODEL)
  assert resnet_options[key] == "LIBRARY_FUSION_TYPE_REDUCE"
  assert compiler_options(one, CNN(model_cfg("cnn"), 3)) == compiler_options(one) == {key: ""}

  boxed, x, labels = one_device_bn[:3]
  variables = nn.unbox(boxed)
  def loss_and_grads(params):
    return jax.value_and_grad(lambda p: _bn_step({**variables, "params": p}, x, labels)[0])(
        params)
  got, want = (jax.jit(loss_and_grads, compiler_options=options)(variables["params"])
               for options in (resnet_options, compiler_options(one)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()))


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  cfg = model_cfg("resnet50", dtype="bfloat16")
  model = ResNet(cfg, 3)
  variables = init(model, images())
  logits, updates = train_apply(model, variables, images())
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_image_model_by_arch_and_bad_input():
  assert type(image_model(model_cfg(), 3)) is ResNet
  cnn = image_model(model_cfg("cnn"), 3, in_channels=1, image_size=28)
  assert (type(cnn), cnn.in_channels, cnn.image_size) == (CNN, 1, 28)
  with pytest.raises(ConfigError, match="config.model.arch='transformer'"):
    image_model(ModelConfig(), 3)
  with pytest.raises(ConfigError, match=r"\[batch, height, width, 3\]"):
    init(ResNet(model_cfg(), 3), images(channels=1))
  with pytest.raises(ConfigError, match="resnet_depths"):
    init(ResNet(model_cfg(resnet_depths="1,1,1"), 3), images())


def test_cnn_learns_a_tiny_set():
  cfg = model_cfg("cnn", cnn_widths="8,16", cnn_hidden=32)
  model = CNN(cfg, 4, in_channels=1, image_size=16)
  x, labels = images(16, 16, 1, seed=3), jnp.arange(16) % 4
  params = init(model, x)["params"]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, deterministic=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(40):
    params, opt_state = step(params, opt_state)
  predicted = model.apply({"params": params}, x, deterministic=True).argmax(-1)
  assert np.mean(predicted == labels) == 1.0


def test_flops_hand_count_resnet():
  """Small stem, one basic stage of one block, 8 px, 3 channels, 5 classes (multiply-adds):
  stem 3x3 3->4 at 8x8: 8*8*9*3*4 = 6912; conv1 3x3 4->8: 8*8*9*4*8 = 18432;
  conv2 3x3 8->8: 8*8*9*8*8 = 36864; 1x1 projection 4->8: 8*8*4*8 = 2048; classifier 8*5 = 40."""
  cfg = model_cfg(stem="small", stem_width=4, resnet_depths="1", resnet_widths="8")
  assert flops.image_forward_flops(cfg, 8, 3, 5) == 2 * (6912 + 18432 + 36864 + 2048 + 40)
  assert flops.image_train_flops_per_step(cfg, 4, 8, 3, 5) == 3 * 4 * 2 * 64296
  # Imagenet stem on 17 px: 7x7/2 -> 9x9, max-pool 3x3/2 -> 5x5; a bottleneck stage of width 8
  # (1x1 8->2, 3x3 2->2, 1x1 2->8, no projection) then one of width 16 at stride 2 (5 -> 3).
  cfg = model_cfg("resnet50", stem_width=8)
  stem = 9 * 9 * 49 * 3 * 8
  stage0 = 5 * 5 * (8 * 2 + 9 * 2 * 2 + 2 * 8)
  stage1 = 5 * 5 * 8 * 4 + 3 * 3 * (9 * 4 * 4 + 4 * 16) + 3 * 3 * 8 * 16
  assert flops.image_forward_flops(cfg, 17, 3, 0) == 2 * (stem + stage0 + stage1)


def test_flops_cnn_hand_count_and_published_resnets():
  cfg = model_cfg("cnn", cnn_widths="4,8", cnn_hidden=16)
  # 28 -> conv 28x28 1->4, pool 14 -> conv 14x14 4->8, pool 7 -> dense 7*7*8 -> 16 -> 10.
  macs = 28 * 28 * 9 * 1 * 4 + 14 * 14 * 9 * 4 * 8 + 7 * 7 * 8 * 16 + 16 * 10
  assert flops.image_forward_flops(cfg, 28, 1, 10) == 2 * macs
  # Multiply-adds at 224 px, 1000 classes, as the ResNet papers and torchvision quote them.
  for preset, gmacs in (("resnet18", 1.81), ("resnet50", 4.09), ("resnet152", 11.5)):
    full = ModelConfig(**config_lib.model_section(preset).to_dict())
    assert flops.image_forward_flops(full, 224, 3, 1000) / 2e9 == pytest.approx(gmacs, rel=0.01)
