"""Data-parallel training of the example trainer on simulated CPU devices and processes.

Each run is a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` fixes the device
count at start-up) of ``examples.imagenet.main`` on a tiny ResNet-18 and the shipped Fashion-MNIST
subset, 3 steps at global batch 16, then compared by its step-3 checkpoint.

N devices compute the same step as one, but XLA's float reductions over the batch (BatchNorm
statistics, bias and weight gradients, the loss mean) add the shards' partial sums in another
order, so the parameters may differ in the last bits, and 3 SGD steps (learning rate 0.0625) carry
those differences along. Measured max |difference| of any parameter after 3 steps against the
1-device run of the same mode (this config, JAX 0.10.2, Zen 5, DFP ops per shard with global
exponents and exact integer sums across devices):

  ========================  ========  ========  ==============================
  run                       FP32      DFP       DFP, reproducible_batch_sums
  ========================  ========  ========  ==============================
  2 devices                 6.6e-05   1.5e-03   --
  4 devices                 5.8e-05   1.5e-03   0 (the whole state)
  2 processes x 2 devices   6.4e-05   --        0 (the whole state)
  ========================  ========  ========  ==============================

In FP32 the two-process run differed from one process with the same 4 devices by 6.2e-05 (the
gloo all-reduce adds in yet another order); the DFP run with ``reproducible_batch_sums`` sums
only integers across processes, and it is tested here to give one process's bits.

Plain DFP (the middle column, measured, not run here) differs more than FP32: its products add
nothing of their own (tests/test_sharding.py), but the float noise of BatchNorm's sharded sums
reaches the next product's operands, and where it moves a value across a rounding boundary the
quantization turns a last-bit change into a whole mantissa step (docs/transform.md, "Many
devices"). With ``reproducible_batch_sums`` BatchNorm's sums and the head's bias gradient are
``dfpjax.reproducible_sum``, every other sum over the batch is a DFP product, and the rest of the
step is elementwise or per example: the DFP step is one device's bits on 4 devices (issue 16:
no larger a difference than FP32's). Tested here, as the DFP runs.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from examples.imagenet import input_pipeline, main
from examples.imagenet import train as trainer
from examples.imagenet.configs.base import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """
from examples.imagenet.configs.base import Config
def get_config():
  return Config(model="resnet18", model_kwargs={"num_filters": 4, "stage_sizes": (1, 1, 1, 1)},
                dataset="fashion_mnist_subset", image_size=32, crop_scale=(0.35, 1.0),
                num_workers=0, batch_size=16, base_learning_rate=1.0, lr_schedule="step",
                lr_decay_epochs=(), warmup_epochs=0.0, num_epochs=1.0, num_train_steps=3,
                log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3)
"""
# The DFP runs' first channels: the replicated and the split state's runs give the same bits
# only where XLA compiles the optimizer's elementwise update of a kernel and of each device's
# block of it alike, which XLA:CPU in jaxlib 0.12 does for some shapes only, and which ones
# depends on the vector ISA it compiles for (docs/development.md, "JAX 0.12"). So the runs
# compile XLA's own code for AVX2 on every CPU (XLA_CODEGEN_FLAGS; the DFP kernels keep the
# CPU's path), where 8 filters avoid those shapes (4 would not).
SHARD_STATE_FILTERS = 8
XLA_CODEGEN_FLAGS = "--xla_cpu_max_isa=AVX2"
# About 8x the largest FP32 difference measured above.
FP32_TOLERANCE = 5e-4
# A run alone takes 30-60 s; the fixture below runs its eight processes at once.
RUN_TIMEOUT_S = 900


def _environment(devices: int) -> dict[str, str]:
  """The trainer's environment: the caller's XLA flags (as multidevice.run_on_devices keeps
  them), then the codegen flags and the device count, which win over any the caller set."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), XLA_CODEGEN_FLAGS,
                                           f"--xla_force_host_platform_device_count={devices}"]))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  return env


def _command(config_path: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "examples.imagenet.main", "--config", config_path,
          "--workdir", workdir, *flags]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str):
  assert proc.returncode == 0, output[-4000:]


