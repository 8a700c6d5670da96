"""The gan task on a small generated image folder: each network gets gradient only from its own
loss, both networks' BatchNorm statistics on 8 devices equal 1, exact resume, the Fréchet distance
against scipy, the quality report of a judge llmjax trained, `llmjax sample`, bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import linen as nn
from PIL import Image

import llmjax.train
from llmjax import config as config_lib
from llmjax.errors import ConfigError, UserError
from llmjax.eval import frechet, plots
from llmjax.parallel import sharding
from llmjax.tasks import Data
from llmjax.tasks import gan_quality
from llmjax.tasks.gan import Gan
from llmjax.train import loop, rundir
from llmjax.train import setup as setuplib
from llmjax.treepaths import items

import _xla
from _task_helpers import with_mesh
from test_image_task import experiment as image_experiment
from test_image_task import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 12  # write_folder's images: 12x12 RGB


def gan_experiment(folder, judge="", task=None, **train):
  """experiments/gan/mnist_dcgan.py:smoke on `folder`, shrunk further: 4 steps, evaluations and
  checkpoints at 2 and 4."""
  c = config_lib.experiment_module("mnist_dcgan.py", os.path.join(ROOT, "experiments", "gan",
                                                                  "x")).get_config("smoke")
  c.unlock()
  c.data.source, c.data.image_folder, c.data.val_fraction = "image_folder", folder, 0.25
  c.task.update({**dict(g_widths="8,4", d_widths="4,8", latent_dim=8, mlp_hidden="8",
                        judge=judge, fd_samples=8, grid_samples=4), **(task or {})})
  c.optim.update(dict(schedule="constant", warmup_steps=0, lr=1e-3))
  c.train.update({**dict(steps=4, batch_size=8, log_every=1, eval_every=2, checkpoint_every=2,
                         eval_batches=1, progress=False, async_checkpoint=False), **train})
  return config_lib.resolve(c)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def judge(folder, tmp_path_factory):
  """A one-step CNN classifier of the folder's images: the judge of the runs below."""
  workdir = str(tmp_path_factory.mktemp("judge") / "run")
  llmjax.train.run(image_experiment(folder, arch="cnn", steps=1, checkpoint_every=1), workdir)
  return workdir


@pytest.fixture(scope="module")
def straight(folder, judge, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gan") / "run")
  llmjax.train.run(gan_experiment(folder, judge), workdir)
  return workdir


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def _final_state(workdir):
  run = rundir.restore(workdir)
  return jax.device_get((run.params, run.state.model_state))


@pytest.mark.parametrize("task", [dict(variant="dcgan", d_norm="batch"),
                                  dict(variant="mlp", d_norm="spectral", gan_loss="minimax")])
def test_each_network_gets_gradient_only_from_its_own_loss(folder, task):
  gan = Gan(gan_experiment(folder, task=task), {"image_shape": [SIDE, SIDE, 3]})
  model = gan.model()
  batch = {"images": jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, SIDE, SIDE, 3)),
                                 jnp.uint8), "mask": jnp.ones(4, jnp.float32)}
  init = jax.jit(lambda rngs, batch: gan.init(model, rngs, batch))  # one compile, not one per op
  variables = nn.unbox(init({"params": jax.random.PRNGKey(0)}, batch))
  params = variables.pop("params")
  assert set(params) == {"generator", "discriminator"} and set(variables) == {"batch_stats"}

  def grads(p):  # of d_loss, g_loss and the step's loss (their sum), in one program
    def part(key):
      def f(p):
        terms = gan.loss(model, {"params": p, **variables}, batch, rng=jax.random.PRNGKey(1),
                         train=True)
        return terms.loss_sum if key == "loss" else terms.sums[key]
      return jax.grad(f)(p)
    return tuple(part(key) for key in ("d_loss_sum", "g_loss_sum", "loss"))

  d_grads, g_grads, both = (dict(items(g)) for g in jax.device_get(jax.jit(grads)(params)))
  for path, g in d_grads.items():
    own, other = (d_grads, g_grads) if path.startswith("discriminator/") else (g_grads, d_grads)
    assert not np.any(np.asarray(other[path])), f"{path} gets gradient from the other loss"
    np.testing.assert_allclose(both[path], own[path], rtol=1e-6, atol=1e-7)
  for network, grads in (("discriminator", d_grads), ("generator", g_grads)):
    assert any(np.any(np.asarray(g)) for p, g in grads.items() if p.startswith(network + "/"))


