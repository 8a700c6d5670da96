"""llmjax.cluster: mean shift equal to scikit-learn's MeanShift (centers and partition, with and
without bin seeding), blocked == unblocked == 8 devices, the Gaussian kernel's fixed points, bad
input, `llmjax segment` (in-process), and a trained CNN's features (llmjax.eval.features)."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

import llmjax.train
from llmjax import cluster
from llmjax import config as config_lib
from llmjax import tasks
from llmjax.cli import segment
from llmjax.eval import features
from llmjax.models.apply import apply_model
from llmjax.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blobs(n=120, d=2, std=0.6, seed=0):
  from sklearn.datasets import make_blobs  # here: sklearn's import costs every pytest worker seconds
  return make_blobs(n_samples=n, centers=3, n_features=d, cluster_std=std, random_state=seed,
                    return_centers=True)


def _canonical(centers_KD, labels_N):
  """Centers in lexicographic order and the labels renamed to match (orphans stay -1)."""
  order = np.lexsort(centers_KD.T[::-1])
  rank = np.empty(len(order), int)
  rank[order] = np.arange(len(order))
  return centers_KD[order], np.where(labels_N >= 0, rank[np.maximum(labels_N, 0)], -1)


def _assert_same(ours, theirs, atol=1e-4):
  (ours_KD, ours_N), (theirs_KD, theirs_N) = _canonical(*ours), _canonical(*theirs)
  assert ours_KD.shape == theirs_KD.shape, (ours_KD, theirs_KD)
  np.testing.assert_allclose(ours_KD, theirs_KD, atol=atol)
  np.testing.assert_array_equal(ours_N, theirs_N)


def test_equals_sklearn_mean_shift():
  from sklearn import cluster as sk_cluster
  x_ND, _, _ = _blobs()
  x3_ND, _, _ = _blobs(n=90, d=3, std=1.0, seed=1)
  x40_ND, _, _ = _blobs(n=60, d=40, std=1.0, seed=4)  # over 32 features: matmul distances
  cases = [(x_ND, dict(bandwidth=2.0)), (x_ND, dict(bandwidth=2.0, bin_seeding=True)),
           (x3_ND, dict(bandwidth=1.5, bin_seeding=True, min_bin_freq=2)),
           (x3_ND, dict(bandwidth=1.2, cluster_all=False)), (x_ND, dict(bandwidth=None)),
           (x40_ND, dict(bandwidth=7.0))]
  orphans = 0
  for points, options in cases:
    theirs = sk_cluster.MeanShift(**options).fit(points)
    ours = cluster.mean_shift(points, **options)
    _assert_same(ours, (theirs.cluster_centers_, theirs.labels_))
    orphans += int(np.sum(ours[1] == -1))
  assert orphans > 0  # cluster_all=False met points beyond every center's bandwidth
  for options in (dict(), dict(quantile=0.5), dict(n_samples=40, seed=3)):
    sk_options = {("random_state" if k == "seed" else k): v for k, v in options.items()}
    np.testing.assert_allclose(cluster.estimate_bandwidth(x_ND, **options),
                               sk_cluster.estimate_bandwidth(x_ND, **sk_options), rtol=1e-5)


def test_blocked_and_sharded_equal_one_block_on_one_device():
  x_ND, _, _ = _blobs(n=150, d=2, std=0.9, seed=2)
  whole = cluster.mean_shift(x_ND, 1.0, block=len(x_ND))
  blocked = cluster.mean_shift(x_ND, 1.0, block=8)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  sharded = cluster.mean_shift(x_ND, 1.0, block=8, mesh=mesh)
  assert len(whole[0]) > 3  # a small bandwidth: several modes, so the partition says something
  _assert_same(blocked, whole, atol=1e-5)
  _assert_same(sharded, whole, atol=1e-5)


def test_gaussian_kernel_converges_to_the_modes():
  x_ND, y_N, true_KD = _blobs(n=120, d=2, std=0.4, seed=3)
  bandwidth = 0.8
  centers_KD, labels_N = cluster.mean_shift(x_ND, bandwidth, kernel="gaussian")
  assert len(centers_KD) == 3
  assert cluster.purity(labels_N, y_N) == 1.0
  nearest_K = np.argmin(np.linalg.norm(centers_KD[:, None] - true_KD[None], axis=-1), axis=1)
  assert sorted(nearest_K) == [0, 1, 2]
  np.testing.assert_allclose(centers_KD, true_KD[nearest_K], atol=0.3)
  # A mode is a fixed point: one more Gaussian mean-shift step (numpy, float64) stays put.
  weights_KN = np.exp(-np.sum((centers_KD[:, None] - x_ND[None]) ** 2, -1) / (2 * bandwidth ** 2))
  step_KD = weights_KN @ x_ND / weights_KN.sum(1, keepdims=True)
  assert np.max(np.linalg.norm(step_KD - centers_KD, axis=1)) <= 2e-3 * bandwidth


def test_bad_input_names_what_is_wrong():
  x_ND, _, _ = _blobs(n=20)
  nan_ND = x_ND.copy()
  nan_ND[3, 1] = np.nan
  for call, words in [(lambda: cluster.mean_shift(nan_ND, 1.0), "finite"),
                      (lambda: cluster.mean_shift(np.zeros((0, 2)), 1.0), "empty"),
                      (lambda: cluster.mean_shift(x_ND, 0.0), "bandwidth"),
                      (lambda: cluster.mean_shift(x_ND, -1), "bandwidth"),
                      (lambda: cluster.mean_shift(x_ND, float("nan")), "bandwidth"),
                      (lambda: cluster.mean_shift(x_ND, 1.0, kernel="cosine"), "kernel"),
                      (lambda: cluster.mean_shift(x_ND[:, 0], 1.0), "2-D"),
                      (lambda: cluster.estimate_bandwidth(x_ND, quantile=2), "quantile")]:
    with pytest.raises(ValueError, match=words) as raised:
      call()
    assert isinstance(raised.value, cluster.ClusterError)
  assert cluster.purity([0, 0, 1, 1, -1], ["a", "a", "b", "a", "b"]) == pytest.approx(0.6)


def test_segment_cli(tmp_path, capsys):
  pixels_HWC = np.zeros((12, 16, 3), np.uint8)
  pixels_HWC[:, :8] = (200, 30, 30)
  pixels_HWC[:, 8:] = (20, 40, 220)
  pixels_HWC[5, 3] = (190, 35, 28)  # a little noise inside the red half
  Image.fromarray(pixels_HWC).save(tmp_path / "in.png")
  out = tmp_path / "sub" / "out.png"
  segment.main(["llmjax segment", f"--image={tmp_path / 'in.png'}", f"--out={out}",
                "--bandwidth=0.3", "--spatial_weight=0.2"])
  assert capsys.readouterr().out.startswith("2 regions (bandwidth 0.3) -> ")
  written_HWC = np.asarray(Image.open(out))
  assert written_HWC.shape == pixels_HWC.shape
  colours = {tuple(c) for c in written_HWC.reshape(-1, 3)}
  assert len(colours) == 2 and tuple(written_HWC[5, 3]) == tuple(written_HWC[0, 0])
  for flags, words in [(["--bandwidth=0"], "--bandwidth must be"),
                       (["--image=" + str(tmp_path / "missing.png")], "cannot read it"),
                       (["--spatial_weight=-1"], "--spatial_weight must be")]:
    bad = tmp_path / "bad.png"
    argv = [f"--image={tmp_path / 'in.png'}", f"--out={bad}"] + flags
    with pytest.raises(SystemExit) as raised:
      segment.main(["llmjax segment"] + argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not bad.exists()


def _write_folder(root, per_class=8, size=8):
  """ROOT/<class>/<i>.png: noisy images whose class shows in which rows are bright."""
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / f"class{c}")
    for i in range(per_class):
      image = rng.integers(0, 60, (size, size, 3), np.uint8)
      image[c * 2:c * 2 + 2, :, :] = 255
      Image.fromarray(image).save(root / f"class{c}" / f"{i}.png")
  return str(root)


def test_features_of_a_trained_cnn(tmp_path):
  c = config_lib.experiment_module("mnist_cnn.py", os.path.join(ROOT, "experiments", "vision",
                                                                "x")).get_config("smoke")
  c.unlock()
  c.data.source, c.data.image_folder = "image_folder", _write_folder(tmp_path / "images")
  c.data.val_fraction = 0.25
  c.model.cnn_widths, c.model.cnn_hidden = "4", 16
  c.train.update(dict(steps=2, batch_size=8, log_every=1, eval_every=100, checkpoint_every=2,
                      eval_batches=1, progress=False))
  workdir = str(tmp_path / "run")
  llmjax.train.run(config_lib.resolve(c), workdir)
  feats_ND, labels_N = features.run_features(workdir, split="val")
  # The same rows, straight from the model: the val split's images, normalised as the task does.
  run = rundir.restore(workdir)
  task, data = tasks.setup(run.exp, workdir)
  n = len(data.val["labels"])
  assert n >= 4 and feats_ND.shape == (n, 16) and labels_N.shape == (n,)
  images = (data.val["images"] / 255.0 - np.asarray(task.info["mean"])) / np.asarray(
      task.info["std"])
  (_, hidden_ND), _ = apply_model(run.model, {"params": run.params}, images.astype(np.float32),
                                  train=False, rng=None, hidden=True, deterministic=True)
  np.testing.assert_allclose(feats_ND, hidden_ND, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels_N, data.val["labels"])
  _, clusters_N = cluster.mean_shift(feats_ND, cluster.estimate_bandwidth(feats_ND) + 1e-3)
  assert 0 < cluster.purity(clusters_N, labels_N) <= 1