def train(tmp_path, config_path: str, name: str, devices: int, *flags: str) -> str:
  workdir = str(tmp_path / name)
  proc = subprocess.run(_command(config_path, workdir, *flags), env=_environment(devices),
                        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  _check(proc, proc.stdout + proc.stderr)
  assert f"{devices} device(s) in 1 process(es)" in proc.stdout
  # The trainer advises huge pages once where this environment's malloc would gain from them.
  advised = trainer.malloc_advice() is not None
  assert proc.stdout.count("GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == advised
  return workdir


def train_two_processes(tmp_path, config_path: str, devices_each: int) -> tuple[str, list[str]]:
  """Two processes on localhost, joined by jax.distributed through a free port."""
  workdir = str(tmp_path / "two_processes")
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(
      _command(config_path, workdir, "--coordinator_address", f"localhost:{port}",
               "--num_processes", "2", "--process_id", str(i)),
      env=_environment(devices_each), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=RUN_TIMEOUT_S)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, output in zip(procs, outputs):
    _check(proc, output)
  return workdir, outputs


def final_state(workdir: str) -> dict:
  """The step-3 checkpoint, restored onto this process's one device whatever mesh saved it."""
  path = os.path.join(workdir, "checkpoints", "3", "default")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        getattr(metadata, "item_metadata", metadata))
  return jax.device_get(checkpointer.restore(path, target))


def max_param_difference(a: dict, b: dict) -> float:
  pairs = zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True)
  return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in pairs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("parallel")
  fp32, dfp = str(tmp_path / "fp32.py"), str(tmp_path / "dfp.py")
  with open(fp32, "w", encoding="utf-8") as f:
    f.write(CONFIG)
  with open(dfp, "w", encoding="utf-8") as f:
    f.write(CONFIG.replace("checkpoint_every_steps=3",
                           "checkpoint_every_steps=3, dfp=True, reproducible_batch_sums=True")
            .replace('"num_filters": 4', f'"num_filters": {SHARD_STATE_FILTERS}'))
  single_process = {(mode, n): (path, f"{mode}{n}", n)
                    for mode, path, counts in (("fp32", fp32, (1, 2, 4)), ("dfp", dfp, (1, 4)))
                    for n in counts}
  single_process["dfp_shard_state", 4] = (dfp, "dfp_shard_state4", 4, "--shard_state")
  # The runs are independent and mostly single-threaded (start-up, compiling): run them at once.
  with concurrent.futures.ThreadPoolExecutor(len(single_process) + 1) as pool:
    two_processes = pool.submit(train_two_processes, tmp_path, dfp, 2)
    futures = {key: pool.submit(train, tmp_path, *args) for key, args in single_process.items()}
    workdirs = {key: future.result() for key, future in futures.items()}
    workdirs["two_processes"], outputs = two_processes.result()
  return workdirs, outputs


@pytest.mark.parametrize("devices", [2, 4])
def test_fp32_on_n_devices_equals_one_device(runs, devices):
  workdirs, _ = runs
  one, many = final_state(workdirs["fp32", 1]), final_state(workdirs["fp32", devices])
  assert int(many["step"]) == 3
  assert max_param_difference(one, many) <= FP32_TOLERANCE


def test_dfp_with_reproducible_batch_sums_on_four_devices_is_one_devices_bits(runs):
  workdirs, _ = runs
  one, four = final_state(workdirs["dfp", 1]), final_state(workdirs["dfp", 4])
  assert int(four["step"]) == 3
  assert_same_state(one, four)
  # Issue 16's acceptance, next to the FP32 step's difference on the same devices.
  fp32_difference = max_param_difference(final_state(workdirs["fp32", 1]),
                                         final_state(workdirs["fp32", 4]))
  assert max_param_difference(one, four) == 0.0 < fp32_difference


def test_shard_state_saves_the_replicated_runs_state(runs):
  """``--shard_state`` (the state split over the 4 devices) trains and checkpoints the state of
  the replicated run bit for bit; the checkpoint restores onto one device like any other."""
  workdirs, _ = runs
  assert_same_state(final_state(workdirs["dfp", 4]), final_state(workdirs["dfp_shard_state", 4]))