def _first_step(exp, devices=None):
  s = setuplib.prepare(exp, None, devices)
  state = loop.fresh_state(s)
  batch = next(loop._data_iterator(s, None))
  train_fn, _ = setuplib.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  return float(metrics["loss"]), jax.device_get((new_state.params, new_state.model_state))


def test_batchnorm_statistics_of_both_networks_on_eight_devices_equal_one(folder):
  exp = gan_experiment(folder)
  # SGD: parameters move in proportion to their gradients (Adam's first step is lr x sign(g),
  # which a rounding difference in a near-zero gradient flips)
  exp = dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, name="sgd"))
  loss1, (params1, stats1) = _first_step(with_mesh(exp, 1, 1, "dp"), jax.devices()[:1])
  assert set(stats1["batch_stats"]) == {"generator", "discriminator"}
  loss8, (params8, stats8) = _first_step(with_mesh(exp, 8, 1, "dp"))
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
  jax.tree.map(close, stats8, stats1)
  jax.tree.map(close, params8, params1)


def test_trains_reports_quality_writes_samples_and_resumes_exactly(folder, judge, straight,
                                                                   tmp_path):
  val = _records(straight, "val")
  assert sorted(val) == [2, 4]
  for record in val.values():
    for key in ("d_loss", "g_loss", "d_real", "d_fake", "fd", "fd_floor_gaussian"):
      assert np.isfinite(record[key]), (key, record)
    assert 0 <= record["d_real"] <= 1 and 0 <= record["d_fake"] <= 1
    assert record["fd"] >= 0 and 1 <= record["classes_present"] <= 3
    fractions = [record[f"class_frac/{name}"] for name in ("circle", "cross", "square")]
    assert abs(sum(fractions) - 1) < 1e-9
  assert val[2]["fd_floor_gaussian"] == val[4]["fd_floor_gaussian"]  # computed once per run
  for step in (2, 4):  # 4 samples on a 2x2 grid of 12-pixel images with 2-pixel gaps
    grid = Image.open(os.path.join(straight, "plots", f"samples_step_{step}.png"))
    assert grid.size == (30, 30) and grid.mode == "RGB"

  exp = gan_experiment(folder)  # the judge changes no training step; without it, cheaper
  resumed = str(tmp_path / "resumed")
  llmjax.train.run(dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=2)),
                   resumed)
  llmjax.train.run(exp, resumed)  # picks up at step 2 with both networks' statistics
  train = _records(straight, "train")
  assert {s: r["loss"] for s, r in _records(resumed, "train").items()} == {
      s: r["loss"] for s, r in train.items()}
  assert _records(resumed, "val")[4]["d_loss"] == val[4]["d_loss"]
  jax.tree.map(np.testing.assert_array_equal, _final_state(resumed), _final_state(straight))


