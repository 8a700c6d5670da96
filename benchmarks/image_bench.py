"""The image-model family of train_throughput.py: a ResNet or the small CNN on random images.

  python benchmarks/train_throughput.py --model=resnet50 --image_size=128 --batch_size=8 \
      --compare=hf-torch

llmjax's train step runs `ImageClassify` built with synthetic info (ImageNet's channel mean and
std, --num_classes labels) instead of reading data, so nothing here imports llmjax.data, grain or
tensorflow-datasets. Optimiser for both systems: SGD with Nesterov momentum 0.9, constant lr
(default 0.1 x batch / 256, the linear scaling rule), weight decay 1e-4 on convolution and dense
kernels only (llmjax's NO_DECAY mask: not on BatchNorm scale/bias or biases), no clipping.
`--compare=hf-torch` trains transformers' ResNetForImageClassification of the same depths,
widths and block type (its stem is the ImageNet one, as every ResNet preset's is), in train mode
(BatchNorm statistics updating), float32, on the same uint8 batch normalised inside the step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import bench_common as common
import torch_peers
from llmjax import config as configlib
from llmjax import flops
from llmjax.models import presets
from llmjax.tasks.image_classify import ImageClassify

ARCHS = ("resnet", "cnn")
MODELS = tuple(name for name, fields in presets.PRESETS.items() if fields.get("arch") in ARCHS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = dict(image_size=32, batch=2, num_classes=10)
FLOP_FORMULA = (
    "train FLOPs/step = 3 x forward x batch; forward per image = sum over convolutions (stem, "
    "every block conv, 1x1 projection shortcuts) of 2*H_out*W_out*k*k*C_in*C_out + sum over dense "
    "layers of 2*in*out (classifier). BatchNorm, ReLU, pooling, residual adds, biases and "
    "optimizer work not counted (llmjax.flops.image_train_flops_per_step; ResNet-50 at 224 px: "
    "8.2 GFLOPs forward per image).")


def add_flags(parser) -> None:
  parser.add_argument("--image_size", type=int, default=128, help="image models: square side")
  parser.add_argument("--num_classes", type=int, default=1000, help="image models: labels")
  parser.add_argument("--lr", type=float, default=0.0,
                      help="image models: SGD lr for both systems (0: 0.1 x batch / 256)")
  parser.add_argument("--weight_decay", type=float, default=1e-4,
                      help="image models: on conv and dense kernels only, both systems")
  parser.add_argument("--torch_channels_last", action="store_true",
                      help="image models, --compare=hf-torch: torch model and batch in "
                           "channels_last memory format (default: torch's NCHW)")


def _tiny_model(name: str) -> dict:
  """The preset's block type and stem, two stages of one block (the second downsamples, with a
  projection shortcut) and a few channels: compiles in seconds."""
  return dict(resnet_depths="1,1", resnet_widths="8,16", stem_width=8, cnn_widths="8,16",
              cnn_hidden=32)


def experiment(args) -> configlib.Experiment:
  c = configlib.base_config()
  c.name = f"throughput_{args.model}"
  c.task.name = "image_classify"
  c.task.num_classes = args.num_classes
  c.model = configlib.model_section(args.model, dtype=args.dtype,
                                    **(_tiny_model(args.model) if args.tiny else {}))
  c.data.image_size = args.image_size
  c.train.batch_size = args.batch
  o = c.optim
  o.name, o.momentum, o.nesterov = "sgd", 0.9, True
  o.lr = args.lr or 0.1 * args.batch / 256
  o.weight_decay, o.grad_clip = args.weight_decay, 0.0
  o.schedule, o.warmup_steps = "constant", 0
  c.mesh.update(common.parse_mesh(args.mesh))
  c.mesh.rules = args.rules
  return configlib.resolve(c)


def task(exp: configlib.Experiment, args) -> ImageClassify:
  """The objective of `llmjax train` for image_classify, on info a data read would give."""
  info = {"num_classes": exp.task.num_classes,
          "image_shape": [exp.data.image_size, exp.data.image_size, 3],
          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
  return ImageClassify(exp, info)


def _train_flops(exp, args) -> int:
  return flops.image_train_flops_per_step(exp.model, exp.train.batch_size, exp.data.image_size,
                                          3, exp.task.num_classes)


def describe(exp, args) -> str:
  m, o = exp.model, exp.optim
  shape = (f"{m.resnet_block} blocks, depths {m.resnet_depths}, widths {m.resnet_widths}, stem "
           f"{m.stem} ({m.stem_width})" if m.arch == "resnet"
           else f"convs {m.cnn_widths}, hidden {m.cnn_hidden}")
  return (f"model: {args.model} ({shape}), {exp.data.image_size}x{exp.data.image_size}x3 "
          f"images, {exp.task.num_classes} classes, batch {exp.train.batch_size}, {m.dtype}; "
          f"SGD nesterov momentum {o.momentum}, lr {o.lr:g} constant, weight decay "
          f"{o.weight_decay:g}")


def config(exp, args) -> dict:
  return {"model_name": args.model, "model": dataclasses.asdict(exp.model),
          "optim": dataclasses.asdict(exp.optim), "batch": exp.train.batch_size,
          "image_size": exp.data.image_size, "channels": 3,
          "num_classes": exp.task.num_classes,
          "torch_memory_format": "channels_last" if args.torch_channels_last else "nchw"}


def compare_error(args) -> str:
  if presets.get(args.model)["arch"] != "resnet":
    return f"--compare=hf-torch: transformers has no counterpart of {args.model!r} (ResNets only)"
  return ""


def hf_torch_runner(exp, task: ImageClassify, args, seed: int = 0):
  """(run one step, info): transformers ResNetForImageClassification + torch SGD, same batch."""
  import torch
  import transformers
  from llmjax.hf import resnet as hf_resnet

  threads = torch_peers.set_threads(args.threads, seed)
  o = exp.optim
  hf_config = transformers.ResNetConfig(num_channels=3, num_labels=task.num_classes(),
                                        **hf_resnet.to_hf(exp.model))
  model = transformers.ResNetForImageClassification(hf_config).train()
  # llmjax decays only kernels (optim.NO_DECAY): BatchNorm weight/bias and biases are 1-d here.
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay},
                         {"params": no_decay, "weight_decay": 0.0}],
                        lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
  batch = common.host_batch(task, exp.train.batch_size, seed)  # the jax step's batch
  memory_format = torch.channels_last if args.torch_channels_last else torch.contiguous_format
  model = model.to(memory_format=memory_format)
  images_BCHW = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous(
      memory_format=memory_format)
  labels_B = torch.from_numpy(batch["labels"].astype(np.int64))
  mean_1C11 = torch.tensor(task.info["mean"]).reshape(1, -1, 1, 1)
  std_1C11 = torch.tensor(task.info["std"]).reshape(1, -1, 1, 1)
  info = {"losses": [], "threads": threads,
          "n_params": sum(p.numel() for p in model.parameters())}

  def once():
    opt.zero_grad(set_to_none=True)
    pixels_BCHW = (images_BCHW.float() / 255.0 - mean_1C11) / std_1C11  # as llmjax, in the step
    loss = model(pixel_values=pixels_BCHW, labels=labels_B).loss
    loss.backward()
    opt.step()
    info["losses"].append(float(loss.detach()))  # CPU torch is synchronous: the step is done

  return once, info


FAMILY = common.Family(
    unit="images", tiny=TINY, experiment=experiment, task=task,
    units_per_step=lambda exp, args: exp.train.batch_size, flops_per_step=_train_flops,
    flop_formula=FLOP_FORMULA, describe=describe, config=config, torch_runner=hf_torch_runner,
    compare_error=compare_error)