def test_shard_state_needs_dfp(tmp_path):
  with pytest.raises(ValueError, match="shard_state splits the state of DFP runs"):
    trainer.train_and_evaluate(Config(shard_state=True), str(tmp_path))


def assert_same_state(a: dict, b: dict):
  leaves = jax.tree_util.tree_leaves_with_path(a)
  assert len(leaves) > 50  # parameters, batch statistics, momenta, step, key
  for (path, x), y in zip(leaves, jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_reproducible_batch_sums_keep_the_variables_and_the_gradients():
  """The switch changes how BatchNorm and the head's bias sum over the batch, not what they
  compute: the same variables (a checkpoint restores either way) and float-close gradients."""
  config = Config(model="resnet18", model_kwargs={"num_filters": 4, "stage_sizes": (1, 1)})
  plain = trainer.create_model(config, num_classes=10)
  switched = trainer.create_model(dataclasses.replace(config, reproducible_batch_sums=True), 10)
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10

  def grads_and_stats(model):
    variables = model.init(jax.random.key(0), images[:1], train=False)
    def loss(params):
      logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
      return trainer.cross_entropy(logits, labels).mean(), updates["batch_stats"]
    grads, stats = jax.grad(loss, has_aux=True)(variables["params"])
    return variables, grads, stats

  (v0, g0, s0), (v1, g1, s1) = (jax.jit(grads_and_stats, static_argnums=0)(model)
                                for model in (plain, switched))
  assert jax.tree.structure(v0) == jax.tree.structure(v1)
  for a, b in zip(jax.tree.leaves(v0), jax.tree.leaves(v1)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves((g0, s0)), jax.tree.leaves((g1, s1))):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.max(np.abs(a))) + 1e-7)
  with pytest.raises(ValueError, match="reproducible_batch_sums: model 'vgg16' sums over"):
    trainer.create_model(dataclasses.replace(config, model="vgg16", reproducible_batch_sums=True),
                       num_classes=10)


