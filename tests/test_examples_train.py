"""Tests of the example trainer: FP32 and DFP training on the shipped images, exact resume, CLI,
configs."""

import dataclasses
import importlib.util
import json
import os
import pkgutil
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from examples.imagenet import (benchmark, compare, configs, input_pipeline, main, models,
                               reporting, train)
from examples.imagenet.configs.base import Config

# A narrow ResNet-18 on the shipped Fashion-MNIST subset: 93 steps per epoch, so resuming from
# the step-90 checkpoint crosses an epoch boundary (a new data order) before step 100.
RUN = Config(
    model="resnet18", model_kwargs={"num_filters": 8}, dataset="fashion_mnist_subset",
    image_size=32, crop_scale=(0.35, 1.0), num_workers=0, batch_size=64, base_learning_rate=0.2,
    lr_schedule="cosine", warmup_epochs=0.1, num_epochs=1.0, num_train_steps=100,
    weight_decay=5e-4, log_every_steps=10, eval_every_steps=50, checkpoint_every_steps=90)
# The same run through dfp_transform (the trainer's --dfp), with one block per stage (DFP steps
# compile several times slower than FP32 ones) and stochastic rounding, so that resuming must
# also restore the rounding keys.
DFP_RUN = dataclasses.replace(RUN, model_kwargs={"num_filters": 8, "stage_sizes": (1, 1, 1, 1)},
                              dfp=True, dfp_rounding="stochastic")


# A two-convolution VGG on the shipped subset, 2 steps: for the checks of the command line and
# the work directory, whose steps compile in seconds.
TINY_CONFIG = '''
from examples.imagenet.configs.base import Config

def get_config():
  return Config(model="vgg16", model_kwargs={"layers": (8, "M", 16, "M"), "hidden": 32},
                dataset="fashion_mnist_subset", image_size=16, num_workers=0, batch_size=32,
                warmup_epochs=0.0, num_epochs=1.0, num_train_steps=2, log_every_steps=1)
'''


@pytest.fixture
def tiny_config(tmp_path):
  path = tmp_path / "tiny.py"
  path.write_text(TINY_CONFIG)
  return str(path)


@pytest.fixture(scope="module", params=[RUN, DFP_RUN], ids=["fp32", "dfp"])
def run(request, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  return request.param, workdir, train.train_and_evaluate(request.param, workdir)


def test_training_learns(run):
  _, workdir, summary = run
  records = reporting.read_metrics(workdir)
  train_loss = [r["loss"] for r in records if r["split"] == "train"]
  assert len(train_loss) == 10
  assert train_loss[-1] < 0.6 * train_loss[0]
  assert summary["train_loss"] == train_loss[-1]
  # Ten balanced classes: chance is 10% top-1 and ln(10) = 2.30 loss.
  assert summary["eval_top1"] > 0.5 and summary["eval_loss"] < 1.2
  assert summary["eval_top5"] >= summary["eval_top1"]
  assert [r["step"] for r in records if r["split"] == "eval"] == [50, 100]
  assert summary["images_per_sec"] > 0 and summary["steps"] == 100


def test_run_outputs(run):
  config, workdir, summary = run
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(dataclasses.asdict(config)))
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    assert json.load(f) == summary
  with Image.open(os.path.join(workdir, "curves.png")) as png:
    assert png.format == "PNG" and png.size[0] > 500
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["100", "90"]
  has_tensorboard = importlib.util.find_spec("tensorboardX") is not None
  tb_dir = os.path.join(workdir, "tensorboard")
  assert os.path.isdir(tb_dir) == has_tensorboard
  if has_tensorboard:
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb_dir))


def test_a_finished_run_reports_its_summary_again(run):
  config, workdir, summary = run
  assert train.train_and_evaluate(config, workdir) == summary
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    assert json.load(f) == summary


