"""`gan`: a generator and a discriminator (llmjax/models/gan.py) trained against each other on the
images of any image source llmjax reads (labels ignored).

One training step updates both networks from one loss, by simultaneous gradients:

  loss = d_loss(D; real, stop_gradient(G(z))) + g_loss(G; stop_gradient(D) at G(z))

The discriminator's parameters get gradient only from d_loss (the fakes enter it as constants)
and the generator's only from g_loss (it sees D through stop-gradient parameters), so one
`value_and_grad` of the sum in the task-agnostic train step (llmjax/train/step.py) gives each
network exactly its own gradient, and `optax.multi_transform` (the task declares ParamGroups)
applies each network's optimiser settings. Both updates use the step's starting parameters (as
in simultaneous gradient descent); torch's DCGAN example alternates instead, updating G against
the already-updated D. D sees real and fake images in separate forward passes, so its BatchNorm
normalises each batch by its own statistics (DCGAN's advice); its running statistics take the
real batch, then the fake one; G's take the fake batch. All of them live in the train state's
`model_state`, sharded and checkpointed like everything else.

Evaluation runs both networks in eval mode (running statistics) on the held-out real images
and, per row, a fixed latent stored with the split (column `z`), so every evaluation compares the
same fakes' discriminator scores. Reported: d_loss, g_loss, d_real and d_fake (D's mean
probability on real and fake images), loss (their sum), and, with config.task.judge, the
Fréchet distance and class histogram of tasks/gan_quality.py; a grid of samples from a fixed
latent batch goes to plots/samples_step_N.png at every evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import TaskConfig
from llmjax.config_checks import require
from llmjax.errors import ConfigError
from llmjax.eval import plots
from llmjax.models import gan as gan_models
from llmjax.models.apply import apply_model
from llmjax.objectives import gan as objectives
from llmjax.tasks import gan_quality
from llmjax.tasks.base import Data, LossTerms, ParamGroups, Samples, Task

IMAGE_SOURCES = ("image_folder", "idx", "mnist_digits", "tfds")
GROUPS = ("generator", "discriminator")


@dataclasses.dataclass(frozen=True)
class GanConfig(TaskConfig):
  """config.task of `gan`."""
  variant: str = "dcgan"  # dcgan | mlp (llmjax/models/gan.py)
  latent_dim: int = 100
  g_widths: str = "128,64"  # dcgan generator: channels per resolution, smallest map first
  d_widths: str = "64,128"  # dcgan discriminator: channels of its stride-2 convolutions
  mlp_hidden: str = "256"  # mlp variant: hidden widths of both networks ("" for none)
  d_norm: str = "batch"  # the discriminator's normalisation: batch | spectral | none
  gan_loss: str = "non_saturating"  # the generator's loss: non_saturating | minimax
  g_lr: float = 0.0  # the generator's peak learning rate (0: config.optim.lr)
  d_lr: float = 0.0  # the discriminator's (0: config.optim.lr)
  g_b1: float = -1.0  # the generator's Adam beta1 (< 0: config.optim.b1)
  d_b1: float = -1.0  # the discriminator's (< 0: config.optim.b1)
  judge: str = ""  # an image_classify run (workdir[@STEP]) whose features score samples; "": none
  fd_samples: int = 1000  # images per set in the Fréchet distance (capped by the held-out split)
  grid_samples: int = 64  # images in plots/samples_step_N.png

  def validate(self, exp):
    require(exp.model.arch == "gan", f"config.model.arch={exp.model.arch!r}: the gan task builds "
            "its own two networks; set config.model.arch='gan' (preset 'gan')")
    require(exp.data.source in IMAGE_SOURCES, f"config.data.source={exp.data.source!r}: the gan "
            f"task trains on images; allowed: {', '.join(IMAGE_SOURCES)}")
    for key, value, allowed in (("variant", self.variant, gan_models.VARIANTS),
                                ("d_norm", self.d_norm, gan_models.D_NORMS),
                                ("gan_loss", self.gan_loss, objectives.GENERATOR_LOSSES)):
      require(value in allowed, f"config.task.{key}={value!r}; allowed: {', '.join(allowed)}")
    require(self.latent_dim >= 1, f"config.task.latent_dim must be >= 1, got {self.latent_dim}")
    require(self.fd_samples >= 2, f"config.task.fd_samples must be >= 2, got {self.fd_samples}")
    require(self.grid_samples >= 1,
            f"config.task.grid_samples must be >= 1, got {self.grid_samples}")
    for key in ("g_lr", "d_lr"):
      require(getattr(self, key) >= 0, f"config.task.{key} must be >= 0 (0: config.optim.lr)")
    spec = self.spec((exp.data.image_size or 32, exp.data.image_size or 32, 1))  # parses widths
    if exp.data.image_size:
      check_size(spec, f"config.data.image_size={exp.data.image_size}")

  def spec(self, image_shape) -> gan_models.GanSpec:
    """The networks' shapes for images of `image_shape` (H, W, C)."""
    return gan_models.GanSpec(
        self.variant, self.latent_dim, tuple(int(d) for d in image_shape),
        widths(self.g_widths, "g_widths"), widths(self.d_widths, "d_widths"),
        widths(self.mlp_hidden, "mlp_hidden", allow_empty=True), self.d_norm)