def test_llmjax_sample_writes_the_grid_of_the_latents_its_seed_draws(straight, tmp_path):
  out = tmp_path / "new.png"
  proc = subprocess.run([sys.executable, "-m", "llmjax.cli.main", "sample",
                         f"--workdir={straight}", "--n=5", f"--out={out}", "--seed=3"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, XLA_FLAGS=_xla.xla_flags()))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"wrote 5 samples to {out}" in proc.stdout
  run = rundir.restore(straight)
  variables = jax.device_get({"params": run.params, **run.state.model_state})
  images = run.task.sample(run.model, variables, 5, seed=3)
  assert images.shape == (5, SIDE, SIDE, 3) and images.dtype == np.uint8
  plots.image_grid(images, str(tmp_path / "here.png"))  # 3 columns, 2 rows
  got, want = (np.asarray(Image.open(tmp_path / n)) for n in ("new.png", "here.png"))
  assert got.shape == (30, 44, 3)
  np.testing.assert_array_equal(got, want)
  again = run.task.sample(run.model, variables, 5, seed=4)
  assert np.any(again != images)
  from llmjax.cli import sample
  with pytest.raises(UserError, match="draws no samples"):  # the judge: an image_classify run
    sample.sample(rundir.experiment(straight).task.judge, 1, str(tmp_path / "x.png"))
  assert not (tmp_path / "x.png").exists()


def test_frechet_distance_equals_a_scipy_reference():
  rng = np.random.default_rng(0)
  a_NF = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
  b_NF = rng.normal(size=(40, 5)) * 2.0 + 0.5
  mu1, s1 = np.mean(a_NF, 0), np.cov(a_NF, rowvar=False)
  mu2, s2 = np.mean(b_NF, 0), np.cov(b_NF, rowvar=False)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  np.testing.assert_allclose(frechet.frechet_distance_of(a_NF, b_NF), want, rtol=1e-8)
  assert abs(frechet.frechet_distance_of(a_NF, a_NF)) < 1e-9
  with pytest.raises(ValueError, match="N >= 2"):
    frechet.gaussian_stats(a_NF[:1])


def test_quality_of_real_images_is_zero_against_themselves(folder, judge):
  gan = Gan(gan_experiment(folder, judge), {})
  data = gan.data(None)
  same = Data(train=data.train, val=data.val, test=data.val, tokenizer=None, info={},
              artifacts={})
  quality = gan_quality.Quality(judge, same, seed=0, fd_samples=8)
  # rounding in the square roots of a rank-deficient covariance's (near-)zero eigenvalues
  tolerance = 1e-4 * (1 + np.trace(quality.val_stats[1]))
  assert quality.n == 8 and abs(quality.references["fd_heldout"]) < tolerance
  assert quality.references["fd_floor_gaussian"] > tolerance
  report = quality.report(data.val["images"][:8])
  assert abs(report["fd"]) < tolerance and report["classes_present"] >= 1


def test_a_folder_of_one_class_is_enough(tmp_path):
  """Labels are unused: a folder of one kind of image trains a GAN (a classifier needs 2)."""
  root = tmp_path / "faces"
  write_folder(root, per_class=4)
  for name in ("cross", "square"):
    for file in (root / name).iterdir():
      file.unlink()
    (root / name).rmdir()
  data = Gan(gan_experiment(str(root)), {}).data(None)
  assert len(data.train["images"]) + len(data.val["images"]) == 4
  assert data.val["z"].shape == (len(data.val["images"]), 8)


def test_bad_gan_input_names_the_key_and_writes_nothing(folder, tmp_path):
  with pytest.raises(ConfigError, match=r"config\.data\.image_size.*multiple of 4"):
    _with(folder, data={"image_size": 30})
  with pytest.raises(ConfigError, match=r"config\.data\.source='stdlib'.*image_folder"):
    _with(folder, data={"source": "stdlib"})
  for task, message in ((dict(g_widths="8,4,2"), r"12x12.*multiple of 8"),
                        (dict(judge=str(tmp_path / "nope")), r"config\.task\.judge=.*nope"),
                        (dict(judge=str(folder)), r"config\.task\.judge=")):
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=message):
      llmjax.train.run(gan_experiment(folder, task=task), str(workdir))
    assert not workdir.exists()


def _with(folder, **sections):
  c = config_lib.experiment_module("mnist_dcgan.py", os.path.join(ROOT, "experiments", "gan",
                                                                  "x")).get_config("smoke")
  c.unlock()
  c.data.source, c.data.image_folder = "image_folder", folder
  c.task.update(dict(g_widths="8,4", d_widths="4,8"))
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)
