"""Input pipelines: ImageNet from an ImageFolder tree or tfds, and offline Fashion-MNIST.

Batches are dicts of NumPy arrays: ``image`` float32 (B, H, W, 3), normalised by the dataset's
per-channel mean/std; ``label`` int32 (B,); evaluation batches also carry ``mask`` float32 (B,),
0 on the padding of the last batch.

Everything is deterministic in ``seed``: the order of epoch e is a permutation drawn from
(seed, e) and the augmentation of example i in epoch e from (seed, e, i), whichever process
decodes it. So the worker count does not change the data, and a run resumed at step s sees
exactly the batches an uninterrupted run sees (``start_step``). A process of a data-parallel run
loads only its block of rows of every global batch (``shard``); the blocks of all processes,
in process order, are the single process's batch.

This module imports no JAX, so that worker processes start quickly.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import multiprocessing
import os
import pathlib
import queue
import signal
import traceback
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Fashion-MNIST's pixel statistics (train split), replicated over the three channels.
FASHION_MNIST_MEAN = (0.2860 * 255,) * 3
FASHION_MNIST_STD = (0.3530 * 255,) * 3

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SHIPPED_FASHION_MNIST = str(pathlib.Path(__file__).parent / "data" / "fashion_mnist_subset.npz")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Fashion-MNIST datasets by which files they read (see _fashion_mnist_path).
FASHION_MNIST_DATASETS = {"fashion_mnist": "auto", "fashion_mnist_full": "full",
                          "fashion_mnist_subset": "subset"}
DATASETS = ("imagenet_folder", "imagenet_tfds", *FASHION_MNIST_DATASETS)
# The centre crop keeps 87.5% of the shorter side (224 of 256), as is standard for ImageNet.
EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a dataset.

  Attributes:
    records: one picklable item per example; ``reader(record)`` gives ``(RGB PIL image, label)``.
    reader: picklable callable, run in the worker processes.
    num_classes: number of labels.
    mean, std: per-channel normalisation on the 0..255 scale.
    description: where the data came from, for logs.
  """
  records: Sequence[Any]
  reader: Callable[[Any], tuple[Image.Image, int]]
  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  description: str


# ----------------------------------------------------------------------------- ImageFolder


def read_image_file(record: tuple[str, int]) -> tuple[Image.Image, int]:
  path, label = record
  with Image.open(path) as img:
    return img.convert("RGB"), label


def _class_dirs(split_dir: pathlib.Path) -> list[str]:
  return sorted(d.name for d in os.scandir(split_dir) if d.is_dir())


def image_folder_source(root: str, split: str) -> Source:
  """``root/{train,val}/<class>/*.JPEG``; labels index the sorted class folders of ``train/``."""
  split_dir = pathlib.Path(root) / split
  train_dir = pathlib.Path(root) / "train"
  if not split_dir.is_dir() or not train_dir.is_dir():
    looked = " and ".join(f"{d}/<class>/*.JPEG" for d in dict.fromkeys((train_dir, split_dir)))
    raise FileNotFoundError(f"no ImageFolder tree: looked for {looked}")
  classes = _class_dirs(train_dir)
  index = {name: i for i, name in enumerate(classes)}
  unknown = sorted(set(_class_dirs(split_dir)) - set(index))
  if unknown:
    raise ValueError(f"{split_dir} has classes missing from {train_dir}: {unknown[:5]}")
  records = []
  for name in _class_dirs(split_dir):
    files = sorted(f.name for f in os.scandir(split_dir / name)
                   if f.name.lower().endswith(IMAGE_EXTENSIONS))
    records.extend((str(split_dir / name / f), index[name]) for f in files)
  if not records:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}")
  return Source(records, read_image_file, len(classes), IMAGENET_MEAN, IMAGENET_STD,
                f"ImageFolder {split_dir} ({len(records)} images, {len(classes)} classes)")


# ----------------------------------------------------------------------------- tfds


