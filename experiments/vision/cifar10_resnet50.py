"""ResNet-50 on CIFAR-10, the classic recipe, from a prepared tfds dataset.

  tfds build cifar10 --data_dir=DIR --file_format=array_record     # on a machine with network
  llmjax train --config=experiments/vision/cifar10_resnet50.py --workdir=runs/cifar10_resnet50 \
      --config.data.tfds_data_dir=DIR
  llmjax train --config=experiments/vision/cifar10_resnet50.py:smoke --workdir=/tmp/c10  # seconds

ResNet-50 v1.5 with the small-image stem for 32 px inputs, SGD with Nesterov momentum 0.9, lr 0.1
for batch 256 with cosine decay over 200 epochs, weight decay 5e-4 (not on BatchNorm or biases),
random crops of the 4-pixel zero-padded image and horizontal flips; a tenth of the train split is
held out for validation and the test split is the test set.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "cifar10_resnet50"
  c.task.name = "image_classify"
  c.model = config_lib.model_section("resnet50", stem="small", zero_init_residual=True)
  c.data.source = "tfds"
  c.data.tfds_name = "cifar10"
  c.data.tfds_split = "train"
  c.data.tfds_test_split = "test"
  c.data.tfds_image_key = "image"
  c.data.label_key = "label"
  c.data.val_fraction = 0.1
  c.data.crop_padding = 4
  c.data.hflip = True
  c.train.steps = 35_000  # 200 epochs of the 45,000 training images
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.eval_every = 2_000
  c.train.eval_batches = 20
  c.train.checkpoint_every = 2_000
  c.optim.name = "sgd"
  c.optim.nesterov = True
  c.optim.lr = 0.1
  c.optim.warmup_steps = 500
  c.optim.weight_decay = 5e-4
  c.optim.grad_clip = 0.0
  return config_lib.finalize(c, arg)
