"""image_classify end to end on small generated image folders: BatchNorm statistics over the
global batch (8 devices == 1), untouched by a non-finite step, resumed exactly; a replaced head
leaves the backbone equal to its checkpoint; CIFAR-10 ResNet-50 smoke on tfds mock data; bad
inputs."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import llmjax.train
from llmjax import config as config_lib
from llmjax.errors import ConfigError, UserError
from llmjax.parallel import sharding
from llmjax.train import loop
from llmjax.train import setup as setuplib
from llmjax.treepaths import path_str

import _suiteA_helpers
import _xla
from _task_helpers import with_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("circle", "cross", "square")


def write_folder(root, per_class=16, size=12, seed=0):
  """ROOT/<class>/<i>.png: noisy RGB images whose class shows in where the bright pixels are."""
  rng = np.random.default_rng(seed)
  for c, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      image = rng.integers(0, 60, (size, size, 3), np.uint8)
      image[c * 4:c * 4 + 4, :, c] = 255
      Image.fromarray(image).save(os.path.join(root, name, f"{i}.png"))
  return str(root)


def experiment(folder, arch="resnet18", **train):
  """experiments/vision/fashion_resnet18.py:smoke (or the CNN's) on `folder`."""
  name = "mnist_cnn.py" if arch == "cnn" else "fashion_resnet18.py"
  c = config_lib.experiment_module(name, os.path.join(ROOT, "experiments", "vision", "x")) \
      .get_config("smoke")
  c.unlock()
  c.data.source, c.data.image_folder = "image_folder", folder
  if arch != "cnn":  # two stages of the smoke ResNet-18: BatchNorm everywhere, a short compile
    c.model.resnet_depths, c.model.resnet_widths = "1,1", "8,16"
  c.data.val_fraction = 0.25
  c.train.update({**dict(steps=6, batch_size=8, log_every=1, eval_every=100, checkpoint_every=3,
                         eval_batches=2, progress=False), **train})
  return config_lib.resolve(c)



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("images"))


def _first_step(exp, devices=None):
  """(loss, batch_stats after one step, the batch) of a fresh state on exp's mesh."""
  s = setuplib.prepare(exp, None, devices)
  state = loop.fresh_state(s)
  batch = next(loop._data_iterator(s, None))
  train_fn, _ = setuplib.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  return float(metrics["loss"]), jax.device_get(new_state.model_state), batch


def test_batchnorm_statistics_over_eight_devices_equal_one(folder):
  exp = experiment(folder)
  loss1, stats1, batch1 = _first_step(with_mesh(exp, 1, 1, "dp"), jax.devices()[:1])
  assert "batch_stats" in stats1
  for data, fsdp, rules in ((8, 1, "dp"), (1, 8, "fsdp")):
    loss, stats, batch = _first_step(with_mesh(exp, data, fsdp, rules))
    np.testing.assert_array_equal(batch["images"], batch1["images"])  # same augmented rows
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats, stats1)


def test_a_nonfinite_step_leaves_the_statistics_and_params_unchanged(folder):
  s = setuplib.prepare(with_mesh(experiment(folder), 1, 1, "dp"), None, jax.devices()[:1])
  state = loop.fresh_state(s)
  before = jax.device_get((state.params, state.model_state))
  batch = dict(next(loop._data_iterator(s, None)))
  batch["mask"] = batch["mask"].copy()
  batch["mask"][0] = np.nan  # a poisoned example weight: the loss is NaN, the statistics are not
  train_fn, _ = setuplib.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  assert metrics["nonfinite"] == 1.0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(
      (new_state.params, new_state.model_state)), before)


