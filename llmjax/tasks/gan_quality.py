"""How good a GAN's samples are, judged by an image classifier llmjax trained (config.task.judge:
an `image_classify` run, e.g. experiments/vision/mnist_cnn.py's).

At every evaluation, on n = min(config.task.fd_samples, held-out images) images per set:
- fd: the Fréchet distance (llmjax/eval/frechet.py) between the judge's penultimate features of
  the validation images and of n samples from fixed latents. This is *not* Inception FID: the
  features are a small classifier's, so the numbers compare runs judged by the same classifier
  only, never published FIDs.
- fd_floor_gaussian: the same distance for n images drawn from a Gaussian fitted to the training
  pixels (their mean and covariance): the floor a generator must beat.
- fd_heldout: the same distance for n test-split images (when the data has a test split): what
  real images score, the best a generator can hope for.
- class_frac/<label>: the fraction of the samples the judge puts in each class, and
  classes_present: how many classes it sees at all (mode collapse shows as missing classes).
The two references do not change during a run: they are computed once, at the first evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llmjax import config as config_lib
from llmjax.errors import UserError
from llmjax.eval import frechet
from llmjax.tasks.image_classify import ImageClassify

KEY = "config.task.judge"
# How many training images the pixel Gaussian is fitted to (its covariance is pixels x pixels).
GAUSSIAN_FIT_IMAGES = 10_000
_BATCH = 250


def _source(spec: str):
  # deferred: llmjax.weights brings orbax, kept off the model-only import path
  from llmjax import weights
  return weights.parse(spec if spec.startswith("workdir:") else f"workdir:{spec}", KEY,
                       kinds=("workdir",))


def check_judge(spec: str, image_shape) -> None:
  """UserError naming config.task.judge unless it is an image_classify run with a checkpoint
  that takes images of `image_shape`."""
  source = _source(spec)
  task_name = source.read_json("config.json", "an llmjax run directory")["task"]["name"]
  if task_name != "image_classify":
    raise source.error(f"the judge must be an image_classify run (its features score the "
                       f"samples), not a {task_name!r} run")
  theirs = source.task_info().get("image_shape")
  if list(theirs or []) != list(image_shape):
    raise source.error(f"the judge takes images of shape {theirs} but the GAN's are "
                       f"{list(image_shape)} (set config.data.image_size to match)")
  if not source.steps():
    raise source.error("the run has no checkpoint yet")


class Judge:
  """An image_classify run's model and weights on this process's first device: penultimate
  features and predicted classes of uint8 images."""

  def __init__(self, spec: str):
    # Its own one-device mesh: the judge is read and run on this process's first device,
    # whatever mesh and sharding rules the GAN's run has set around the evaluation.
    self.mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(()):
      self._load(spec)

  def _load(self, spec: str) -> None:
    source = _source(spec)
    with open(f"{source.path}/config.json") as f:
      exp = config_lib.from_json(f.read())
    info = source.task_info()
    self.task = ImageClassify(exp, info)
    self.label_names = list(info["label_names"])
    model = self.task.model()
    batch = self.task.example_batch(1)
    abstract = nn.unbox(jax.eval_shape(lambda rng: self.task.init(
        model, {"params": rng, "dropout": rng},
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)), jax.random.PRNGKey(0)))
    device = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: device, abstract)
    variables = {"params": source.load(abstract["params"], shardings["params"])}
    rest = {k: v for k, v in abstract.items() if k != "params"}
    if rest:  # BatchNorm statistics of a ResNet judge
      variables.update(source.load_model_state(rest, {k: shardings[k] for k in rest}))
    self.variables = variables

    def features(variables, images_BHWC):
      rows = images_BHWC.shape[0]
      prediction = self.task.predict(
          model, variables, {"images": images_BHWC, "labels": jnp.zeros(rows, jnp.int32),
                             "mask": jnp.ones(rows, jnp.float32)},
          rng=None, train=False, hidden=True)
      return prediction.hidden.astype(jnp.float32), jnp.argmax(prediction.logits, -1)
    self._features = jax.jit(features)

  def features(self, images_NHWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, F] float64, predicted class [N]) of uint8 images."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(()):
      parts = [jax.device_get(self._features(self.variables, images_NHWC[i:i + _BATCH]))
               for i in range(0, len(images_NHWC), _BATCH)]
    return (np.concatenate([p[0] for p in parts]).astype(np.float64),
            np.concatenate([p[1] for p in parts]))


def gaussian_images(train_NHWC: np.ndarray, n: int, seed: int) -> np.ndarray:
  """n uint8 images drawn from the Gaussian fitted to (up to GAUSSIAN_FIT_IMAGES) training
  images' pixels, clipped to 0..255."""
  x_ND = train_NHWC[:GAUSSIAN_FIT_IMAGES].reshape(min(len(train_NHWC), GAUSSIAN_FIT_IMAGES), -1)
  mean_D, cov_DD = frechet.gaussian_stats(x_ND)
  draws_ND = np.random.default_rng(seed).multivariate_normal(mean_D, cov_DD, size=n,
                                                             method="eigh")
  return np.clip(np.round(draws_ND), 0, 255).astype(np.uint8).reshape(n, *train_NHWC.shape[1:])


class Quality:
  """The judge, the validation images' feature statistics and the two references, computed
  once; `report(samples)` scores n samples against them."""

  def __init__(self, spec: str, data, seed: int, fd_samples: int):
    self.judge = Judge(spec)
    val = data.val["images"]
    test = None if data.test is None else data.test["images"]
    self.n = min(fd_samples, len(val), len(test) if test is not None else len(val))
    if self.n < 2:
      raise UserError(f"{KEY}={spec!r}: the Fréchet distance needs 2 or more held-out images; "
                      f"the validation split has {len(val)}")
    self.val_stats = frechet.gaussian_stats(self.judge.features(val[:self.n])[0])
    self.references = {"fd_floor_gaussian": self.distance(
        gaussian_images(data.train["images"], self.n, seed))}
    if test is not None:
      self.references["fd_heldout"] = self.distance(test[:self.n])

  def distance(self, images_NHWC: np.ndarray) -> float:
    """The Fréchet distance of images to the validation images, in the judge's features."""
    return frechet.frechet_distance(*self.val_stats,
                                    *frechet.gaussian_stats(self.judge.features(images_NHWC)[0]))

  def report(self, samples_NHWC: np.ndarray) -> dict:
    features_NF, classes_N = self.judge.features(samples_NHWC)
    out = {"fd": frechet.frechet_distance(*self.val_stats, *frechet.gaussian_stats(features_NF)),
           **self.references}
    counts = np.bincount(classes_N, minlength=len(self.judge.label_names))
    out["classes_present"] = int(np.count_nonzero(counts))
    out.update({f"class_frac/{name}": float(c) / len(classes_N)
                for name, c in zip(self.judge.label_names, counts)})
    return out
