"""ResNet-18 (small-image stem) on Fashion-MNIST read from its IDX files.

  sudo apt-get install dataset-fashion-mnist     # the files, under /usr/share/datasets/
  llmjax train --config=experiments/vision/fashion_resnet18.py --workdir=runs/fashion_resnet18
  llmjax eval --workdir=runs/fashion_resnet18 --split=test

60,000 training images (a seeded tenth held out for validation), the 10,000 t10k images as the
test split (config.data.idx_dir points elsewhere for MNIST itself or a copy). The small-image stem
(3x3 stride-1 conv, no max-pool) keeps the 28 px images at full resolution in the first stage,
as CIFAR-style ResNets do. SGD with Nesterov momentum and cosine decay, weight decay off for
BatchNorm and biases, random 2-pixel shifts and horizontal flips. 300 steps of 128 (two thirds of
an epoch): measured 2026-12-05 on a shared 2-core host, 54 minutes wall for 27.5 CPU-minutes,
83.9% validation and 82.5% test accuracy (docs/vision.md).
"""

from llmjax import config as config_lib


def base():
  c = config_lib.base_config()
  c.name = "fashion_resnet18"
  c.task.name = "image_classify"
  c.task.label_smoothing = 0.1
  c.model = config_lib.model_section("resnet18", stem="small", zero_init_residual=True)
  c.data.source = "idx"
  c.data.val_fraction = 0.1
  c.data.crop_padding = 2
  c.data.hflip = True
  c.train.steps = 300
  c.train.batch_size = 128
  c.train.log_every = 25
  c.train.eval_every = 150
  c.train.eval_batches = 12
  c.train.checkpoint_every = 150
  c.optim.name = "sgd"
  c.optim.nesterov = True
  c.optim.momentum = 0.9
  c.optim.lr = 0.1
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 5e-4
  c.optim.grad_clip = 0.0
  return c


def get_config(arg=None):
  return config_lib.finalize(base(), arg)