def _losses(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def _final_state(workdir):
  from llmjax.train import rundir
  run = rundir.restore(workdir)
  return jax.device_get((run.params, run.state.model_state))


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
  """A 6-step ResNet run on the folder (workdir), on one device (_suiteA_helpers): its step is
  the one-device step the tests above compile."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  with pytest.MonkeyPatch.context() as mp:
    _suiteA_helpers.on_one_device(mp)
    llmjax.train.run(experiment(folder), workdir)
  return workdir


def test_resume_is_exact_with_batch_statistics(folder, straight, tmp_path, monkeypatch):
  _suiteA_helpers.on_one_device(monkeypatch)  # as `straight` ran
  exp = experiment(folder, arch="resnet18")
  resumed = str(tmp_path / "resumed")
  llmjax.train.run(dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=3)),
                   resumed)
  llmjax.train.run(exp, resumed)  # picks up at step 3 with the saved batch_stats
  assert _losses(resumed) == _losses(straight)
  jax.tree.map(np.testing.assert_array_equal, _final_state(resumed), _final_state(straight))


def test_replaced_head_keeps_the_backbone_of_its_checkpoint(straight, tmp_path):
  source = straight
  other = write_folder(tmp_path / "other", per_class=8, seed=1)
  os.rename(os.path.join(other, "square"), os.path.join(other, "triangle"))  # new label set
  for name in ("a", "b"):
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(
        os.path.join(other, "triangle", f"{name}x.png"))
  exp = experiment(other, init_from=f"workdir:{source}", init_new="classifier/.*", steps=3)
  s = setuplib.prepare(exp, None)
  state = loop.fresh_state(s)
  loaded = {path_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  saved = {path_str(p): x for p, x in
           jax.tree_util.tree_flatten_with_path(_final_state(source)[0])[0]}
  backbone = [p for p in saved if not p.startswith("classifier/")]
  assert backbone and all(np.array_equal(loaded[p], saved[p]) for p in backbone)
  assert {p for p in loaded if p.startswith("classifier/")} == \
      {p for p in saved if p.startswith("classifier/")}
  # The running statistics belong to the backbone: they come with it.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state),
               _final_state(source)[1])


def test_init_from_an_hf_resnet_takes_its_shape_backbone_and_statistics(folder, tmp_path):
  import test_hf_resnet
  from llmjax import hf
  test_hf_resnet.make("basic", tmp_path / "hf")  # depths [1, 2], widths [8, 16], 3 labels
  exp = experiment(folder, init_from=f"hf:{tmp_path / 'hf'}", init_new="classifier/.*")
  # The experiment leaves the model section at its defaults: the checkpoint decides the shape.
  exp = dataclasses.replace(exp, model=config_lib.ModelConfig())
  s = setuplib.prepare(exp, None)
  assert (s.exp.model.arch, s.exp.model.resnet_depths, s.exp.model.resnet_widths) == \
      ("resnet", "1,2", "8,16")
  state = loop.fresh_state(s)
  _, params, model_state = hf.load(str(tmp_path / "hf"), with_model_state=True)
  ours = {path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    if not path_str(path).startswith("classifier/"):
      np.testing.assert_array_equal(ours[path_str(path)], x, err_msg=path_str(path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state),
               jax.device_get(model_state))


def test_a_checkpoint_head_of_another_label_count_is_refused_naming_it(straight, tmp_path):
  source = straight
  two = write_folder(tmp_path / "two", per_class=8)
  import shutil
  shutil.rmtree(os.path.join(two, "square"))
  with pytest.raises(UserError, match="classifier/kernel"):
    s = setuplib.prepare(experiment(two, init_from=f"workdir:{source}"), None)
    loop.fresh_state(s)


def test_num_classes_that_differ_from_the_data_are_refused(folder):
  exp = experiment(folder)
  exp = dataclasses.replace(exp, task=dataclasses.replace(exp.task, num_classes=5))
  with pytest.raises(ConfigError, match="num_classes=5 but the data has 3 labels"):
    setuplib.prepare(exp, None)


def test_cifar10_resnet50_smoke_runs_on_mock_tfds_data(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  _suiteA_helpers.on_one_device(monkeypatch)  # what is tested is not the devices
  # mock_data leaves is_prepared alone, which the tfds source checks before reading.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  c = config_lib.experiment_module("cifar10_resnet50.py", os.path.join(
      ROOT, "experiments", "vision", "x")).get_config("smoke")
  c.unlock()
  c.train.update(dict(steps=2, eval_batches=1, progress=False, batch_size=8))
  exp = config_lib.resolve(c)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = llmjax.train.run(exp, str(tmp_path / "run"))
  assert result["step"] == 2 and np.isfinite(result["loss"])
  assert result["examples"] > 0


def test_export_keeps_batch_statistics_and_hf_export_matches_torch(folder, tmp_path,
                                                                    monkeypatch):
  """llmjax export writes model_state/ beside params/; --out=hf: gives a ResNet transformers
  runs with llmjax's eval logits (ImageNet stem: HF has no small-image stem)."""
  import torch
  import transformers

  from llmjax.cli import export
  from llmjax.hf import convert
  from llmjax.train import rundir
  _suiteA_helpers.on_one_device(monkeypatch)  # what is tested is not the devices
  exp = experiment(folder, steps=2)
  exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, stem="imagenet"))
  workdir = str(tmp_path / "run")
  llmjax.train.run(exp, workdir)
  run = rundir.restore(workdir)
  export.export(workdir, str(tmp_path / "plain"))
  loaded = convert.load_export(str(tmp_path / "plain"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.model_state),
               jax.device_get(run.state.model_state))
  export.export(workdir, f"hf:{tmp_path / 'hf'}")
  images = np.random.default_rng(0).integers(0, 255, (4, 12, 12, 3), np.uint8)
  x_BHWC = run.task._normalised(jnp.asarray(images))
  ours = jax.jit(run.model.apply, static_argnames="deterministic")(
      {"params": run.params, **run.state.model_state}, x_BHWC, deterministic=True)
  hf_model = transformers.ResNetForImageClassification.from_pretrained(str(tmp_path / "hf"))
  with torch.no_grad():
    theirs = hf_model.eval()(torch.from_numpy(np.asarray(x_BHWC).transpose(0, 3, 1, 2))).logits
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


