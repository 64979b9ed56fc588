"""Tests of examples/imagenet/study_diagnose.py: a study's settings diagnosed on its trained FP32
weights, the summary per pass, and the error when the FP32 run is missing."""

import dataclasses
import json
import os

import numpy as np
import pytest

from examples.imagenet import main, study, study_diagnose

# A two-convolution VGG on the shipped subset, FP32 trained for 4 steps; 16 and 6 bits diagnosed.
TINY_STUDY = '''
from examples.imagenet import study
from examples.imagenet.configs.base import Config

def get_config():
  return Config(model="vgg16", model_kwargs={"layers": (8, "M", 16, "M"), "hidden": 32},
                dataset="fashion_mnist_subset", image_size=16, num_workers=0, batch_size=32,
                base_learning_rate=0.4, lr_schedule="cosine", warmup_epochs=0.0, num_epochs=1.0,
                num_train_steps=4, log_every_steps=2, eval_every_steps=4,
                checkpoint_every_steps=4)

def get_study():
  return study.Study("tiny", get_config(), get_config(),
                     (study.FP32, study.Setting(16), study.Setting(6)), seeds=(0,))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "tiny_study.py"
  path.write_text(TINY_STUDY)
  return main.load_study(str(path))


@pytest.fixture(scope="module")
def diagnosed(tiny, tmp_path_factory):
  """The tiny study's FP32 run trained, then diagnosed: (workdir, markdown, json)."""
  workdir = str(tmp_path_factory.mktemp("study"))
  study.run_studies([tiny], workdir, settings=["fp32"], log=lambda line: None)
  text = study_diagnose.run(tiny, workdir, log=lambda line: None)
  with open(os.path.join(workdir, "tiny", "diagnose.json"), encoding="utf-8") as f:
    return workdir, text, json.load(f)


def test_every_dfp_setting_is_diagnosed_in_every_pass(diagnosed):
  _, text, data = diagnosed
  assert list(data["settings"]) == ["dfp16", "dfp6"]
  for per_pass in data["settings"].values():
    # Two convolutions and three dense layers, each differentiated for both operands (the
    # image's gradient too: diagnose runs it, XLA drops it in training).
    assert {p: s["products"] for p, s in per_pass.items()} == dict.fromkeys(
        study_diagnose.PASSES, 5)
  assert text.count("| dfp6 |") == 3 and text.count("| dfp16 |") == 3


def test_fewer_bits_lose_more_precision(diagnosed):
  settings = diagnosed[2]["settings"]
  for role in study_diagnose.PASSES:
    sixteen, six = settings["dfp16"][role], settings["dfp6"][role]
    assert sixteen["max_rel_error"] < 1e-3
    # Each bit fewer doubles the rounding error: 10 bits are a factor of about 1000.
    assert six["median_rel_error"] > 100 * sixteen["median_rel_error"]
    assert sixteen["max_rel_error"] <= six["max_rel_error"]
    assert 0.5 <= sixteen["median_mantissa_use"] <= 1.0
    assert six["max_underflow"] >= sixteen["max_underflow"]


def test_gradient_spread_measures_each_setting_against_the_float_network(tiny, diagnosed):
  workdir = diagnosed[0]
  with_sr = dataclasses.replace(tiny, settings=(*tiny.settings, study.Setting(6, "stochastic")))
  spread = study_diagnose.gradient_spread(with_sr, workdir, ["dfp16", "dfp6", "dfp6_sr"],
                                          draws=3, batches=3)
  perturbed, next_batches = "fp32, images x (1 + 0.0001 N(0,1))", "fp32, the next batches"
  assert list(spread) == ["dfp16", "dfp6", "dfp6_sr", perturbed, next_batches]
  kernels = list(spread["dfp16"])
  assert len(kernels) == 5 and all(list(rows) == kernels for rows in spread.values())
  draws = {label: len(rows[kernels[0]]) for label, rows in spread.items()}
  # Round to nearest is one gradient; each stochastic key, perturbation and batch another.
  assert draws == {"dfp16": 1, "dfp6": 1, "dfp6_sr": 3, perturbed: 3, next_batches: 2}
  median = {label: np.median([np.median(d) for d in rows.values()])
            for label, rows in spread.items()}
  sr_keys = np.array([spread["dfp6_sr"][kernel] for kernel in kernels])
  assert np.all(sr_keys[:, 0] != sr_keys[:, 1])  # the keys draw apart
  assert median["dfp16"] < 1e-2 < median[next_batches]
  assert median["dfp16"] < median["dfp6"] < median[next_batches]
  text = study_diagnose.gradients_markdown("tiny", 0, spread)
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert len(rows) == 1 + len(spread)  # the header, one row per label


def test_a_study_trained_with_override_flags_is_read_as_it_was_trained(tiny, tmp_path):
  workdir = str(tmp_path)
  study.run_studies([tiny], workdir, overrides={"num_train_steps": 2}, settings=["fp32"],
                    log=lambda line: None)
  config, state, _ = study_diagnose.trained_fp32(tiny, workdir, 0)
  assert config == dataclasses.replace(tiny.config, num_train_steps=2)
  assert int(state.step) == 2


@pytest.mark.parametrize("flags, message", [
    (["--config", "nope"], "--config: no config 'nope'; the configs are alexnet,"),
    (["--config", "resnet18"], "--config: 'resnet18' is not a study config"),
    (["--draws", "0"], "argument --draws: must be at least 1, got 0"),
    (["--gradients", "bogus"], "--gradients: study 'resnet18' has no setting 'bogus'"),
    (["--gradients", ","], "argument --gradients: names nothing: ','"),
])
def test_the_command_line_refuses_what_cannot_run(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    study_diagnose.parse_args(["--config", "study_resnet18", "--workdir", "unused", *flags])
  assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_fp32_run_is_named_with_the_command_that_trains_it(tiny, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no finished FP32 run of 'tiny' with seed 3 .*"
                                              r"--settings fp32 --seeds 3"):
    study_diagnose.run(tiny, str(tmp_path), seed=3)
