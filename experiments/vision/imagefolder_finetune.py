"""ResNet-18 on a folder of your own images, its head replaced: fine-tuned vs from scratch.

  # A folder of "your own" images (here: Fashion-MNIST classes 5-9 as PNGs, 100 per class; the
  # layout is DATA/train/<class>/*.png and DATA/val/<class>/*.png), and pretraining data that
  # never shows those classes (classes 0-4):
  python -m llmjax.data.image_folder_export --classes=5,6,7,8,9 --per_class=100 \
      --val_per_class=200 --out=data/fm59
  python -m llmjax.data.image_folder_export --classes=0,1,2,3,4 --out=data/fm04
  llmjax train --config=experiments/vision/imagefolder_finetune.py:pretrain --workdir=runs/fm04 \
      --config.data.image_folder=data/fm04/train
  # Head replaced (classifier/ starts fresh for the folder's 5 classes), everything fine-tuned:
  llmjax train --config=experiments/vision/imagefolder_finetune.py --workdir=runs/fm59_tuned \
      --config.data.image_folder=data/fm59/train --config.train.init_from=workdir:runs/fm04
  # ... or only the last stage and the head train (the rest frozen, no optimizer state for it):
  llmjax train --config=experiments/vision/imagefolder_finetune.py:freeze \
      --workdir=runs/fm59_frozen --config.data.image_folder=data/fm59/train \
      --config.train.init_from=workdir:runs/fm04
  # The same model from random init, same folder and steps:
  llmjax train --config=experiments/vision/imagefolder_finetune.py:scratch \
      --workdir=runs/fm59_scratch --config.data.image_folder=data/fm59/train

`init_from` also takes an HF ResNet directory (`hf:PATH`, e.g. microsoft/resnet-18 downloaded
elsewhere; then drop `stem=small` and use its 224 px setting with config.data.image_size=224).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  c = config_lib.experiment_module("fashion_resnet18.py", __file__).base()
  c.name = "imagefolder_finetune"
  c.data.source = "image_folder"
  c.data.image_folder = "data/fm59/train"
  c.data.crop_padding = 2
  c.data.hflip = True
  if "pretrain" in args:
    c.name = "imagefolder_pretrain"
    c.train.steps = 150
  else:
    c.train.steps = 120
    c.train.batch_size = 50
    c.train.eval_every = 60
    c.train.checkpoint_every = 60
    c.train.log_every = 10
    c.optim.warmup_steps = 10
    tuned = not args & {"scratch"}
    c.train.init_new = "classifier/.*" if tuned else ""
    c.optim.lr = 0.02 if tuned else 0.1
    if "freeze" in args:
      c.finetune.method = "freeze"
      c.finetune.trainable = "stage3_.*"
  return config_lib.finalize(c, ",".join(sorted(args - {"pretrain", "scratch", "freeze"}))
                             or None)