class TfdsReader:
  """Random access to a prepared tfds dataset; opened lazily in each process."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._source = None

  def open(self):
    if self._source is None:
      try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            "dataset 'imagenet_tfds' needs tensorflow_datasets (pip install tensorflow-datasets) "
            f"and {self.name} prepared with file_format=array_record under --data_dir; or use "
            "dataset 'imagenet_folder'") from e
      self._source = tfds.data_source(
          self.name, split=self.split, data_dir=self.data_dir, download=False,
          decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __call__(self, index: int) -> tuple[Image.Image, int]:
    example = self.open()[index]
    return Image.open(io.BytesIO(example["image"])).convert("RGB"), int(example["label"])

  def __getstate__(self):
    return {**self.__dict__, "_source": None}


def tfds_source(split: str, data_dir: str | None, name: str = "imagenet2012") -> Source:
  """tfds ``imagenet2012``, already prepared in the array_record format; never downloads."""
  reader = TfdsReader(name, split, data_dir)
  n = len(reader.open())
  return Source(range(n), reader, 1000, IMAGENET_MEAN, IMAGENET_STD,
                f"tfds {name}:{split} ({n} images)")


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_fashion_mnist_idx(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads the original gzipped IDX files (``train-*`` or ``t10k-*``)."""
  prefix = "train" if split == "train" else "t10k"

  def read(kind: str, magic: int, header_ints: int) -> np.ndarray:
    path = os.path.join(directory, f"{prefix}-{kind}-idx{header_ints - 1}-ubyte.gz")
    with gzip.open(path) as f:
      header = np.frombuffer(f.read(4 * header_ints), ">i4")
      if header[0] != magic:
        raise ValueError(f"{path} is not an IDX file (magic {header[0]}, expected {magic})")
      return np.frombuffer(f.read(), np.uint8).reshape(header[1:])

  return read("images", 2051, 4), read("labels", 2049, 2)


def _fashion_mnist_path(data_dir: str | None, which: str) -> str:
  """``which``: "full" (Debian's set, required), "auto" (the full set when present, else the
  shipped subset) or "subset". A ``data_dir`` given for "auto" must hold the full set: the
  subset is the fallback for Debian's folder only, not for a folder named by mistake."""
  directory = data_dir or DEBIAN_FASHION_MNIST_DIR
  full_looked = os.path.join(directory, "{train,t10k}-*-idx*-ubyte.gz")
  if which != "subset" and os.path.exists(os.path.join(directory, "train-images-idx3-ubyte.gz")):
    return directory
  if which == "full":
    raise FileNotFoundError(
        f"dataset 'fashion_mnist_full' needs the full Fashion-MNIST at {full_looked} (Debian: "
        "apt-get install dataset-fashion-mnist; or --data_dir to a folder of the IDX files)")
  if which == "auto" and data_dir:
    raise FileNotFoundError(f"no Fashion-MNIST in --data_dir: looked at {full_looked} (without "
                            "--data_dir, dataset 'fashion_mnist' falls back to the shipped subset)")
  if os.path.exists(SHIPPED_FASHION_MNIST):
    return SHIPPED_FASHION_MNIST
  looked = ([full_looked] if which == "auto" else []) + [SHIPPED_FASHION_MNIST]
  raise FileNotFoundError(f"no Fashion-MNIST: looked at {looked}")


def _load_fashion_mnist(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  if path.endswith(".npz"):
    with np.load(path) as data:
      key = "train" if split == "train" else "test"
      return data[f"{key}_images"], data[f"{key}_labels"]
  return read_fashion_mnist_idx(path, split)


class FashionMNISTReader:
  """Index -> grey image as RGB; the arrays are loaded once per process."""

  def __init__(self, path: str, split: str, arrays=None):
    self.path, self.split, self._arrays = path, split, arrays

  def __call__(self, index: int) -> tuple[Image.Image, int]:
    if self._arrays is None:
      self._arrays = _load_fashion_mnist(self.path, self.split)
    images, labels = self._arrays
    return Image.fromarray(images[index]).convert("RGB"), int(labels[index])

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}  # workers reload instead of unpickling 47 MB