def widths(text: str, key: str, allow_empty: bool = False) -> tuple[int, ...]:
  """'128,64' -> (128, 64); ConfigError naming config.task.KEY unless all are positive."""
  if allow_empty and not text.strip():
    return ()
  try:
    values = tuple(int(s) for s in text.split(","))
  except ValueError:
    values = ()
  if not values or min(values) <= 0:
    raise ConfigError(f"config.task.{key}={text!r} must be comma-separated positive integers")
  return values


def check_size(spec: gan_models.GanSpec, where: str) -> None:
  """ConfigError when the generator cannot make images of spec's size (`where` names it)."""
  height, width, _ = spec.image_shape
  if spec.variant == "dcgan" and gan_models.base_map(spec) is None:
    scale = 2 ** len(spec.g_widths)
    raise ConfigError(
        f"{where}: images of {height}x{width} cannot come out of the dcgan generator, which "
        f"doubles its map {len(spec.g_widths)} times (one per config.task.g_widths entry): each "
        f"side must be a multiple of {scale} (e.g. {scale * max(1, round(height / scale))}); "
        "change the size (config.data.image_size) or config.task.g_widths")
  if spec.variant == "dcgan" and min(height, width) < 2 ** len(spec.d_widths):
    raise ConfigError(f"{where}: images of {height}x{width} are too small for the "
                      f"discriminator's {len(spec.d_widths)} stride-2 convolutions "
                      "(config.task.d_widths)")


def to_unit(images_BHWC: jax.Array) -> jax.Array:
  """uint8 pixels -> floats in [-1, 1], the generator's tanh range."""
  return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def to_pixels(x_BHWC) -> np.ndarray:
  """Floats in [-1, 1] -> uint8 pixels."""
  return np.clip(np.round((np.asarray(x_BHWC, np.float32) + 1.0) * 127.5), 0, 255).astype(
      np.uint8)


def latents(seed: int, n: int, dim: int) -> np.ndarray:
  """n fixed latents z ~ N(0, I) [n, dim] float32, drawn on the host from `seed`."""
  return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _generate_fn(cfg, spec):
  """G(z) in eval mode (running statistics), jitted once per pair of networks."""
  model = gan_models.GAN(cfg, spec)
  return jax.jit(lambda variables, z_BZ: model.apply(variables, z_BZ, deterministic=True,
                                                     method=gan_models.GAN.generate))


