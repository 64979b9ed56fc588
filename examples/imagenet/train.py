"""Training and evaluation loop, in FP32 or with DFP convolutions and matmuls (``config.dfp``).

A run is fully determined by its config: the initialisation and dropout keys derive from
``config.seed`` and the step, and the data order from ``config.seed`` (input_pipeline), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted one would.

Training is data-parallel over every device of every process (``parallel``): the global batch
``config.batch_size`` is split over the devices, the state replicated (or, with
``config.shard_state``, split). Process 0 alone writes the config, metrics, plots and summary;
all processes take part in saving checkpoints (Orbax writes each array once).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from examples.imagenet import input_pipeline, models, parallel, reporting
from examples.imagenet.configs.base import Config


# Config fields that do not change what a run computes (the data order does not depend on the
# number of workers), so a run may resume with other values of them.
RESULT_NEUTRAL_FIELDS = ("num_workers", "data_dir", "log_every_steps", "checkpoint_every_steps",
                         "max_checkpoints", "memory_optimized_schedule")


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Base key: step t draws from fold_in(rng, t), so (rng, step) restore all randomness.
  rng: jax.Array


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """This step's dropout key and stochastic-rounding key: two independent streams."""
  dropout_rng, rounding_rng = jax.random.split(state.rng)
  return (jax.random.fold_in(dropout_rng, state.step),
          jax.random.wrap_key_data(jax.random.fold_in(rounding_rng, state.step)))


def create_model(config: Config, num_classes: int):
  """``config.model``; a DFP ResNet-50 with the block tails of its first two stages recomputed
  (``models.DFP_RECOMPUTED_STAGES``), and a DFP ResNet with its BatchNorm sums by
  ``dfpjax.channel_sums``, unless ``model_kwargs`` says otherwise (``recompute_block_tails``,
  ``kernel_batch_sums``; docs/performance.md, "Memory of the ResNet-50 DFP step",
  "Recomputation where it saves memory" and "BatchNorm's sums in one read")."""
  kwargs = dict(config.model_kwargs)
  if config.dfp and config.model in models.DFP_RECOMPUTED_STAGES:
    kwargs.setdefault("recompute_block_tails", models.DFP_RECOMPUTED_STAGES[config.model])
  if config.dfp and config.model in models.BATCH_SUMS_MODELS:
    kwargs.setdefault("kernel_batch_sums", True)
  if config.reproducible_batch_sums:
    kwargs["reproducible_batch_sums"] = True
  return models.create_model(config.model, num_classes, dtype=jnp.dtype(config.dtype), **kwargs)