def fashion_mnist_source(split: str, data_dir: str | None = None, which: str = "auto") -> Source:
  path = _fashion_mnist_path(data_dir, which)
  arrays = _load_fashion_mnist(path, split)
  n = len(arrays[1])
  return Source(range(n), FashionMNISTReader(path, split, arrays), 10, FASHION_MNIST_MEAN,
                FASHION_MNIST_STD, f"Fashion-MNIST {split} from {path} ({n} images)")


def check_dataset(dataset: str, data_dir: str | None):
  """Raises ValueError where ``make_source`` could not open ``dataset`` for what its name and
  ``data_dir`` say alone (no file is read): an unknown name, an ImageFolder without its folder."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; available: {DATASETS}")
  if dataset == "imagenet_folder" and not data_dir:
    raise ValueError("dataset 'imagenet_folder' needs --data_dir (the folder holding train/ "
                     "and val/)")


def make_source(dataset: str, split: str, data_dir: str | None = None) -> Source:
  """``split`` is ``"train"`` or ``"eval"``; ``dataset`` one of ``DATASETS``."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  check_dataset(dataset, data_dir)
  train = split == "train"
  if dataset == "imagenet_folder":
    return image_folder_source(data_dir, "train" if train else "val")
  if dataset == "imagenet_tfds":
    return tfds_source("train" if train else "validation", data_dir)
  return fashion_mnist_source("train" if train else "test", data_dir,
                              FASHION_MNIST_DATASETS[dataset])


# ----------------------------------------------------------------------------- preprocessing


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box (left, top, w, h): ten tries, then a centre crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, rng: np.random.Generator, size: int,
                    scale=(0.08, 1.0)) -> np.ndarray:
  """Random-resized crop to size x size and a random horizontal flip; uint8 (size, size, 3)."""
  left, top, w, h = random_resized_crop_box(*img.size, rng, scale)
  img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(img, np.uint8)


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
  """Shorter side to size/0.875, then the central size x size crop; uint8 (size, size, 3)."""
  resize = round(size / EVAL_CROP_FRACTION)
  w, h = img.size
  scale = resize / min(w, h)
  w, h = max(size, round(w * scale)), max(size, round(h * scale))
  img = img.resize((w, h), Image.BILINEAR)
  left, top = (w - size) // 2, (h - size) // 2
  return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def load_batch(reader, records, seeds, size: int, scale) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and transforms one batch; ``seeds`` is None for evaluation."""
  images, labels = [], []
  for i, record in enumerate(records):
    img, label = reader(record)
    if seeds is None:
      images.append(eval_transform(img, size))
    else:
      images.append(train_transform(img, np.random.default_rng(seeds[i]), size, scale))
    labels.append(label)
  if not images:  # a process's block lying wholly in the padding of the last eval batch
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
  return np.stack(images), np.asarray(labels, np.int32)


def _worker_loop(reader, tasks: multiprocessing.Queue, results: multiprocessing.Queue):
  # Ctrl-C goes to the whole process group; the parent shuts the workers down.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # Exit without waiting for prefetched batches that the parent will never read.
  results.cancel_join_thread()
  while (task := tasks.get()) is not None:
    try:
      results.put(("ok", load_batch(reader, *task)))
    except Exception:  # pylint: disable=broad-except
      results.put(("error", traceback.format_exc()))


# ----------------------------------------------------------------------------- loader


def steps_per_epoch(source: Source, batch_size: int, train: bool = True) -> int:
  """The batches of one pass over ``source``: whole ones when training (the rest is dropped),
  all of it when evaluating (the last batch padded)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  n = len(source.records)
  steps = n // batch_size if train else math.ceil(n / batch_size)
  if steps == 0:
    raise ValueError(f"{source.description}: fewer examples than one batch of {batch_size}")
  return steps


