"""Rebuilds ``fashion_mnist_subset.npz`` from Debian's ``dataset-fashion-mnist`` package.

    apt-get install dataset-fashion-mnist
    python -m examples.imagenet.data.make_fashion_mnist_subset

Takes a class-balanced subset (600 train and 100 test images per class, chosen with a fixed seed,
kept in the original order) so that the examples and tests run offline on real images.
"""

import pathlib

import numpy as np

from examples.imagenet import input_pipeline

TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 100
SEED = 20180201  # any fixed value; the date of arXiv:1802.00930


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
           for c in range(int(labels.max()) + 1)]
  return np.sort(np.concatenate(picks))


def main():
  rng = np.random.default_rng(SEED)
  arrays = {}
  for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
    images, labels = input_pipeline.read_fashion_mnist_idx(
        input_pipeline.DEBIAN_FASHION_MNIST_DIR, split)
    keep = balanced_subset(labels, per_class, rng)
    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
  out = pathlib.Path(input_pipeline.SHIPPED_FASHION_MNIST)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): "
        + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
  main()