def restore_raw(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  return ocp.StandardCheckpointer().restore(path)


def test_resume_takes_exactly_the_uninterrupted_steps(run, tmp_path):
  config, workdir, summary = run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "100"))  # as if stopped after step 90
  resumed_summary = train.train_and_evaluate(config, resumed)

  expected, actual = restore_raw(workdir, 100), restore_raw(resumed, 100)
  assert int(actual["step"]) == 100
  flat_expected = jax.tree_util.tree_leaves_with_path(expected)
  flat_actual = jax.tree_util.tree_leaves_with_path(actual)
  assert [p for p, _ in flat_expected] == [p for p, _ in flat_actual]
  for (path, a), (_, b) in zip(flat_expected, flat_actual):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  for key in ("train_loss", "eval_loss", "eval_top1", "eval_top5"):
    assert resumed_summary[key] == summary[key]
  # The re-done steps replaced the first run's records: one record per (split, step).
  records = reporting.read_metrics(resumed)
  assert len({(r["split"], r["step"]) for r in records}) == len(records) == 12


def test_learning_rate_schedules():
  config = Config(batch_size=512, base_learning_rate=0.1, warmup_epochs=2, num_epochs=10,
                  lr_decay_epochs=(4, 8), lr_decay_factor=0.1)
  lr = train.create_learning_rate_fn(config, steps_per_epoch=10)
  peak = 0.2  # 0.1 per 256 images at batch 512
  np.testing.assert_allclose([lr(0), lr(10), lr(19), lr(20), lr(39)], [0, 0.1, 0.19, peak, peak],
                             rtol=1e-6)
  np.testing.assert_allclose([lr(40), lr(79), lr(80), lr(99)],
                             [peak / 10, peak / 10, peak / 100, peak / 100], rtol=1e-5)
  cosine = train.create_learning_rate_fn(dataclasses.replace(config, lr_schedule="cosine"), 10)
  np.testing.assert_allclose([cosine(20), cosine(60), cosine(100)], [peak, peak / 2, 0],
                             atol=1e-7)
  # Stretched to 1000 steps (--steps), the same schedule decays at steps 400 and 800.
  stretched = train.create_learning_rate_fn(config, steps_per_epoch=100)
  np.testing.assert_allclose([stretched(399), stretched(400), stretched(800)],
                             [peak, peak / 10, peak / 100], rtol=1e-5)
  with pytest.raises(ValueError, match="cosine"):
    train.create_learning_rate_fn(dataclasses.replace(config, lr_schedule="poly"), 10)


def test_weight_decay_spares_biases_and_batchnorm():
  config = Config(weight_decay=0.5, momentum=0.0, base_learning_rate=256.0, batch_size=1,
                  warmup_epochs=0)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 10))
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
            "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)  # lr 1 * decay 0.5 * weight 1
  for leaf in (updates["conv"]["bias"], updates["bn"]["scale"], updates["bn"]["bias"]):
    np.testing.assert_array_equal(leaf, 0)


def test_step_keys_are_fresh_every_step_and_apart_from_dropout():
  # Stochastic rounding must not reuse a step's draws, nor dropout's (docs/accuracy.md).
  config = Config(warmup_epochs=0)
  tx = train.create_optimizer(config, train.create_learning_rate_fn(config, 10))
  state = train.TrainState.create(apply_fn=None, params={}, batch_stats={}, tx=tx,
                                  rng=jax.random.PRNGKey(3))
  words = lambda key: tuple(np.asarray(key).tolist())
  drawn = []
  for step in range(4):
    dropout, rounding = train.step_keys(state.replace(step=step))
    assert jnp.issubdtype(rounding.dtype, jax.dtypes.prng_key)  # what dfp_transform's dfp_key takes
    drawn += [words(dropout), words(jax.random.key_data(rounding))]
  assert len(set(drawn)) == len(drawn)
  again = train.step_keys(state.replace(step=2))[1]  # a resumed run draws the same
  assert words(jax.random.key_data(again)) == drawn[5]


