"""ResNet (`ResNetForImageClassification`, `ResNetModel`) <-> models.resnet.ResNet.

torch convolutions are OIHW, flax's HWIO; BatchNorm running statistics are the model's
"batch_stats" collection. The key map reads the model's own block plan, so any depths, widths,
stem width and label count map, basic or bottleneck.
"""

from __future__ import annotations

from llmjax.hf import mapping as m
from llmjax.hf.arch import Architecture, require
from llmjax.models import resnet
from llmjax.models.resnet import ResNet

# What HF's ResNet can compute that models.resnet does not (another activation than ReLU),
# named with the value llmjax supports.
_FIXED = {"hidden_act": "relu"}
_BN_EPS = 1e-5  # torch BatchNorm2d's default, which HF's ResNet never changes


def from_hf(c) -> dict:
  require(c.layer_type in resnet.BLOCKS, f"resnet layer_type {c.layer_type!r} is not supported; "
          f"supported: {', '.join(resnet.BLOCKS)}")
  for field, value in _FIXED.items():
    require(getattr(c, field, value) == value, f"resnet {field}={getattr(c, field)!r} is not "
            f"supported; supported: {value!r}")
  require(len(c.depths) == len(c.hidden_sizes), f"resnet depths {list(c.depths)} and "
          f"hidden_sizes {list(c.hidden_sizes)} must have one entry per stage each")
  return dict(arch="resnet", resnet_block=c.layer_type, stem="imagenet",
              resnet_depths=",".join(map(str, c.depths)),
              resnet_widths=",".join(map(str, c.hidden_sizes)), stem_width=c.embedding_size,
              bn_eps=_BN_EPS, resnet_downsample_first=bool(c.downsample_in_first_stage),
              resnet_stride_1x1=bool(c.downsample_in_bottleneck))


def to_hf(cfg) -> dict:
  require(cfg.stem == "imagenet", f"stem={cfg.stem!r} has no Hugging Face ResNet form (HF's "
          "stem is the 7x7/2 conv with a 3x3/2 max-pool: stem='imagenet')")
  return dict(layer_type=cfg.resnet_block, embedding_size=cfg.stem_width,
              depths=list(resnet.ints(cfg.resnet_depths, "resnet_depths")),
              hidden_sizes=list(resnet.ints(cfg.resnet_widths, "resnet_widths")),
              downsample_in_first_stage=cfg.resnet_downsample_first,
              downsample_in_bottleneck=cfg.resnet_stride_1x1, **_FIXED)


def _conv_layer(hf: str, jx_conv: str, jx_bn: str, kernel: int, c_in: int,
                c_out: int) -> list[m.Tensor]:
  """HF's ResNetConvLayer / ResNetShortCut: a bias-free conv and its BatchNorm."""
  return [m.conv2d(f"{hf}.convolution.weight", f"{jx_conv}/kernel", c_out, c_in, kernel, kernel),
          *m.batchnorm(f"{hf}.normalization", jx_bn, c_out)]


def tensors(model: ResNet) -> list[m.Tensor]:
  cfg = model.cfg
  p = "" if model.num_classes == 0 else "resnet."  # ResNetModel's own keys are unprefixed
  kernel = resnet.STEMS[cfg.stem][0]
  out = _conv_layer(f"{p}embedder.embedder", "stem/conv", "stem/bn", kernel, model.in_channels,
                    cfg.stem_width)
  c = cfg.stem_width
  for stage, index, convs, stride in resnet.block_plan(cfg):
    hf, name, c_in = f"{p}encoder.stages.{stage}.layers.{index}", resnet.block_name(stage, index), c
    for k, (size, _, c_out) in enumerate(convs):
      out += _conv_layer(f"{hf}.layer.{k}", f"{name}/conv{k + 1}", f"{name}/bn{k + 1}", size, c,
                         c_out)
      c = c_out
    if c_in != c or stride != 1:
      out += _conv_layer(f"{hf}.shortcut", f"{name}/proj_conv", f"{name}/proj_bn", 1, c_in, c)
  if model.num_classes:
    out += [m.linear("classifier.1.weight", "classifier/kernel", model.num_classes, c),
            m.same("classifier.1.bias", "classifier/bias", (model.num_classes,))]
  return out


def ignored(model: ResNet) -> tuple[str, ...]:
  # A ResNetModel may be read from a classifier's checkpoint, as transformers allows.
  return () if model.num_classes else (r"^classifier\.",)


def _class_of(model) -> str | None:
  if type(model) is not ResNet:
    return None
  return "ResNetForImageClassification" if model.num_classes else "ResNetModel"


def _module_fields(model: ResNet) -> dict:
  fields = {"num_channels": model.in_channels}
  return fields | ({"num_labels": model.num_classes} if model.num_classes else {})


ARCH = Architecture(
    model_type="resnet", config_class="ResNetConfig", prefix="resnet.", preset="resnet50",
    classes={"ResNetForImageClassification":
             lambda cfg, hf: ResNet(cfg, hf.num_labels, in_channels=hf.num_channels),
             "ResNetModel": lambda cfg, hf: ResNet(cfg, 0, in_channels=hf.num_channels)},
    from_hf=from_hf, to_hf=to_hf, class_of=_class_of, tensors=tensors, ignored=ignored,
    module_fields=_module_fields,
    # What a ResNet computes; the Transformer fields of its ModelConfig mean nothing to it, and
    # bn_momentum and zero_init_residual only shape training.
    config_fields=("arch", "resnet_block", "resnet_depths", "resnet_widths", "stem",
                   "stem_width", "bn_eps", "resnet_downsample_first", "resnet_stride_1x1"))