def create_learning_rate_fn(config: Config, steps_per_epoch: float) -> optax.Schedule:
  """Linear warm-up from 0, then step decay or cosine decay to 0 at ``num_epochs``."""
  peak = config.base_learning_rate * config.batch_size / 256  # linear scaling (Goyal et al.)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  total = max(warmup + 1, int(config.num_epochs * steps_per_epoch))
  if config.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, total - warmup)
  elif config.lr_schedule == "step":
    boundaries = {}
    for epoch in config.lr_decay_epochs:
      step = int(epoch * steps_per_epoch) - warmup
      boundaries[step] = boundaries.get(step, 1.0) * config.lr_decay_factor
    decay = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {config.lr_schedule!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def create_schedule(config: Config, steps_per_epoch: int) -> tuple[int, optax.Schedule]:
  """A run's number of steps and its learning rate schedule, whose epochs are stretched over
  those steps (a no-op unless ``config.num_train_steps`` is set)."""
  num_steps = (config.num_train_steps if config.num_train_steps > 0
               else int(config.num_epochs * steps_per_epoch))
  return num_steps, create_learning_rate_fn(config, num_steps / config.num_epochs)


def create_optimizer(config: Config, learning_rate_fn: optax.Schedule):
  """SGD with momentum; weight decay (added to the gradient, as in Caffe) on kernels only."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # not biases or BN
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov))


def create_train_state(config: Config, model, image_size: int, learning_rate_fn) -> TrainState:
  # XLA's RngBitGenerator compiles several times faster than threefry for the one-off init
  # (tens of seconds on CPU for a big net); its bits may differ across XLA versions and platforms.
  init_key = jax.random.key(config.seed, impl="rbg")
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": init_key}, image)
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=create_optimizer(config, learning_rate_fn), batch_stats=variables.get("batch_stats", {}),
      rng=jax.random.PRNGKey(config.seed))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def topk_correct(logits, labels, k: int):
  """1.0 per row whose label is among its ``k`` largest logits (ties to the lower class index,
  as ``lax.top_k`` breaks them), else 0.0.

  A rank test (fewer than ``k`` logits ahead of the label's) instead of ``lax.top_k``: only
  elementwise work and row sums, so a batch-sharded step needs no gather of the logits.
  """
  target = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  classes = jnp.arange(logits.shape[-1])
  ahead = (logits > target) | ((logits == target) & (classes < labels[:, None]))
  return (jnp.sum(ahead, axis=-1) < k).astype(jnp.float32)


def train_step(state: TrainState, batch, aux_loss_weight: float = 0.3, apply_fn=None):
  """One SGD step; returns the new state and the batch's loss, top-1 and top-5 accuracy.

  ``apply_fn`` runs the model (default ``state.apply_fn``); ``make_dfp_step`` passes its DFP one.
  """
  dropout_key, _ = step_keys(state)
  apply_fn = apply_fn or state.apply_fn

  def loss_fn(params):
    outputs, updates = apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    logits, aux = outputs if isinstance(outputs, tuple) else (outputs, ())
    loss = cross_entropy(logits, batch["label"]).mean()
    loss += sum(aux_loss_weight * cross_entropy(a, batch["label"]).mean() for a in aux)
    return loss, (logits, updates.get("batch_stats", state.batch_stats))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {"loss": loss, "top1": topk_correct(logits, batch["label"], 1).mean(),
             "top5": topk_correct(logits, batch["label"], 5).mean()}
  return state, metrics


def eval_step(state: TrainState, batch, apply_fn=None):
  """Sums of loss, top-1 and top-5 hits over the unpadded examples of a batch; ``apply_fn`` as
  in ``train_step``."""
  logits = (apply_fn or state.apply_fn)({"params": state.params, "batch_stats": state.batch_stats},
                                        batch["image"], train=False)
  mask = batch["mask"]
  return {"loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
          "top1": jnp.sum(topk_correct(logits, batch["label"], 1) * mask),
          "top5": jnp.sum(topk_correct(logits, batch["label"], 5) * mask),
          "count": jnp.sum(mask)}


def make_dfp_config(config: Config):
  """The ``dfpjax.DFPConfig`` of ``config``'s DFP fields (also what ``dfpjax.report`` takes)."""
  import dfpjax  # pylint: disable=g-import-not-at-top
  quant = dfpjax.QuantConfig(bits=config.dfp_bits, rounding=config.dfp_rounding,
                             headroom=config.dfp_headroom)
  return dfpjax.DFPConfig(forward=quant, gradient=quant, keep_float=config.dfp_keep_float)


def make_dfp_step(step_fn, config: Config):
  """``step_fn`` with every convolution and matmul in INT16 dynamic fixed point.

  ``step_fn(state, batch, apply_fn=...)`` (``train_step``, ``eval_step``) runs the model through
  ``apply_fn``; the DFP step passes it the model's apply through ``dfpjax.dfp_transform``, inside
  the step's ``jax.grad``. So JAX differentiates the DFP ops (docs/transform.md, "Gradient before
  or after"): each backward product reuses its forward op's INT16 operands and quantizes only the
  cotangent, where transforming the whole step would quantize the float activations again, and
  transpose them, for the weight gradients. With round to nearest (the default) both give the
  same bits. The step's own arithmetic (loss, optimizer) has no product to rewrite.

  This and ``make_dfp_config`` are the trainer's only uses of dfpjax besides ``batch_sums``
  (``reproducible_batch_sums``), all imported lazily so that plain FP32 runs never need it.
  ``step_fn(state, batch)`` keeps its signature: stochastic rounding takes its key from the
  state, as dropout does, so DFP runs stay reproducible and resume exactly.
  """
  import dfpjax  # pylint: disable=g-import-not-at-top
  dfp_config = make_dfp_config(config)

  @functools.wraps(step_fn)
  def dfp_step(state, batch):
    key = {"dfp_key": step_keys(state)[1]} if dfp_config.needs_key else {}

    def apply_fn(variables, *args, **kwargs):
      # Flags (train, mutable) and the dropout key are closed over, the variables traced.
      model = dfpjax.dfp_transform(functools.partial(state.apply_fn, **kwargs), dfp_config)
      return model(variables, *args, **key)
    return step_fn(state, batch, apply_fn=apply_fn)
  return dfp_step


def compiler_options(config: Config) -> dict[str, str] | None:
  """XLA options of the jitted train and eval steps: XLA:CPU's memory-optimized schedule when
  ``config.memory_optimized_schedule`` and the default backend is the CPU, else None.

  XLA:CPU's default schedule orders a step's instructions for concurrency: it starts
  independent work early (in a train step, backward-pass elementwise work on the forward's
  activations), and what it computes early stays alive until it is used. The memory-optimized
  schedule runs the same instructions, with the same bits, in an order that keeps fewer buffers
  alive (docs/performance.md, "Memory of the ResNet-50 DFP step (issue 15)").
  """
  if not config.memory_optimized_schedule or jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def _glibc() -> ctypes.CDLL | None:
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def release_freed_memory() -> None:
  """Hands the heap memory the process has freed back to the system (``malloc_trim``), once,
  after compiling. glibc keeps what XLA's compiler freed in its arenas, trimming them only from
  the top, and the step's buffers reuse little of it: the ResNet-50 DFP step's peak resident
  memory is about 0.2 GiB lower with this call (docs/performance.md). Without glibc, nothing."""
  if (libc := _glibc()) is not None:
    libc.malloc_trim(0)


def _glibc_version() -> tuple[int, int] | None:
  libc = _glibc()
  try:
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    major, minor = libc.gnu_get_libc_version().decode().split(".")[:2]
    return int(major), int(minor)
  except (AttributeError, ValueError):  # no glibc (libc None, or another C library)
    return None


def _huge_pages_mode() -> str | None:
  """Linux's transparent huge pages mode (``always``, ``madvise`` or ``never``), if known."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return None


def malloc_advice(environ=None, glibc=None, huge_pages=None) -> str | None:
  """One line of advice where glibc's malloc runs as it came and huge pages would serve it: XLA
  maps its large buffers afresh for every step, and faults them in 4 KiB at a time, unless
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35 and later) backs them with huge pages
  (docs/examples.md, "Throughput"). None where the environment already sets glibc's malloc
  (``GLIBC_TUNABLES``' hugetlb, or any ``MALLOC_*`` variable), where glibc is older or absent,
  or where huge pages are off. The arguments stand in for this process's (tests)."""
  environ = os.environ if environ is None else environ
  glibc = _glibc_version() if glibc is None else glibc
  huge_pages = _huge_pages_mode() if huge_pages is None else huge_pages
  if ("glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")
      or any(k.startswith("MALLOC_") for k in environ)):
    return None
  if glibc is None or glibc < (2, 35) or huge_pages not in ("always", "madvise"):
    return None
  return ("hint: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment backs XLA's large "
          "buffers with huge pages: faster steps and a steady peak memory (docs/examples.md, "
          "\"Throughput\")")


@functools.cache
def _advise_malloc_once() -> None:
  """malloc_advice's line, printed by the first run in a process only (a study runs many)."""
  if advice := malloc_advice():
    print(advice, flush=True)


def checkpoint_manager(workdir: str, config: Config) -> ocp.CheckpointManager:
  # Synchronous saves: the state's buffers are donated to the next step right after a save.
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def restore_or_create(manager: ocp.CheckpointManager, create_state,
                      data_parallel: parallel.DataParallel) -> TrainState:
  """The latest checkpoint, or ``create_state()`` when there is none; on the mesh as
  ``data_parallel.state_sharding`` places it.

  Restoring needs only the state's shapes, so a resumed run skips the (compiled) initialisation.
  """
  abstract_state = data_parallel.abstract(jax.eval_shape(create_state))
  step = manager.latest_step()
  if step is None:
    # Leaves only: each call of create_state makes the state's static fields (the optimizer's
    # functions) anew, and jit compares them with out_shardings' (with the ResNets' recompute
    # regions it found eval_shape's and its own different, and refused).
    shardings = jax.tree.leaves(data_parallel.state_sharding(abstract_state))
    leaves = jax.jit(lambda: jax.tree.leaves(create_state()), out_shardings=shardings)()
    return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def evaluate(p_eval_step, state, source, config: Config,
             data_parallel: parallel.DataParallel) -> dict[str, float]:
  totals = {}
  with input_pipeline.Loader(source, batch_size=config.batch_size, train=False,
                             image_size=config.image_size, num_workers=config.num_workers,
                             shard=data_parallel.shard) as loader:
    for batch in loader:
      for k, v in p_eval_step(state, data_parallel.global_batch(batch)).items():
        totals[k] = totals.get(k, 0.0) + v
  count = float(totals.pop("count"))
  return {k: float(v) / count for k, v in totals.items()}


class TrainingClock:
  """Images per second of training alone, per logging window and over the run: the time from
  ``start`` (after the first, compiling step) less the ``paused`` blocks (evaluation, saving)."""

  def __init__(self):
    self.started = False
    self._tick = 0.0
    self._window_images = self._images = 0
    self._seconds = 0.0

  def start(self):
    self.started, self._tick = True, time.perf_counter()

  def count(self, images: int):
    self._window_images += images

  def lap(self) -> float | None:
    """The window's images/s (None before any timed step), and a new window."""
    now = time.perf_counter()
    rate = None
    if self._window_images:
      rate = self._window_images / (now - self._tick)
      self._images += self._window_images
      self._seconds += now - self._tick
    self._tick, self._window_images = now, 0
    return rate

  @contextlib.contextmanager
  def paused(self):
    paused = time.perf_counter()
    yield
    self._tick += time.perf_counter() - paused

  def images_per_sec(self) -> float:
    return self._images / self._seconds if self._seconds else float("nan")


def _every(value: int, steps_per_epoch: int) -> int:
  return value if value > 0 else steps_per_epoch


def check_config(config: Config):
  """Raises ValueError, naming the fields, where ``config`` cannot train: a split state without
  DFP, DFP settings dfpjax refuses, ``model_kwargs`` that are not fields of ``config.model``, a
  dataset that cannot be opened as named (``input_pipeline.check_dataset``)."""
  if config.shard_state and not config.dfp:
    raise ValueError("shard_state splits the state of DFP runs (dfp=True): XLA's float "
                     "convolutions would spread a kernel's split onto the activations")
  if config.dfp:
    try:
      make_dfp_config(config)
    except ValueError as e:  # dfpjax's words, with the fields that set them
      raise ValueError(f"dfp_bits {config.dfp_bits}, dfp_headroom {config.dfp_headroom}: "
                       f"{e}") from e
  try:
    create_model(config, num_classes=10)  # builds the module only: no weights
  except TypeError as e:
    raise ValueError(f"model_kwargs {config.model_kwargs} do not fit model {config.model!r} "
                     f"({e}): a --model needs a --config of that network") from e
  input_pipeline.check_dataset(config.dataset, config.data_dir)


def _json(config: Config) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def read_config(workdir: str) -> Config | None:
  """The config of the run in ``workdir`` (its config.json), or None where there is none; a
  field that config.json lacks (it was written before the field existed) is its default, which
  is what that run computed with."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    recorded = json.load(f)
  unknown = sorted(set(recorded) - {field.name for field in dataclasses.fields(Config)})
  if unknown:
    raise ValueError(f"{path} records fields that Config has no more ({unknown}): a run of an "
                     "older version; use another --workdir, or delete that directory")
  # JSON has no tuples: a config's sequences are tuples (hashable, as Flax's module fields).
  tuples = lambda v: (tuple(map(tuples, v)) if isinstance(v, list) else
                      {k: tuples(x) for k, x in v.items()} if isinstance(v, dict) else v)
  return Config(**{k: tuples(v) for k, v in recorded.items()})


def check_workdir(config: Config, workdir: str):
  """Raises ValueError if ``workdir`` holds a run of another config (other flags or a changed
  config file); the RESULT_NEUTRAL_FIELDS may differ."""
  found = read_config(workdir)
  if found is None:
    return
  found, wanted = _json(found), _json(config)
  diff = sorted(k for k in wanted if k not in RESULT_NEUTRAL_FIELDS and found[k] != wanted[k])
  if diff:
    raise ValueError(
        f"{workdir} holds a run of another config (fields {diff} differ: there "
        f"{ {k: found[k] for k in diff} }, here { {k: wanted[k] for k in diff} }); use "
        "another --workdir, the flags that run was started with, or delete that directory")


def train_and_evaluate(config: Config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir``'s latest checkpoint), evaluates, and writes to ``workdir``:
  config.json, metrics.jsonl, tensorboard/, checkpoints/, curves.png and summary.json.

  Returns the summary: final train/eval metrics, images/s and wall time. A workdir trained to
  the end already returns its summary.json. A workdir of another config (``check_workdir``), or
  a config that cannot train, is an error before anything is written.
  """
  check_config(config)
  check_workdir(config, workdir)
  data_parallel = parallel.DataParallel.over_all_devices(config.batch_size, config.shard_state)
  lead = jax.process_index() == 0  # the one process that writes files other than checkpoints
  train_source = input_pipeline.make_source(config.dataset, "train", config.data_dir)
  eval_source = input_pipeline.make_source(config.dataset, "eval", config.data_dir)
  steps_per_epoch = input_pipeline.steps_per_epoch(train_source, config.batch_size)
  num_steps, learning_rate_fn = create_schedule(config, steps_per_epoch)
  model = create_model(config, train_source.num_classes)

  manager = checkpoint_manager(workdir, config)
  summary_path = os.path.join(workdir, "summary.json")
  if manager.latest_step() == num_steps and os.path.exists(summary_path):
    manager.close()  # nothing to train: report the run that finished rather than an empty one
    with open(summary_path, encoding="utf-8") as f:
      return json.load(f)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(dataclasses.asdict(config), f, indent=2)
  state = restore_or_create(manager, functools.partial(
      create_train_state, config, model, config.image_size, learning_rate_fn), data_parallel)
  start_step = int(state.step)

  step_fn = functools.partial(train_step, aux_loss_weight=config.aux_loss_weight)
  eval_fn = eval_step
  if config.dfp:
    step_fn, eval_fn = make_dfp_step(step_fn, config), make_dfp_step(eval_fn, config)
  # The batch arrives sharded; the state keeps its sharding, the metrics are replicated.
  options = compiler_options(config)
  p_train_step = jax.jit(step_fn, donate_argnums=0, compiler_options=options,
                         out_shardings=(data_parallel.state_sharding(state),
                                        data_parallel.replicated))
  p_eval_step = jax.jit(eval_fn, out_shardings=data_parallel.replicated, compiler_options=options)

  if lead:
    _advise_malloc_once()
    print(f"{config.model}: {train_source.description}; eval on {eval_source.description}; "
          f"{'DFP' if config.dfp else 'FP32'}, steps {start_step}..{num_steps}, "
          f"{jax.device_count()} device(s) in {jax.process_count()} process(es)", flush=True)
  writer = reporting.MetricWriter(workdir) if lead else None
  progress = reporting.ProgressBar(num_steps, start_step,
                                   stream=None if lead else open(os.devnull, "w"))
  log_every = _every(config.log_every_steps, steps_per_epoch)
  start_time = time.perf_counter()
  eval_every = _every(config.eval_every_steps, steps_per_epoch)
  checkpoint_every = _every(config.checkpoint_every_steps, steps_per_epoch)
  clock = TrainingClock()
  window = []
  with input_pipeline.Loader(train_source, batch_size=config.batch_size, train=True,
                             image_size=config.image_size, seed=config.seed,
                             start_step=start_step, num_workers=config.num_workers,
                             crop_scale=config.crop_scale,
                             shard=data_parallel.shard) as train_iter:
    for step in range(start_step, num_steps):
      state, metrics = p_train_step(state, data_parallel.global_batch(next(train_iter)))
      window.append(metrics)
      done = step + 1
      if not clock.started:  # the first step compiles: images/s leaves it out
        jax.block_until_ready(metrics)
        release_freed_memory()
        clock.start()
      else:
        clock.count(config.batch_size)
      progress.update(done)
      if done % log_every == 0 or done == num_steps:
        window, rate = jax.device_get(window), clock.lap()
        with clock.paused():
          train_summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          train_summary["learning_rate"] = float(learning_rate_fn(step))
          if rate is not None:
            train_summary["images_per_sec"] = rate
          if writer:
            writer.write(done, "train", train_summary)
          progress.update(done, **{k: v for k, v in train_summary.items() if k != "top5"})
        window = []
      run_eval = done % eval_every == 0 or done == num_steps
      run_save = done % checkpoint_every == 0 or done == num_steps
      if run_eval or run_save:
        jax.block_until_ready(state)  # queued training steps finish on the training clock
        with clock.paused():  # evaluating and saving are not training time
          if run_eval:
            eval_summary = evaluate(p_eval_step, state, eval_source, config, data_parallel)
            if writer:
              writer.write(done, "eval", eval_summary)
            progress.update(done, **{f"eval_{k}": v for k, v in eval_summary.items()})
          if run_save:
            manager.save(done, args=ocp.args.StandardSave(state))
  manager.close()
  progress.close()
  if writer:
    writer.close()
  else:
    progress.stream.close()

  # The last records rather than this session's: a run stopped between its final checkpoint and
  # its summary resumes with no step left to take.
  records = reporting.read_metrics(workdir)
  summary = {"steps": num_steps, **final_metrics(records),
             "images_per_sec": clock.images_per_sec(),
             "wall_time_s": time.perf_counter() - start_time}
  if lead:
    with open(summary_path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    reporting.plot_curves({config.model: records}, os.path.join(workdir, "curves.png"))
  return summary


def final_metrics(records: list[dict]) -> dict[str, float]:
  """A run's summary metrics from its metrics records: the last train loss and eval metrics."""
  train_summary = next((r for r in reversed(records) if r["split"] == "train"), {})
  eval_summary = next((r for r in reversed(records) if r["split"] == "eval"), {})
  return {"train_loss": train_summary.get("loss", float("nan")),
          "eval_loss": eval_summary.get("loss", float("nan")),
          "eval_top1": eval_summary.get("top1", float("nan")),
          "eval_top5": eval_summary.get("top5", float("nan"))}
