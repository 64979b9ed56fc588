"""Tests of examples/imagenet/input_pipeline.py on real JPEGs made from the shipped images."""

import gzip
import os
import sys

import numpy as np
import pytest
from PIL import Image

from examples.imagenet import input_pipeline as ip

SIZE = 24
CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def subset():
  return ip.make_source("fashion_mnist_subset", "train")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, subset):
  """An ImageFolder tree of real JPEGs of assorted sizes: 3 classes, 7 train and 3 val each."""
  root = tmp_path_factory.mktemp("imagenet")
  for split, count, offset in (("train", 7, 0), ("val", 3, 100)):
    for c, wnid in enumerate(CLASSES):
      os.makedirs(root / split / wnid)
      for j in range(count):
        img, _ = subset.reader(offset + 10 * c + j)
        img = img.resize((20 + 7 * j, 48 - 4 * j), Image.BILINEAR)  # portrait to landscape
        img.save(root / split / wnid / f"{wnid}_{j}.JPEG", quality=90)
  (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
  return root


def batches(source, steps, **kwargs):
  kwargs = {"batch_size": 4, "train": True, "image_size": SIZE, "seed": 7, **kwargs}
  with ip.Loader(source, **kwargs) as loader:
    return [next(loader) for _ in range(steps)] if kwargs["train"] else list(loader)


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_image_folder_records(folder):
  train = ip.make_source("imagenet_folder", "train", str(folder))
  val = ip.make_source("imagenet_folder", "eval", str(folder))
  assert (train.num_classes, len(train.records), len(val.records)) == (3, 21, 9)
  assert [label for _, label in val.records] == [0] * 3 + [1] * 3 + [2] * 3
  assert all(path.endswith(".JPEG") and f"/{CLASSES[label]}/" in path
             for path, label in train.records)


def test_train_batches(folder):
  source = ip.make_source("imagenet_folder", "train", str(folder))
  out = batches(source, steps=12)  # 5 batches per epoch: crosses two epoch boundaries
  lo = (0 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD)
  hi = (255 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD)
  for batch in out:
    assert batch.keys() == {"image", "label"}
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= {0, 1, 2}
    assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
    assert batch["image"].std() > 0.1
  # Each epoch is a permutation: 5 batches of 4 cover 20 distinct examples out of 21.
  first_epoch = np.concatenate([b["label"] for b in out[:5]])
  assert np.bincount(first_epoch, minlength=3).min() >= 6
  # The same images come back in a later epoch with a different crop and flip.
  assert not np.array_equal(out[0]["image"], out[5]["image"])


def test_deterministic_by_seed(folder):
  source = ip.make_source("imagenet_folder", "train", str(folder))
  assert_same(batches(source, 6), batches(source, 6))
  other = batches(source, 6, seed=8)
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches(source, 6), other))


def test_worker_count_does_not_change_the_data(folder):
  source = ip.make_source("imagenet_folder", "train", str(folder))
  in_process = batches(source, 7)
  assert_same(in_process, batches(source, 7, num_workers=1))
  assert_same(in_process, batches(source, 7, num_workers=2, prefetch=3))
  val = ip.make_source("imagenet_folder", "eval", str(folder))
  assert_same(batches(val, 0, train=False), batches(val, 0, train=False, num_workers=2))


def test_start_step_resumes_the_order(folder):
  source = ip.make_source("imagenet_folder", "train", str(folder))
  assert_same(batches(source, 9)[6:], batches(source, 3, start_step=6, num_workers=1))


def test_eval_pass_pads_the_last_batch(folder):
  val = ip.make_source("imagenet_folder", "eval", str(folder))
  out = batches(val, 0, train=False)
  assert [b["mask"].tolist() for b in out] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
  assert np.concatenate([b["label"] for b in out])[:9].tolist() == [0] * 3 + [1] * 3 + [2] * 3
  assert np.all(out[-1]["image"][1:] == 0)


@pytest.mark.parametrize("batch_size", [0, -8])
def test_loader_refuses_a_batch_size_below_one(subset, batch_size):
  # -8 made a negative steps_per_epoch, and a training loader that never yielded a batch.
  with pytest.raises(ValueError, match=f"batch_size must be at least 1, got {batch_size}"):
    ip.Loader(subset, batch_size=batch_size, train=True, image_size=SIZE)


def test_workers_shut_down(folder):
  source = ip.make_source("imagenet_folder", "train", str(folder))
  loader = ip.Loader(source, batch_size=4, train=True, image_size=SIZE, num_workers=2)
  pids = loader.worker_pids
  next(loader)
  assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
  loader.close()
  assert not any(pid_alive(pid) for pid in pids)
  loader.close()  # idempotent
  with pytest.raises(KeyError):  # an exception inside the block still stops the workers
    with ip.Loader(source, batch_size=4, train=True, image_size=SIZE, num_workers=1) as loader:
      pids = loader.worker_pids
      raise KeyError
  assert not any(pid_alive(pid) for pid in pids)


def pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_worker_errors_reach_the_caller(tmp_path):
  for split in ("train", "val"):
    os.makedirs(tmp_path / split / "n0")
    (tmp_path / split / "n0" / "broken.JPEG").write_bytes(b"not a jpeg")
  source = ip.make_source("imagenet_folder", "train", str(tmp_path))
  with pytest.raises(RuntimeError, match="broken.JPEG"):
    batches(source, 1, batch_size=1, num_workers=1)


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for width, height in [(500, 375), (28, 28), (40, 300), (300, 20)]:
    for _ in range(200):
      left, top, w, h = ip.random_resized_crop_box(width, height, rng)
      assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 < h
      if (w, h) != (width, height) and width / height in (500 / 375, 1.0):
        # Not the fallback: the area and the aspect ratio were drawn in range (up to rounding).
        assert 0.08 * width * height * 0.8 <= w * h
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
  boxes = {ip.random_resized_crop_box(500, 375, np.random.default_rng(s)) for s in range(50)}
  assert len(boxes) == 50


def test_eval_transform_is_the_centre_crop():
  pixels = np.random.default_rng(1).integers(0, 256, (37, 37, 3), dtype=np.uint8)
  # 37 = round(32 / 0.875): no resize, so the result is exactly the central 32x32 block.
  np.testing.assert_array_equal(ip.eval_transform(Image.fromarray(pixels), 32), pixels[2:34, 2:34])
  wide = ip.eval_transform(Image.fromarray(np.zeros((20, 80, 3), np.uint8)), 32)
  assert wide.shape == (32, 32, 3) and wide.dtype == np.uint8


def test_fashion_mnist_subset_is_balanced(subset):
  assert len(subset.records) == 6000
  assert len(ip.make_source("fashion_mnist_subset", "eval").records) == 1000
  with np.load(ip.SHIPPED_FASHION_MNIST) as data:
    for split, per_class in (("train", 600), ("test", 100)):
      images, labels = data[f"{split}_images"], data[f"{split}_labels"]
      assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
      assert np.bincount(labels).tolist() == [per_class] * 10
      assert images.mean() > 50  # real pictures, not blank
  batch = batches(subset, 1, image_size=32)[0]
  assert batch["image"].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # grey as RGB


def write_idx(directory, prefix, images, labels):
  with gzip.open(directory / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
    f.write(np.array([2051, *images.shape], ">i4").tobytes() + images.tobytes())
  with gzip.open(directory / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
    f.write(np.array([2049, len(labels)], ">i4").tobytes() + labels.tobytes())


def test_fashion_mnist_prefers_the_full_set(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
  labels = (np.arange(12) % 10).astype(np.uint8)
  write_idx(tmp_path, "train", images, labels)
  write_idx(tmp_path, "t10k", images[:5], labels[:5])
  train = ip.make_source("fashion_mnist", "train", str(tmp_path))
  assert len(train.records) == 12 and str(tmp_path) in train.description
  img, label = train.reader(3)
  np.testing.assert_array_equal(np.asarray(img)[..., 1], images[3])
  assert label == 3
  assert len(ip.make_source("fashion_mnist", "eval", str(tmp_path)).records) == 5
  assert len(ip.make_source("fashion_mnist_subset", "train", str(tmp_path)).records) == 6000


def test_fashion_mnist_falls_back_to_the_subset_only_without_a_data_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(ip, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "debian"))
  assert len(ip.make_source("fashion_mnist", "train").records) == 6000
  # A folder named by --data_dir that lacks the IDX files is a mistake, not a request for the
  # subset.
  with pytest.raises(FileNotFoundError, match=f"looked at {tmp_path}/none/"):
    ip.make_source("fashion_mnist", "train", str(tmp_path / "none"))


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train") as error:
    ip.make_source("imagenet_folder", "train", str(tmp_path))
  assert str(error.value).count("train/") == 1
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/train/.* and {tmp_path}/val/"):
    ip.make_source("imagenet_folder", "eval", str(tmp_path))
  with pytest.raises(ValueError, match="--data_dir"):
    ip.make_source("imagenet_folder", "train")
  monkeypatch.setattr(ip, "SHIPPED_FASHION_MNIST", str(tmp_path / "missing.npz"))
  monkeypatch.setattr(ip, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "debian"))
  with pytest.raises(FileNotFoundError, match="missing.npz") as error:
    ip.make_source("fashion_mnist", "train")
  assert f"{tmp_path}/debian" in str(error.value)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ImportError, match="tensorflow_datasets"):
    ip.make_source("imagenet_tfds", "train")
  with pytest.raises(ValueError, match="unknown dataset"):
    ip.make_source("cifar10", "train")