def test_every_config_builds_its_model():
  names = [m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "base"]
  assert {"default", "fashion_mnist_resnet", "resnet18", "resnet50", "googlenet", "vgg16",
          "alexnet"} <= set(names)
  for name in names:
    config = main.load_config(name)
    assert config.dataset in input_pipeline.DATASETS and config.model in models.MODELS
    assert train.create_model(config, 10).num_classes == 10  # model_kwargs are model fields
    lr = train.create_learning_rate_fn(config, steps_per_epoch=100)
    peak = config.base_learning_rate * config.batch_size / 256
    assert 0 < float(lr(int(config.num_epochs * 100) - 1)) < peak
  assert main.load_config("default") == main.load_config("resnet50")


def test_command_line_overrides(tmp_path):
  config_file = tmp_path / "mine.py"
  config_file.write_text("from examples.imagenet.configs.base import Config\n"
                         "def get_config():\n  return Config(model='alexnet', seed=3)\n")
  args = main.parse_args(["compare", "--config", str(config_file), "--workdir", "w", "--data_dir",
                          "d", "--dfp", "--dfp_bits", "12", "--dfp_rounding", "stochastic",
                          "--dfp_keep_float", "*/conv1, */fc8,", "--steps", "5",
                          "--batch_size", "8"])
  config = main.config_from_args(args)
  assert args.mode == "compare"
  assert (config.model, config.seed, config.dfp, config.dfp_bits, config.dfp_rounding) == \
      ("alexnet", 3, True, 12, "stochastic")
  assert config.dfp_keep_float == ("*/conv1", "*/fc8")
  assert (config.num_train_steps, config.batch_size) == (5, 8)
  plain = main.config_from_args(main.parse_args(["--workdir", "w", "--data_dir", "d", "--no-dfp"]))
  assert plain == dataclasses.replace(main.load_config("default"), dfp=False, data_dir="d")
  assert main.parse_args(["--workdir", "w", "--data_dir", "d"]).mode == "train"


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "-8"], "argument --batch_size: must be at least 1, got -8"),
    (["--batch_size", "0"], "argument --batch_size: must be at least 1, got 0"),
    (["--image_size", "0"], "argument --image_size: must be at least 1, got 0"),
    (["--num_workers", "-1"], "argument --num_workers: must be at least 0, got -1"),
    (["--num_epochs", "0"], "argument --num_epochs: must be positive, got 0"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (["--log_every_steps", "0"], "argument --log_every_steps: must be a positive number of "
                                 "steps, or -1: once per epoch"),
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["--config", "nope"], "--config: no config 'nope'; the configs are alexnet, default,"),
    (["--config", "base"], "--config: no config 'base'; the configs are alexnet, default,"),
    (["--config", "missing.py"], "--config: no file 'missing.py'; the configs are alexnet,"),
    (["--dfp", "--dfp_bits", "20"], "dfp_bits 20, dfp_headroom 0: DFP bits must be"),
    (["--dfp", "--dfp_headroom", "99"], "dfp_bits 16, dfp_headroom 99: DFP headroom must be"),
    (["compare", "--dfp_bits", "1"], "dfp_bits 1, dfp_headroom 0: DFP bits must be"),
    (["--shard_state"], "shard_state splits the state of DFP runs"),
    (["--dfp_bits", "8", "--dfp_rounding", "stochastic"],
     "--dfp_bits, --dfp_rounding: DFP settings for a run that trains in FP32"),
    (["--no-dfp", "--dfp_keep_float", "*/head"], "--dfp_keep_float: DFP settings for a run that"),
    (["--model", "alexnet", "--config", "fashion_mnist_resnet"],
     "model_kwargs {'num_filters': 32} do not fit model 'alexnet'"),
])
def test_the_command_line_refuses_what_cannot_run(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    main.parse_args(["--workdir", "unused", "--data_dir", "unused", *flags])
  assert exit_.value.code == 2
  assert message in capsys.readouterr().err


def test_an_image_folder_dataset_without_its_folder_is_a_command_line_error(capsys):
  """The default dataset reads --data_dir: without it the command stops before any run."""
  for flags in ([], ["compare"],
                ["--dataset", "imagenet_folder", "--config", "fashion_mnist_resnet"]):
    with pytest.raises(SystemExit) as exit_:
      main.parse_args([*flags, "--workdir", "unused"])
    assert exit_.value.code == 2
    assert "dataset 'imagenet_folder' needs --data_dir" in capsys.readouterr().err
  assert main.parse_args(["--workdir", "unused", "--data_dir", "unused"]).data_dir == "unused"


def test_a_config_file_without_get_config_is_a_command_line_error(tmp_path, capsys):
  path = tmp_path / "empty.py"
  path.write_text("NAME = 'empty'\n")
  with pytest.raises(SystemExit):
    main.parse_args(["--config", str(path), "--workdir", "unused"])
  assert f"--config: '{path}' has no get_config(); the configs are alexnet," in (
      capsys.readouterr().err)


@pytest.mark.parametrize("names, message", [
    ("bogus", "--models: no config 'bogus'; the configs are alexnet,"),
    ("", "argument --models: names nothing: ''"),
    ("vgg16,,vgg16", "argument --models: names one twice"),
])
def test_benchmark_refuses_unknown_configs(names, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    benchmark.main(["--models", names])
  assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_refused_command_writes_nothing(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit):
    main.main(["--config", tiny_config, "--workdir", str(workdir), "--dfp", "--dfp_bits", "20"])
  # A run that fails before its first step leaves no directory either.
  config = dataclasses.replace(main.load_config(tiny_config), dataset="fashion_mnist_full",
                               data_dir=str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_a_workdir_of_another_config_is_refused_and_kept(tiny_config, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  main.main(["--config", tiny_config, "--workdir", workdir])
  summary_line = capsys.readouterr().out.splitlines()[-1]
  config_path = os.path.join(workdir, "config.json")
  with open(config_path, encoding="utf-8") as f:
    recorded = f.read()
  with pytest.raises(SystemExit):
    main.main(["--config", tiny_config, "--workdir", workdir, "--batch_size", "16"])
  assert (f"{workdir} holds a run of another config (fields ['batch_size'] differ" in
          capsys.readouterr().err)
  with pytest.raises(ValueError, match=r"another config \(fields \['batch_size'\] differ"):
    train.train_and_evaluate(dataclasses.replace(main.load_config(tiny_config), batch_size=16),
                             workdir)
  # Fields that do not change the results may differ: the finished run reports again.
  main.main(["--config", tiny_config, "--workdir", workdir, "--log_every_steps", "2"])
  assert capsys.readouterr().out.splitlines() == [summary_line]
  with open(config_path, encoding="utf-8") as f:
    assert f.read() == recorded


def test_a_workdir_recording_a_field_config_has_no_more_is_refused(tiny_config, tmp_path):
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump({**dataclasses.asdict(main.load_config(tiny_config)), "retired_flag": 1}, f)
  with pytest.raises(ValueError, match=r"fields that Config has no more \(\['retired_flag'\]\)"):
    train.train_and_evaluate(main.load_config(tiny_config), str(tmp_path))


def test_log_every_steps_minus_one_logs_once_per_epoch(tiny_config, tmp_path):
  # 6,000 images in batches of 3,000: two steps per epoch.
  config = dataclasses.replace(main.load_config(tiny_config), batch_size=3000, num_train_steps=3,
                               log_every_steps=-1)
  train.train_and_evaluate(config, str(tmp_path))
  records = reporting.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 3]


def test_compare_rejects_bad_dfp_settings_before_training(tmp_path):
  with pytest.raises(ValueError, match="2..16"):
    compare.run_compare(dataclasses.replace(RUN, dfp_bits=17), str(tmp_path))
  assert not (tmp_path / "fp32").exists()


def test_comparison_table():
  row = {"steps": 10, "train_loss": 1.0, "eval_loss": 2.0, "eval_top1": 0.5, "eval_top5": 0.9,
         "images_per_sec": 100.0, "wall_time_s": 5.0}
  table = reporting.comparison_table({"FP32": row, "DFP16": {**row, "eval_top1": 0.4375}})
  lines = table.splitlines()
  assert lines[0] == "| metric | FP32 | DFP16 | difference |"
  assert "| eval top-1 | 0.5000 | 0.4375 | -0.0625 |" in lines
  assert "| steps | 10 | 10 | +0 |" in lines
  assert len(lines) == 2 + len(reporting.SUMMARY_ROWS)


class FakeTerminal:
  def __init__(self, tty):
    self.tty, self.text = tty, ""

  def isatty(self):
    return self.tty

  def write(self, text):
    self.text += text

  def flush(self):
    pass


def test_progress_bar():
  terminal = FakeTerminal(tty=True)
  bar = reporting.ProgressBar(100, start=40, stream=terminal, width=10)
  bar.update(50, loss=1.25, images_per_sec=12.0)
  bar.update(51)  # within 0.1 s of the last draw: not redrawn
  bar.close()
  assert "\r[#####.....] 50/100  loss 1.25  images_per_sec 12" in terminal.text
  assert terminal.text.endswith("\n")
  log = FakeTerminal(tty=False)
  bar = reporting.ProgressBar(100, stream=log)
  bar.update(1)
  bar.update(10, loss=2.0)
  assert log.text == "step 10/100  loss 2\n"


def test_topk_correct_agrees_with_lax_top_k_ties_included():
  """The rank test counts a hit exactly where lax.top_k's k indices hold the label (ties to the
  lower class index), with k above the class count too."""
  rng = np.random.default_rng(0)
  for classes in (1, 3, 10):
    logits = jnp.asarray(rng.integers(-2, 2, (64, classes)).astype(np.float32))  # many ties
    labels = jnp.asarray(rng.integers(0, classes, 64))
    for k in (1, 2, 5, 12):
      top = jax.lax.top_k(logits, min(k, classes))[1]
      expected = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
      np.testing.assert_array_equal(train.topk_correct(logits, labels, k), expected)


def _resident_bytes() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_release_freed_memory_returns_freed_heap_to_the_system():
  # 4,000 blocks of 64 KiB, below glibc's mmap threshold, so they come from the heap; the last
  # one stays alive, so the heap cannot shrink from its top and keeps the rest until trimmed.
  blocks = [np.ones(16 * 1024, np.float32) for _ in range(4000)]
  last = blocks[-1]
  del blocks
  held = _resident_bytes()
  train.release_freed_memory()
  assert held - _resident_bytes() > 128 * 2**20
  assert last.sum() == 16 * 1024


def test_malloc_advice_names_hugetlb_only_where_it_would_serve():
  hint = train.malloc_advice(environ={}, glibc=(2, 36), huge_pages="madvise")
  assert hint is not None and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
  assert train.malloc_advice(environ={"PATH": "/bin"}, glibc=(2, 35), huge_pages="always") == hint
  # Already set, by the tunable or the older variables; too old a glibc; huge pages off.
  assert train.malloc_advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise") is None
  assert train.malloc_advice({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None
  assert train.malloc_advice({"MALLOC_ARENA_MAX": "1"}, (2, 36), "madvise") is None
  assert train.malloc_advice({}, (2, 31), "madvise") is None
  assert train.malloc_advice({}, (2, 36), "never") is None


def test_training_clock_leaves_out_the_first_step_and_the_pauses(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
  clock = train.TrainingClock()
  now[0] = 5.0  # the first step compiles
  clock.start()
  assert clock.lap() is None  # no timed step yet
  clock.count(32)
  now[0] += 2.0
  with clock.paused():  # an evaluation
    now[0] += 100.0
  clock.count(32)
  now[0] += 2.0
  assert clock.lap() == 16.0  # 64 images in 4 training seconds
  clock.count(96)
  now[0] += 2.0
  assert clock.lap() == 48.0
  assert clock.images_per_sec() == 160 / 6.0
