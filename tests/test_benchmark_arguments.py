"""The benchmark scripts' command lines: a bad argument stops the run before it measures.

A count of zero, an unknown name or an unwritable ``--json`` once ran the measurement (minutes
to hours) and then printed NaN rows, timed the wrong thing or failed to save; each is now an
argparse error naming the flag (exit status 2). Only argument parsing runs here.
"""

import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def load():
  """Imports a benchmark script; the folder stays on sys.path, where their ``common`` is."""
  sys.path.insert(0, str(BENCHMARKS))
  yield importlib.import_module
  sys.path.remove(str(BENCHMARKS))


def _refused(script, argv, flag, capsys):
  with pytest.raises(SystemExit) as exit_:
    script.parse_args(argv)
  assert exit_.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]  # after the usage, which names all
  assert ": error: " in error and flag in error, error


@pytest.mark.parametrize("name, argv, flag", [
    ("matmul", ["--repeats", "0"], "--repeats"),
    ("matmul", ["--batch", "0"], "--batch"),
    ("matmul", ["--peak-gops", "-5"], "--peak-gops"),
    ("matmul", ["--peak-gops", "0"], "--peak-gops"),
    ("conv", ["--repeats", "0"], "--repeats"),
    ("conv", ["--batch", "-1"], "--batch"),
    ("conv", ["--layers", "conv5_3x33"], "--layers"),
    ("batch_norm_sums", ["--batch", "0"], "--batch"),
    ("batch_norm_sums", ["--repeats", "0"], "--repeats"),
    ("transform_overhead", ["--calls", "0"], "--calls"),
    ("transform_overhead", ["--batch_size", "0"], "--batch_size"),
    ("transform_overhead", ["--networks", "bogus"], "--networks"),
    ("accelerator", ["--repeats", "0"], "--repeats"),
    ("accelerator", ["--sizes", "abc"], "--sizes"),
    ("sharded_step", ["--modes", "bogus"], "--modes"),
    ("sharded_step", ["--states", "zero"], "--states"),
    ("sharded_step", ["--devices", "0"], "--devices"),
    ("sharded_step", ["--devices", "3"], "--devices"),  # 3 does not divide the batch of 32
    ("sharded_step", ["--steps", "0"], "--steps"),
    ("sharded_step", ["--network", "bogus"], "--network"),
    ("train_step", ["--batches", ""], "--batches"),
    ("train_step", ["--batches", "16,abc"], "--batches"),
    ("train_step", ["--image-size", "0"], "--image-size"),
    ("train_step", ["--networks", "resnet50,bogus"], "--networks"),
    ("train_step", ["--profile-steps", "-1"], "--profile-steps"),
    ("matmul", ["--shapes", "abc"], "shape 'abc' is not MxKxN"),
])
def test_a_bad_value_is_refused_naming_its_flag(load, name, argv, flag, capsys):
  _refused(load(name), argv, flag, capsys)


@pytest.mark.parametrize("name", ["matmul", "conv", "transform_overhead", "accelerator",
                                  "sharded_step", "train_step"])
def test_an_unwritable_json_path_is_refused_before_measuring(load, name, tmp_path, capsys):
  _refused(load(name), ["--json", str(tmp_path / "missing" / "rows.json")], "--json", capsys)


def test_a_writable_json_path_is_left_as_it_was(load, tmp_path):
  common = load("common")
  new, old = tmp_path / "new.json", tmp_path / "old.json"
  old.write_text("kept")
  assert common.writable_path(str(new)) == str(new) and not new.exists()
  assert common.writable_path(str(old)) == str(old) and old.read_text() == "kept"


def test_quick_sets_only_what_is_not_given(load):
  conv = load("conv").parse_args(["--quick", "--layers", "conv5_3x3", "--batch", "8"])
  assert (conv.layers, conv.batch, conv.repeats) == (["conv5_3x3"], 8, 3)
  sharded = load("sharded_step").parse_args(["--quick", "--steps", "3", "--batch", "16"])
  assert (sharded.steps, sharded.batch, sharded.image_size) == (3, 16, 32)
  train = load("train_step").parse_args(["--quick", "--image-size", "64"])
  assert (train.image_size, train.batches) == (64, [8])