@pytest.mark.parametrize("problem", ["empty_class", "mixed_channels"])
def test_bad_image_input_is_one_line_exit_2_and_writes_nothing(folder, tmp_path, problem):
  import shutil
  import subprocess
  import sys
  data = str(tmp_path / "data")
  shutil.copytree(folder, data)
  args = []
  if problem == "empty_class":
    os.makedirs(os.path.join(data, "empty"))
  else:  # one grey image among RGB ones
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(os.path.join(data, "cross", "grey.png"))
  workdir = str(tmp_path / "run")
  done = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.main", "train",
       f"--config={ROOT}/experiments/vision/mnist_cnn.py:smoke", f"--workdir={workdir}",
       "--config.data.source=image_folder", f"--config.data.image_folder={data}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, XLA_FLAGS=_xla.xla_flags(), JAX_PLATFORMS="cpu"))
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert ("empty" in lines[0]) if problem == "empty_class" else ("grey.png" in lines[0]), lines
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("names", [[str(d) for d in range(10)],  # MNIST's digits
                                   ["T-shirt/top", "Ankle boot", "Bag"]])
def test_per_class_table_columns_align(names):
  """Every row of the per-class table ends each column where its header does."""
  from llmjax.eval import evaluate
  per_class = [{"name": n, "precision": 0.5 + i / 100, "recall": 1.0, "f1": 0.25,
                "support": 10 ** (i % 4)} for i, n in enumerate(names)]
  lines = evaluate.table({"accuracy": 0.9, "per_class": per_class}).split("\n\n", 1)[1]
  header, *rows = lines.splitlines()
  assert len(rows) == len(names)

  def column_ends(line):
    return [i + 1 for i in range(len(line)) if line[i] != " " and (i + 1 == len(line)
                                                                  or line[i + 1] == " ")]
  width = column_ends(header)[0]  # the class column, right-aligned under its header
  assert width >= len("class")
  for row in rows:
    assert row[width - 1] != " " and row[width] == " ", (header, row)
    ends = column_ends(row)
    assert ends[-4:] == column_ends(header)[-4:], (header, row)
    assert len(row) == len(header), (header, row)
