"""`image_classify`: images -> one of C labels, by a ResNet or a small CNN, with the exact metrics
of `classify` (a confusion matrix summed over batches and devices; accuracy, top-5, P/R/F1).

Images travel as uint8 [B, H, W, C] (a quarter of the bytes of floats); training batches are
augmented on the host (crops, flips, rotations: llmjax.data.vision) and normalised on the device
with the training set's per-channel mean and std. BatchNorm statistics live in the train state's
`model_state` and update on finite training steps only (llmjax.train.step).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import flops
from llmjax.config import TaskConfig
from llmjax.errors import ConfigError, capped
from llmjax.models import vision as vision_models
from llmjax.models.apply import apply_model
from llmjax.tasks.base import (Data, require_encoder_decoder, require_label_smoothing,
                               require_num_classes)
from llmjax.tasks.classify import LABELS_FILE, LabelTask, recorded_labels


@dataclasses.dataclass(frozen=True)
class ImageClassifyConfig(TaskConfig):
  """config.task of `image_classify`."""
  num_classes: int = 0  # 0 takes the number of labels in the data
  label_smoothing: float = 0.0

  def validate(self, exp):
    require_encoder_decoder(exp, False)
    require_num_classes(self.num_classes)
    require_label_smoothing(self.label_smoothing)


class ImageClassify(LabelTask):
  """Image classification; reports accuracy, top-5 accuracy, macro/micro/weighted P, R, F1."""
  name = "image_classify"

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import vision
    exp = self.exp
    splits = vision.load_images(exp.data, recorded_labels(exp, workdir))
    names = list(splits.label_names)
    if exp.task.num_classes and exp.task.num_classes != len(names):
      raise ConfigError(f"config.task.num_classes={exp.task.num_classes} but the data has "
                        f"{len(names)} labels ({capped(names, 10)})")
    images = splits.train["images"]
    if exp.data.normalize:
      mean, std = vision.channel_stats(images)
    else:
      mean, std = np.zeros(images.shape[-1]), np.ones(images.shape[-1])
    info = {"label_names": names, "num_classes": len(names),
            "image_shape": list(images.shape[1:]),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    artifacts = {LABELS_FILE: json.dumps({"names": names, "data": splits.description},
                                         indent=2)}
    return Data(train=_rows(splits.train), val=_rows(splits.val, exp.data.seed),
                test=_rows(splits.test, exp.data.seed), tokenizer=None, info=info,
                artifacts=artifacts,
                augment=vision.augmenter(exp.data, image_shape=images.shape[1:]))

  def model(self):
    if self.num_classes() < 2:
      raise ConfigError("config.task.num_classes is unknown before the data is read")
    height, _, channels = self.image_shape()
    return vision_models.image_model(self.exp.model, self.num_classes(), in_channels=channels,
                                     image_size=height)

  def image_shape(self) -> tuple[int, int, int]:
    if "image_shape" not in self.info:
      raise ConfigError("the image size is unknown before the data is read")
    return tuple(self.info["image_shape"])

  def example_batch(self, batch_size):
    return {"images": jax.ShapeDtypeStruct((batch_size, *self.image_shape()), jnp.uint8),
            "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def _normalised(self, images_BHWC):
    mean_111C = jnp.asarray(self.info["mean"], jnp.float32).reshape(1, 1, 1, -1)
    std_111C = jnp.asarray(self.info["std"], jnp.float32).reshape(1, 1, 1, -1)
    return (images_BHWC.astype(jnp.float32) / 255.0 - mean_111C) / std_111C

  def init(self, model, rngs, batch):
    return model.init(rngs, self._normalised(batch["images"]), deterministic=True)

  @property
  def fixed_inputs(self):  # augmentation draws new crops and flips every epoch
    return self.exp.data.crop_padding == 0 and not self.exp.data.random_resized_crop and \
        not self.exp.data.hflip and self.exp.data.rotate_degrees == 0

  def predict(self, model, variables, batch, *, rng, train, hidden=False):
    out, model_state = apply_model(model, variables, self._normalised(batch["images"]),
                                   train=train, rng=rng, hidden=hidden, deterministic=not train)
    return self.labelled_prediction(out, batch, model_state)

  def tokens_per_example(self) -> int:
    return 1  # throughput counts images: tokens_per_s is images/s

  def forward_flops_per_example(self):
    height, _, channels = self.image_shape()
    return flops.image_forward(self.exp.model, height, channels, self.num_classes())


def _rows(split: dict | None, shuffle_seed: int | None = None) -> dict | None:
  """A split as task rows, with the mask eval padding sets to 0; eval splits in a seeded order
  (sources list images class by class: a capped evaluation must still see every class)."""
  if split is None:
    return None
  rows = {"images": split["images"], "labels": split["labels"].astype(np.int32),
          "mask": np.ones(len(split["labels"]), np.float32)}
  if shuffle_seed is not None:
    order = np.random.default_rng(shuffle_seed).permutation(len(rows["labels"]))
    rows = {k: v[order] for k, v in rows.items()}
  return rows