class Loader:
  """Iterator over the batches of one split, decoded in ``num_workers`` processes.

  Training iterates forever from ``start_step`` (the remainder of each epoch is dropped);
  evaluation makes one pass and pads the last batch. ``num_workers=0`` decodes in this process.
  Use as a context manager, or call ``close()``, to stop the workers.

  ``batch_size`` is the global batch; with ``shard=(index, count)`` this loader yields only rows
  [index * batch_size / count, (index + 1) * batch_size / count) of each one (padding included).
  """

  def __init__(self, source: Source, *, batch_size: int, train: bool, image_size: int,
               seed: int = 0, start_step: int = 0, num_workers: int = 0, prefetch: int = 2,
               crop_scale=(0.08, 1.0), shard: tuple[int, int] = (0, 1)):
    self._workers = []
    self.steps_per_epoch = steps_per_epoch(source, batch_size, train)
    index, count = shard
    if count < 1 or not 0 <= index < count or batch_size % count:
      raise ValueError(f"shard must be (index, count) with 0 <= index < count and count dividing "
                       f"batch_size {batch_size}, got {shard}")
    self.local_batch_size = batch_size // count
    self._rows = slice(index * self.local_batch_size, (index + 1) * self.local_batch_size)
    self.source, self.batch_size, self.train = source, batch_size, train
    self.image_size, self.seed, self.crop_scale = image_size, seed, tuple(crop_scale)
    self._tasks = self._task_stream(start_step)
    self._mean = np.asarray(source.mean, np.float32)
    self._std = np.asarray(source.std, np.float32)
    self._sent = self._received = 0
    self._in_flight = max(1, num_workers * prefetch)
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX has started threads
    for _ in range(num_workers):
      tasks, results = ctx.Queue(), ctx.Queue()
      proc = ctx.Process(target=_worker_loop, args=(source.reader, tasks, results), daemon=True)
      proc.start()
      self._workers.append((proc, tasks, results))

  @property
  def worker_pids(self) -> list[int]:
    return [proc.pid for proc, _, _ in self._workers]

  def epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.source.records))

  def _task_stream(self, start_step: int) -> Iterator[tuple]:
    records, bs = self.source.records, self.batch_size
    if not self.train:
      for b in range(self.steps_per_epoch):
        batch = range(b * bs, min((b + 1) * bs, len(records)))[self._rows]
        yield [records[i] for i in batch], None
      return
    epoch, batch = divmod(start_step, self.steps_per_epoch)
    while True:
      order = self.epoch_order(epoch)
      for b in range(batch, self.steps_per_epoch):
        idx = order[b * bs:(b + 1) * bs][self._rows]
        yield [records[i] for i in idx], [(self.seed, epoch, int(i)) for i in idx]
      epoch, batch = epoch + 1, 0

  def _send(self):
    while self._sent - self._received < self._in_flight:
      task = next(self._tasks, None)
      if task is None:
        return
      _, tasks, _ = self._workers[self._sent % len(self._workers)]
      tasks.put(task + (self.image_size, self.crop_scale))
      self._sent += 1

  def _receive(self):
    proc, _, results = self._workers[self._received % len(self._workers)]
    while True:
      try:
        status, payload = results.get(timeout=1.0)
        break
      except queue.Empty:
        if not proc.is_alive():
          raise RuntimeError(f"input worker {proc.pid} died (exit code {proc.exitcode})") from None
    self._received += 1
    if status == "error":
      raise RuntimeError(f"input worker {proc.pid} failed:\n{payload}")
    return payload

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._workers:
      self._send()
      if self._received == self._sent:
        raise StopIteration
      images, labels = self._receive()
      self._send()
    else:
      records, seeds = next(self._tasks)
      images, labels = load_batch(self.source.reader, records, seeds, self.image_size,
                                  self.crop_scale)
    batch = {"image": (images.astype(np.float32) - self._mean) / self._std, "label": labels}
    if not self.train:
      pad = self.local_batch_size - len(labels)
      batch["mask"] = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
      batch["image"] = np.pad(batch["image"], [(0, pad), (0, 0), (0, 0), (0, 0)])
      batch["label"] = np.pad(labels, (0, pad))
    return batch

  def close(self):
    """Stops the workers (idempotent)."""
    for proc, tasks, _ in self._workers:
      if proc.is_alive():
        tasks.put(None)
    for proc, tasks, results in self._workers:
      proc.join(timeout=10)
      if proc.is_alive():
        proc.terminate()
        proc.join()
      tasks.close()
      results.close()
    self._workers = []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    self.close()