def test_two_processes_equal_one_process_with_the_same_devices(runs):
  workdirs, outputs = runs
  assert "4 device(s) in 2 process(es)" in outputs[0]
  assert_same_state(final_state(workdirs["dfp", 4]), final_state(workdirs["two_processes"]))
  with open(os.path.join(workdirs["two_processes"], "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  with open(os.path.join(workdirs["dfp", 4], "summary.json"), encoding="utf-8") as f:
    one_summary = json.load(f)
  assert summary["eval_top1"] == one_summary["eval_top1"]  # same predictions on all 1000 images


def test_process_zero_alone_writes_the_metrics(runs):
  workdirs, outputs = runs
  with open(os.path.join(workdirs["two_processes"], "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert sorted((r["split"], r["step"]) for r in records) == [
      ("eval", 3), ("train", 1), ("train", 2), ("train", 3)]
  assert "step 3/3" in outputs[0] and "step 3/3" not in outputs[1]


@pytest.mark.parametrize("train_split", [True, False])
def test_process_shards_make_up_the_global_batch(train_split):
  source = input_pipeline.make_source("fashion_mnist_subset", "train" if train_split else "eval")
  # Eval: 1000 images = 33 x 30 + 10, so shards 1 and 2 of the last batch are all padding.
  kwargs = dict(batch_size=30, train=train_split, image_size=16, seed=3, start_step=20)

  def batches(shard):
    with input_pipeline.Loader(source, shard=shard, **kwargs) as loader:
      return list(loader) if not train_split else [next(loader) for _ in range(2)]

  whole = batches((0, 1))
  parts = [batches((i, 3)) for i in range(3)]
  assert len(whole) == len(parts[0])
  for b, batch in enumerate(whole):
    for key, value in batch.items():
      np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), value, err_msg=key)


def test_shard_must_divide_the_batch():
  source = input_pipeline.make_source("fashion_mnist_subset", "eval")
  with pytest.raises(ValueError, match="shard must be"):
    input_pipeline.Loader(source, batch_size=16, train=False, image_size=16, shard=(0, 3))


def test_batch_size_must_divide_among_the_devices():
  code = ("from examples.imagenet import parallel\n"
          "parallel.DataParallel.over_all_devices(6)\n")
  proc = subprocess.run([sys.executable, "-c", code], env=_environment(4), cwd=REPO,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert proc.returncode != 0
  assert "batch_size 6 must be a multiple of the device count 4" in proc.stderr


@pytest.mark.parametrize("flags", [["--num_processes", "2"],
                                   ["--coordinator_address", "localhost:1", "--process_id", "0"]])
def test_the_distributed_flags_go_together(flags, capsys):
  with pytest.raises(SystemExit):
    main.parse_args(["--workdir", "unused", *flags])
  assert "go together" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--coordinator_address", "localhost", "--num_processes", "2", "--process_id", "0"],
     "--coordinator_address must be host:port, e.g. localhost:12355, got 'localhost'"),
    (["--coordinator_address", "localhost:1", "--num_processes", "2", "--process_id", "5"],
     "--process_id must be below --num_processes 2, got 5"),
    (["--coordinator_address", "localhost:1", "--num_processes", "0", "--process_id", "0"],
     "argument --num_processes: must be at least 1, got 0"),
])
def test_the_distributed_flags_are_checked_before_joining(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    main.parse_args(["--workdir", "unused", *flags])
  assert exit_.value.code == 2 and message in capsys.readouterr().err


_TRAIN_STEP_HLO = """
import dataclasses, functools, sys
sys.path.insert(0, REPO)
from examples.imagenet import parallel, train
from examples.imagenet.configs.base import Config
config = Config(model="resnet18", model_kwargs={"num_filters": 4, "recompute_block_tails": True},
                image_size=32, batch_size=16, dfp=True)
data_parallel = parallel.DataParallel.over_all_devices(config.batch_size)
model = train.create_model(config, num_classes=10)
lr = train.create_learning_rate_fn(dataclasses.replace(config, warmup_epochs=0), 100)
state = jax.jit(functools.partial(train.create_train_state, config, model, 32, lr),
                out_shardings=data_parallel.replicated)()
step = jax.jit(train.make_dfp_step(train.train_step, config), donate_argnums=0,
               out_shardings=data_parallel.replicated,
               compiler_options=train.compiler_options(config))
batch = data_parallel.global_batch({"image": np.zeros((16, 32, 32, 3), np.float32),
                                    "label": np.zeros((16,), np.int32)})
report_hlo(step.lower(state, batch).compile())
report("param_sizes", np.array([p.size for p in jax.tree.leaves(state.params)]))
report("conv_shapes", np.array([p.shape for p in jax.tree.leaves(state.params) if p.ndim == 4]))
"""


def test_the_sharded_dfp_train_step_gathers_the_batch_only_for_larger_weight_gradients():
  """Issue 16: the trainer's DFP ResNet-18 step on 4 devices runs every product on its shard of
  the batch: its compiled HLO all-gathers float32 blocks as large as a parameter (each device
  encodes its block of the weight gradients' exact sums, partitioning.sum_and_encode, or
  computes its block of a weight gradient larger than the batch's operands), and of the batch
  only the INT16 inputs of such larger weight gradients (the last stages')."""
  from multidevice import run_on_devices  # pylint: disable=g-import-not-at-top
  run = run_on_devices(f"REPO = {REPO!r}\n" + _TRAIN_STEP_HLO, 4)
  assert run.hlo and "dfpjax_conv" in run.hlo[0]
  param_sizes = set(run.results["param_sizes"].tolist())
  conv_shapes = run.results["conv_shapes"].tolist()
  batch_gathers = 0
  for gathered in run.all_gathers():
    dtype, dims = _type_and_dims(gathered)
    if dtype == "s16":
      assert _gathered_batch_of_a_larger_weight(dims, conv_shapes), gathered
      batch_gathers += 1
    else:
      assert dtype == "f32" and np.prod(dims) in param_sizes, gathered
  assert batch_gathers > 0


_SHARDED_STATE = """
import dataclasses, functools, sys
sys.path.insert(0, REPO)
from examples.imagenet import parallel, train
from examples.imagenet.configs.base import Config
for shard_state in (False, True):
  config = Config(model="resnet18",
                  model_kwargs={"num_filters": FILTERS, "recompute_block_tails": True},
                  image_size=32, batch_size=16, dfp=True, shard_state=shard_state)
  data_parallel = parallel.DataParallel.over_all_devices(config.batch_size, shard_state)
  model = train.create_model(config, num_classes=10)
  lr = train.create_learning_rate_fn(dataclasses.replace(config, warmup_epochs=0), 100)
  create = functools.partial(train.create_train_state, config, model, 32, lr)
  state_sharding = data_parallel.state_sharding(jax.eval_shape(create))
  state = jax.jit(create, out_shardings=state_sharding)()
  step = jax.jit(train.make_dfp_step(train.train_step, config), donate_argnums=0,
                 out_shardings=(state_sharding, data_parallel.replicated))
  rng = np.random.default_rng(0)
  batch = data_parallel.global_batch({
      "image": rng.standard_normal((16, 32, 32, 3), np.float32),
      "label": rng.integers(0, 10, 16).astype(np.int32)})
  if shard_state:
    report_hlo(step.lower(state, batch).compile())
    report("split_kernels", np.array([not p.sharding.is_fully_replicated
                                      for p in jax.tree.leaves(state.params)]))
  for _ in range(2):
    state, _ = step(state, batch)
  for i, leaf in enumerate(jax.tree.leaves(state)):
    report(f"{shard_state}.{i}", leaf)
report("param_sizes", np.array([p.size for p in jax.tree.leaves(state.params)]))
report("conv_channels",
       np.array([p.shape[-2:] for p in jax.tree.leaves(state.params) if p.ndim > 2]))
report("conv_shapes", np.array([p.shape for p in jax.tree.leaves(state.params) if p.ndim == 4]))
report("norms", np.array(sum("scale" in jax.tree_util.keystr(path)
                             for path, _ in jax.tree_util.tree_leaves_with_path(state.params))))
"""


def _type_and_dims(gathered: str) -> tuple[str, list[int]]:
  """The element type and dimensions of an all-gather's result, ``"s16[16,4,4,256]{...}"``."""
  dtype, dims = gathered.split("{")[0].rstrip("]").split("[")
  return dtype, [int(d) for d in dims.split(",")]


def _gathered_batch_of_a_larger_weight(dims, conv_shapes) -> bool:
  """An all-gathered INT16 batch operand ``[16, h, w, c]`` is the input of a convolution whose
  weight is larger than it, whose weight gradient (and, the weight split, whose forward
  product) each device then computes a block of from the gathered batch
  (``partitioning.gathers_the_batch``): a kernel with ``c`` input channels and more elements."""
  return (len(dims) == 4 and dims[0] == 16
          and any(k[-2] == dims[-1] and np.prod(k) > np.prod(dims) for k in conv_shapes))


def test_sharded_state_gives_the_replicated_states_bits():
  """``shard_state``: every convolution kernel and its momentum split over 4 devices, the DFP
  step's state after 2 steps has the replicated state's bits; the step all-gathers the
  kernels' INT16 mantissas (or the blocks of them the input gradient's convolutions take),
  each at most once, none of the last stages' kernels that outweigh their activations (each
  device's products there work on the gathered batch with its own block of the kernel),
  float32 only as large as a parameter, and of the batch only the INT16 inputs of
  convolutions whose kernels are larger than them; a BatchNorm's per-channel sums take one
  all-reduce each way."""
  from multidevice import run_on_devices  # pylint: disable=g-import-not-at-top
  run = run_on_devices(f"REPO = {REPO!r}\nFILTERS = {SHARD_STATE_FILTERS}\n" + _SHARDED_STATE, 4,
                       axis_type="Auto", xla_flags=XLA_CODEGEN_FLAGS)
  assert run.results["split_kernels"].sum() == 20  # ResNet-18's convolutions, not the head
  leaves = [name for name in run.results if name.startswith("False.")]
  assert len(leaves) > 60
  for name in leaves:
    replicated, sharded = run.results[name], run.results["True." + name[6:]]
    assert replicated.dtype == sharded.dtype, name
    np.testing.assert_array_equal(replicated.reshape(-1).view(np.uint8),
                                  sharded.reshape(-1).view(np.uint8), err_msg=name)
  param_sizes = set(run.results["param_sizes"].tolist())
  channels = {tuple(c) for c in run.results["conv_channels"].tolist()}
  channels |= {c[::-1] for c in channels}  # the input gradient's kernels are transposed
  conv_shapes = run.results["conv_shapes"].tolist()
  gathered = run.all_gathers()
  # A kernel's shape whichever way it lies: window and channels, each pair in either order.
  shape_key = lambda dims: tuple(sorted(dims[:2]) + sorted(dims[2:]))
  gathered_kernels = collections.Counter()
  for g in gathered:
    dtype, dims = _type_and_dims(g)
    if dtype == "s16" and _gathered_batch_of_a_larger_weight(dims, conv_shapes):
      continue
    if dtype == "s16":  # a window (at most 7x7) of in x out or out x in channels
      assert len(dims) == 4 and max(dims[:2]) <= 7 and tuple(dims[2:]) in channels, g
      gathered_kernels[shape_key(dims)] += 1
    else:
      assert dtype == "f32" and np.prod(dims) in param_sizes, g
  # At most once a step (the recomputed block tails take the forward pass's gathered kernels,
  # recompute.tied_to_cotangent, not gathers of their own), and not the kernels of the last
  # stages, larger than the batch's activations (partitioning.output_block_of_gathered_batch,
  # input_gradient_of_gathered_batch): the kernels of each shape gathered at most as often as
  # there are kernels of that shape, fewer than all.
  kernels = collections.Counter(map(shape_key, conv_shapes))
  assert all(n <= kernels[shape] for shape, n in gathered_kernels.items()), gathered_kernels
  assert 0 < sum(gathered_kernels.values()) < run.results["split_kernels"].sum(), gathered
  entry = run.hlo[0][run.hlo[0].index("\nENTRY "):]
  # One all-reduce of per-channel sums a BatchNorm each way, or fewer where XLA combines
  # more: its backward pass's two sums are independent (batch_sums._batch_norm_bwd).
  channel_sums = re.findall(r"= \(?f32\[\d+\][^=\n]* all-reduce\(", entry)
  assert len(channel_sums) <= 2 * run.results["norms"], len(channel_sums)
  # The convolutions read the gathered mantissas in the layout the all-gather writes them
  # (Geometry.features_major_weights): no INT16 copy of a whole gathered kernel.
  gathered_kernels = {g.split("[")[1].split("]")[0] for g in gathered if g.startswith("s16")}
  int16_results = re.findall(r"= s16\[([\d,]+)\]\S* "
                             r"(?!all-gather|custom-call|bitcast|parameter|get-tuple)", entry)
  kernel_copies = [dims for dims in int16_results if dims in gathered_kernels]
  assert not kernel_copies, kernel_copies
  # Each kernel's weight-gradient sums (their two parts, partitioning.split_sums) are
  # reduce-scattered along their rows, where the kernel wrote them
  # (partitioning.sum_and_encode), and the encoded float32 blocks exchanged; only the stem's
  # (7 x 7 x 3 rows, which 4 devices do not divide) are copied into blocks of output channels
  # first, both parts.
  integer_results = re.findall(r"= (s64|s32|u16|u8)\[(\d+),(\d+),(\d+),(\d+)\]\S* (?!custom-call"
                               r"|reduce-scatter|bitcast|parameter|get-tuple-element)", entry)
  sums_copies = sorted((dtype, dims) for dtype, *dims in integer_results  # kernel-shaped ones
                       if max(map(int, dims[:2])) <= 7 and tuple(map(int, dims[2:])) in channels)
  stem = ["7", "7", "3", str(SHARD_STATE_FILTERS)]
  assert len(sums_copies) == 2 and sums_copies[0] == ("s32", stem), sums_copies
  assert sums_copies[1] in (("u16", stem), ("u8", stem)), sums_copies
  # The all-to-alls exchange blocks: of INT16 cotangents (a device's channels, the whole batch)
  # and of float32 results (a device's block of a weight gradient, or of the features of a
  # forward output computed from the gathered batch, for its share of the batch).
  exchanged = re.findall(r"= \((\w+)\[[^=\n]*\) all-to-all\(", entry)
  assert len(exchanged) == entry.count(" all-to-all(") and set(exchanged) == {"s16", "f32"}, exchanged