class Gan(ParamGroups, Samples, Task):
  """A GAN on unlabelled images: d_loss, g_loss, d_real, d_fake; samples and their quality."""
  name = "gan"
  _quality = None  # gan_quality.Quality, built at the first evaluation with a judge

  def data(self, workdir):
    # deferred: grain and tensorflow-datasets stay off the model-only import path
    from llmjax.data import vision
    exp = self.exp
    splits = vision.load_images(exp.data, min_classes=1)  # labels unused: one class will do
    shape = tuple(int(d) for d in splits.train["images"].shape[1:])
    spec = exp.task.spec(shape)
    check_size(spec, f"the images of config.data.source={exp.data.source!r}")
    if exp.task.judge:  # before anything is written: the judge must be able to score them
      gan_quality.check_judge(exp.task.judge, shape)
    info = {"image_shape": list(shape), "data": splits.description}
    dim = exp.task.latent_dim
    rows = lambda split, seed: None if split is None else {  # noqa: E731
        "images": split["images"], "mask": np.ones(len(split["images"]), np.float32),
        "z": latents(seed, len(split["images"]), dim)}
    train = {"images": splits.train["images"],
             "mask": np.ones(len(splits.train["images"]), np.float32)}
    return Data(train=train, val=rows(splits.val, exp.data.seed + 1),
                test=rows(splits.test, exp.data.seed + 2), tokenizer=None, info=info,
                artifacts={}, augment=vision.augmenter(exp.data, image_shape=shape))

  def spec(self) -> gan_models.GanSpec:
    if "image_shape" not in self.info:
      raise ConfigError("the image size is unknown before the data is read")
    return self.exp.task.spec(self.info["image_shape"])

  def model(self):
    return gan_models.GAN(self.exp.model, self.spec())

  def example_batch(self, batch_size):
    return {"images": jax.ShapeDtypeStruct((batch_size, *self.spec().image_shape), jnp.uint8),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def init(self, model, rngs, batch):
    z_BZ = jnp.zeros((batch["images"].shape[0], self.exp.task.latent_dim), jnp.float32)
    return model.init(rngs, z_BZ, to_unit(batch["images"]), deterministic=True)

  def loss(self, model, variables, batch, *, rng, train):
    mask_B, real_BHWC = batch["mask"], to_unit(batch["images"])
    if train:  # fresh latents every step (and microbatch): the step folds them into `rng`
      z_BZ = jax.random.normal(rng, (real_BHWC.shape[0], self.exp.task.latent_dim), jnp.float32)
    else:  # the split's fixed latents: every evaluation scores the same fakes
      z_BZ = batch["z"]
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def run(method, x, params, state):
      return apply_model(model, {"params": params, **state}, x, train=train, rng=None,
                         method=method, deterministic=not train)

    fake_BHWC, state = run(gan_models.GAN.generate, z_BZ, params, state)
    real_B, state = run(gan_models.GAN.discriminate, real_BHWC, params, state)
    if train:
      fake_d_B, state = run(gan_models.GAN.discriminate, jax.lax.stop_gradient(fake_BHWC),
                            params, state)
      frozen_d = {**params, "discriminator": jax.lax.stop_gradient(params["discriminator"])}
      fake_g_B, _ = run(gan_models.GAN.discriminate, fake_BHWC, frozen_d, state)
    else:  # no gradients: one pass scores the fakes for both losses
      fake_d_B, state = run(gan_models.GAN.discriminate, fake_BHWC, params, state)
      fake_g_B = fake_d_B
    d_sum = objectives.discriminator_loss_sum(real_B, fake_d_B, mask_B)
    g_sum = objectives.generator_loss_sum(fake_g_B, mask_B, self.exp.task.gan_loss)
    sums = {"d_loss_sum": d_sum, "g_loss_sum": g_sum,
            "d_real_sum": objectives.probability_sum(real_B, mask_B),
            "d_fake_sum": objectives.probability_sum(fake_g_B, mask_B)}
    return LossTerms(loss_sum=d_sum + g_sum, weight=jnp.sum(mask_B), sums=sums,
                     model_state=state)

  def report(self, sums):
    weight = max(float(sums["weight"]), 1.0)
    out = {"loss": float(sums["loss_sum"]) / weight}
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
      out[key] = float(sums[f"{key}_sum"]) / weight
    return out

  def headline(self, report):
    fd = f", Fréchet distance {report['fd']:.2f}" if "fd" in report else ""
    return (f"final validation d_loss {report['d_loss']:.4f}, g_loss {report['g_loss']:.4f}, "
            f"D(real) {report['d_real']:.3f}, D(fake) {report['d_fake']:.3f}{fd}")

  # --- ParamGroups: each network's optimiser settings ---------------------------------------

  def param_groups(self):
    opts, optim = self.exp.task, self.exp.optim
    return {"generator": dataclasses.replace(optim, lr=opts.g_lr or optim.lr,
                                             b1=opts.g_b1 if opts.g_b1 >= 0 else optim.b1),
            "discriminator": dataclasses.replace(optim, lr=opts.d_lr or optim.lr,
                                                 b1=opts.d_b1 if opts.d_b1 >= 0 else optim.b1)}

  def param_group(self, path):
    group = path.split("/")[0]
    if group not in GROUPS:
      raise ValueError(f"parameter {path!r} belongs to neither network")
    return group

  # --- Samples: new images, their quality, the grid ------------------------------------------

  def sample(self, model, variables, n, seed):
    z_NZ = latents(seed, n, self.exp.task.latent_dim)
    fn = _generate_fn(model.cfg, model.spec)
    return np.concatenate([to_pixels(fn(variables, z_NZ[i:i + 256]))
                           for i in range(0, n, 256)])

  def sample_report(self, model, variables, data):
    opts = self.exp.task
    if not opts.judge:
      return {}
    if self._quality is None:  # the judge and the references, once per run
      self._quality = gan_quality.Quality(opts.judge, data, self.exp.data.seed, opts.fd_samples)
    return self._quality.report(self.sample(model, variables, self._quality.n,
                                            self.exp.data.seed + 3))

  def sample_files(self, workdir, model, variables, tag):
    images = self.sample(model, variables, self.exp.task.grid_samples, self.exp.data.seed)
    path = os.path.join(workdir, "plots", f"samples_{tag}.png")
    plots.image_grid(images, path)
    return [path]

