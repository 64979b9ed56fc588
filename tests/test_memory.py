"""Memory and float work of the examples' DFP train step (issue 15).

The examples jit their steps with XLA:CPU's memory-optimized schedule (``train.compiler_options``),
which keeps fewer buffers alive than XLA's default, concurrency-first schedule and computes the
same bits; and their DFP step transforms the model inside the step's gradient
(``train.make_dfp_step``), which gives the same bits as transforming the whole step with fewer
quantizations and transposes.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dfpjax
from dfpjax import cpu_ffi
from dfpjax.primitives import bilinear
from examples.imagenet import batch_sums, train
from examples.imagenet.configs.base import Config

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")


class ResidualNet(nn.Module):
  """Convolution, BatchNorm, ReLU and a residual add per layer: the float work around the DFP
  products whose activations a ResNet step keeps for its backward pass."""
  norm: Any = nn.BatchNorm

  @nn.compact
  def __call__(self, x):
    for i in range(6):
      y = nn.Conv(16, (3, 3), use_bias=False, name=f"conv{i}")(x)
      y = nn.relu(self.norm(use_running_average=False, name=f"bn{i}")(y))
      x = y + x if i else y
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def sgd_step(variables, images, labels, net=ResidualNet()):
  """A train step as the examples' (loss, gradient, BatchNorm statistics, SGD update)."""

  def loss_fn(params):
    logits, updates = net.apply({**variables, "params": params}, images,
                                          mutable=["batch_stats"])
    one_hot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, -1)), updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
  return {**updates, "params": params}, loss


@pytest.fixture(scope="module")
def steps():
  """The DFP step compiled with each schedule, and its arguments."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 16)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  variables = ResidualNet().init(jax.random.key(0), images)
  step = dfpjax.dfp_transform(sgd_step)
  compiled = {
      schedule: jax.jit(step, compiler_options=train.compiler_options(
          Config(memory_optimized_schedule=schedule == "memory"))).lower(
              variables, images, labels).compile()
      for schedule in ("default", "memory")}
  return compiled, (variables, images, labels)


def assert_same_bits(a, b):
  """Two pytrees of arrays leaf for leaf: the same dtype, shape and bytes."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def test_compiler_options_select_the_schedule():
  assert train.compiler_options(Config(memory_optimized_schedule=False)) is None
  assert train.compiler_options(Config()) == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def test_memory_optimized_schedule_keeps_fewer_buffers_alive(steps):
  compiled, _ = steps
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert temp["memory"] < 0.8 * temp["default"], temp


def test_memory_optimized_schedule_changes_no_bits(steps):
  compiled, args = steps
  assert_same_bits(compiled["default"](*args), compiled["memory"](*args))


def test_examples_batch_norm_frees_its_cotangents_in_its_layer():
  """With ``nn.BatchNorm``, XLA:CPU runs the scale and bias gradients' reductions at the end of
  the step and keeps every layer's cotangent until then (docs/performance.md)."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 16)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  temp = {}
  for norm in (nn.BatchNorm, batch_sums.BatchNorm):
    net = ResidualNet(norm)
    variables = net.init(jax.random.key(0), images)
    compiled = jax.jit(sgd_step, static_argnums=3, compiler_options=train.compiler_options(
        Config())).lower(variables, images, labels, net).compile()
    temp[norm.__module__] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[batch_sums.__name__] < 0.8 * temp[nn.BatchNorm.__module__], temp


def resnet18_step(config: Config):
  """A ResNet-18 state at 32x32 (three classes) and a batch of four images."""
  model = train.create_model(config, 3)
  state = train.create_train_state(config, model, 32, train.create_learning_rate_fn(config, 10))
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           "label": np.arange(4, dtype=np.int32) % 3}
  return state, batch


def test_dfp_step_differentiates_the_dfp_ops_with_the_whole_steps_bits():
  config = Config(model="resnet18", batch_size=4, warmup_epochs=0, dfp=True)
  state, batch = resnet18_step(config)
  whole = jax.jit(dfpjax.dfp_transform(train.train_step, train.make_dfp_config(config)))
  inside = jax.jit(train.make_dfp_step(train.train_step, config))
  hlo = {name: step.lower(state, batch).compile().as_text()
         for name, step in (("whole", whole), ("inside", inside))}
  # The backward products reuse the forward's INT16 activations: fewer quantizations, and no
  # transposes of float activations for the weight gradients.
  count = lambda text, s: text.count(s)
  target = f'custom_call_target="{cpu_ffi.QUANTIZE_TARGET}"'
  assert count(hlo["inside"], target) < count(hlo["whole"], target)
  assert count(hlo["inside"], " transpose(") < count(hlo["whole"], " transpose(")
  assert_same_bits(whole(state, batch), inside(state, batch))


def test_after_keeps_every_bit():
  anchor = jnp.float32(-0.0)
  for value in (jnp.asarray([1.5, -0.0, jnp.nan, jnp.inf], jnp.float32),
                jnp.asarray([-32767, 0, 5], jnp.int16), jnp.asarray([True, False]),
                jnp.asarray(7, jnp.int32)):
    assert_same_bits(jax.jit(dfpjax.after)(value, anchor), value)


def test_materialized_keeps_every_bit_and_passes_the_gradient_through():
  rng = np.random.default_rng(0)
  for dtype, uint, nans in ((jnp.float32, np.uint32, [0x7fc00123, 0xffc00001]),
                            (jnp.bfloat16, np.uint16, [0x7fc5, 0xffc1]),
                            (jnp.float16, np.uint16, [0x7e05, 0xfe01])):
    tiny, largest = float(jnp.finfo(dtype).tiny), float(jnp.finfo(dtype).max)
    finite = np.array([0.0, -0.0, 1.5, -2.0, tiny, tiny / 4, -tiny / 8, largest], np.float32)
    x = jnp.asarray(np.concatenate([finite.astype(dtype), [np.inf, -np.inf],
                                    np.array(nans, uint).view(dtype)]).astype(dtype))
    assert_same_bits(dfpjax.materialized(x), x)
    assert_same_bits(jax.jit(dfpjax.materialized)(x), x)
    assert_same_bits(jax.vmap(dfpjax.materialized)(x.reshape(3, 4)), x.reshape(3, 4))
    w = jnp.asarray(rng.normal(size=finite.shape), dtype)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(dfpjax.materialized(x) * w)))(jnp.asarray(finite, dtype))
    assert_same_bits(grad, w)


def test_materialized_keeps_integers_as_they_are():
  for dtype in (jnp.int8, jnp.uint8, jnp.int16, jnp.int32, jnp.uint32):
    info = jnp.iinfo(dtype)
    x = jnp.asarray([info.min, -1 if info.min else 2, 0, 1, info.max], dtype)
    assert_same_bits(dfpjax.materialized(x), x)
    assert_same_bits(jax.jit(dfpjax.materialized)(x), x)


def test_materialized_takes_numbers_only():
  with pytest.raises(TypeError, match="materialized: x has dtype bool; an array of floating-point "
                                      "or integer numbers"):
    dfpjax.materialized(jnp.asarray([True, False]))


def test_materialized_values_are_computed_once_not_in_each_consumer():
  """A chain of cheap elementwise operations with two consumers: XLA:CPU fuses the whole chain
  into each of them (its six maximums twice); materialized, the chain runs once and both read
  its result."""
  def stream(x, w, materialized):
    for i in range(6):
      x = jnp.maximum(x * w[i] + x, 0.0)
    if materialized:
      x = dfpjax.materialized(x)
    return x * 2.0, x * x + 1.0

  x, w = jnp.ones((64, 128)), jnp.arange(6.0)
  maximums = {m: jax.jit(stream, static_argnums=2).lower(x, w, m).compile().as_text().count(" maximum(")
              for m in (False, True)}
  assert maximums[True] == 6 < maximums[False], maximums
  assert_same_bits(jax.jit(stream, static_argnums=2)(x, w, True), stream(x, w, False))


class RecomputedResidualNet(nn.Module):
  """``ResidualNet`` (the examples' BatchNorm) with each layer, or none, a ``dfpjax.recompute``
  region."""
  recompute: bool

  @nn.compact
  def __call__(self, x):
    def layer(module, x, i):
      y = nn.Conv(16, (3, 3), use_bias=False, name=f"conv{i}")(x)
      return nn.relu(batch_sums.BatchNorm(use_running_average=False, name=f"bn{i}")(y)) + x
    if self.recompute:
      layer = nn.remat(layer, policy=dfpjax.RecomputePolicy(), static_argnums=(2,))
    for i in range(6):
      x = layer(self, x, i)
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


def test_recompute_keeps_fewer_buffers_with_the_same_bits():
  """Under ``dfp_transform`` (inside the gradient, as the examples' DFP step), a ``recompute``
  region keeps its products' INT16 operands and recomputes their outputs, the BatchNorm inputs,
  in the backward pass: fewer buffers, the same bits."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 16)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  temp, outputs = {}, {}
  for recompute in (False, True):
    net = RecomputedResidualNet(recompute)
    variables = net.init(jax.random.key(0), images)

    def step(variables, images, labels, net=net):
      apply = dfpjax.dfp_transform(lambda v, x: net.apply(v, x, mutable=["batch_stats"]))

      def loss_fn(params):
        logits, updates = apply({**variables, "params": params}, images)
        one_hot = jax.nn.one_hot(labels, 10)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, -1)), updates

      (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
      params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
      return {**updates, "params": params}, loss

    compiled = jax.jit(step, compiler_options=train.compiler_options(Config())).lower(
        variables, images, labels).compile()
    temp[recompute] = compiled.memory_analysis().temp_size_in_bytes
    outputs[recompute] = compiled(variables, images, labels)
  assert temp[True] < 0.8 * temp[False], temp
  assert_same_bits(outputs[False], outputs[True])


def test_recompute_region_with_a_complex_output_has_the_gradient_of_its_checkpoint():
  x, w = jnp.ones((4, 8)), jnp.full((8, 8), 0.1)
  region = dfpjax.recompute(lambda x, w: (x @ w).astype(jnp.complex64))
  loss = lambda x, w: jnp.sum(jnp.abs(region(x, w)) ** 2)
  np.testing.assert_allclose(jax.grad(dfpjax.dfp_transform(loss), 1)(x, w),
                             jax.grad(loss, 1)(x, w), rtol=1e-3)


def test_recompute_region_in_forward_mode_is_its_checkpoint():
  """A recompute region ties its backward pass to the cotangent (a custom_vjp); jax.jvp and
  jax.jacfwd, which have no backward pass, run it as the checkpoint it is."""
  x, w = jnp.ones((4, 8)), jnp.full((8, 8), 0.1)
  loss = lambda x, w: jnp.sum(dfpjax.recompute(lambda x, w: jnp.tanh(x @ w))(x, w))
  transformed = dfpjax.dfp_transform(loss)
  tangent = jax.jvp(transformed, (x, w), (x, w))[1]
  np.testing.assert_allclose(tangent, jax.jvp(loss, (x, w), (x, w))[1], rtol=1e-4)
  assert jax.jit(lambda x, w: jax.jvp(transformed, (x, w), (x, w))[1])(x, w) == tangent
  np.testing.assert_allclose(jax.jacfwd(transformed, 1)(x, w), jax.jacfwd(loss, 1)(x, w),
                             rtol=1e-3, atol=1e-4)


def recompute_steps(name: str, batch_size: int, variants=(False, True)):
  """The examples' DFP step of ``name`` at 32x32 (three classes), compiled with each of
  ``variants`` as ``recompute_block_tails`` (by default without and with every block tail
  recomputed), with its state; and a batch."""
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
           "label": np.arange(batch_size, dtype=np.int32) % 3}
  steps = {}
  for recompute in variants:
    config = Config(model=name, batch_size=batch_size, warmup_epochs=0, dfp=True,
                    model_kwargs={"recompute_block_tails": recompute})
    model = train.create_model(config, 3)
    state = train.create_train_state(config, model, 32, train.create_learning_rate_fn(config, 10))
    step = jax.jit(train.make_dfp_step(train.train_step, config),
                   compiler_options=train.compiler_options(config))
    steps[recompute] = step.lower(state, batch).compile(), state
  return steps, batch


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_recomputed_block_tails_change_no_bits(name):
  """The block tails' convolution outputs recomputed in the backward pass from their INT16
  operands (``dfpjax.recompute``): the same DFP products, so the same step, bit for bit. (At
  224x224 batch 16 XLA:CPU rounds the tails' BatchNorm running means and the head's gradient
  differently in the last bit: 22 of 434 leaves, docs/performance.md "Memory of the ResNet-50
  DFP step".)"""
  steps, batch = recompute_steps(name, 8 if name == "resnet18" else 2)
  outputs = {k: step(state, batch) for k, (step, state) in steps.items()}
  assert_same_bits(outputs[False], outputs[True])
  hlo = {k: step.as_text() for k, (step, _) in steps.items()}
  target = f'custom_call_target="{cpu_ffi.CONV_TARGET}"'
  blocks = 8 if name == "resnet18" else 16
  projections = 3 if name == "resnet18" else 4
  # One forward product more per recomputed convolution: each block's last and each projection.
  assert hlo[True].count(target) == hlo[False].count(target) + blocks + projections


def test_weight_gradient_tie_changes_no_bits(monkeypatch):
  """Each DFP product's input gradient tied to its weight gradient's kernel call
  (``bilinear._cotangent_value``) orders the schedule and nothing else: the examples' ResNet-18
  DFP step with and without the tie, every leaf bit for bit."""
  config = Config(model="resnet18", batch_size=4, warmup_epochs=0, dfp=True)
  state, batch = resnet18_step(config)
  outputs, hlo = {}, {}
  for tied, after in (("without", lambda value, anchor: value), ("with", bilinear.after)):
    monkeypatch.setattr(bilinear, "after", after)
    jax.clear_caches()  # the lowering of the other variant would be reused
    step = jax.jit(train.make_dfp_step(train.train_step, config),
                   compiler_options=train.compiler_options(config))
    compiled = step.lower(state, batch).compile()
    outputs[tied], hlo[tied] = compiled(state, batch), compiled.as_text()
  assert hlo["with"] != hlo["without"]
  assert_same_bits(outputs["without"], outputs["with"])


def test_recompute_block_tails_takes_stages():
  """``recompute_block_tails=(1, 3)``: the tails of those stages' blocks (two each in ResNet-18)
  and their projections are recomputed, the others kept; the same bits as none recomputed."""
  steps, batch = recompute_steps("resnet18", 8, variants=(False, (1, 3)))
  outputs = {k: step(state, batch) for k, (step, state) in steps.items()}
  assert_same_bits(outputs[False], outputs[(1, 3)])
  target = f'custom_call_target="{cpu_ffi.CONV_TARGET}"'
  count = {k: step.as_text().count(target) for k, (step, _) in steps.items()}
  assert count[(1, 3)] == count[False] + 2 * 2 + 2


def test_recompute_block_tails_names_stages_that_do_not_exist():
  model = train.create_model(Config(model="resnet18", model_kwargs={
      "recompute_block_tails": (0, 4)}), 3)
  with pytest.raises(ValueError, match=r"recompute_block_tails: stages \[4\] do not exist; "
                                       r"the network's stages are \[0, 1, 2, 3\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_dfp_resnet50_recomputes_the_tails_of_its_first_stages_unless_told_not_to():
  """Where recomputing saves memory (models.DFP_RECOMPUTED_STAGES): ResNet-50's first two
  stages in DFP runs, no ResNet-18 tail, nothing in FP32 runs."""
  for dfp, stages in ((False, False), (True, (0, 1))):
    assert train.create_model(Config(model="resnet50", dfp=dfp), 3).recompute_block_tails == stages
  assert train.create_model(Config(model="resnet18", dfp=True), 3).recompute_block_tails is False
  on = Config(model="resnet18", dfp=True, model_kwargs={"recompute_block_tails": True})
  assert train.create_model(on, 3).recompute_block_tails is True
  off = Config(model="resnet50", dfp=True, model_kwargs={"recompute_block_tails": False})
  assert train.create_model(off, 3).recompute_block_tails is False
  assert not hasattr(train.create_model(Config(model="alexnet", dfp=True), 3),
                     "recompute_block_tails")


def test_resnet_block_outputs_are_computed_once_with_the_same_bits(monkeypatch):
  """ResNet-50's block outputs ``dfpjax.materialized`` (``models.block_tail``; the patch below
  also leaves the max pool's offsets unmaterialized): without it XLA:CPU recomputes a stage's
  residual stream, block after block, inside each consumer of a block output (fusions of 30-40
  operands: every BatchNorm of the stage); with it no fusion takes more than one block tail's
  operands, and the step has the same bits."""
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
           "label": np.arange(2, dtype=np.int32) % 3}
  config = Config(model="resnet50", batch_size=2, warmup_epochs=0, dfp=True)
  state = train.create_train_state(config, train.create_model(config, 3), 32,
                                   train.create_learning_rate_fn(config, 10))
  outputs, widest = {}, {}
  for kept, materialized in (("without", lambda x: x), ("with", dfpjax.materialized)):
    monkeypatch.setattr(dfpjax, "materialized", materialized)
    jax.clear_caches()  # the lowering of the other variant would be reused
    step = jax.jit(train.make_dfp_step(train.train_step, config),
                   compiler_options=train.compiler_options(config))
    compiled = step.lower(state, batch).compile()
    fusions = re.findall(r"= \S+ fusion\(([^)]*)\)", compiled.as_text())
    widest[kept] = max(operands.count("%") for operands in fusions)
    outputs[kept] = compiled(state, batch)
  assert widest["with"] <= 16 < widest["without"], widest
  assert_same_bits(outputs["without"], outputs["with"])


def test_the_tie_leaves_out_a_weight_gradient_nobody_asked_for():
  """With the weights frozen (the gradient taken with respect to the input only) XLA must still
  drop the weight-gradient product: the tie applies only where both gradients are wanted."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))

  def loss(x, w):
    y = dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y)

  target = f'custom_call_target="{cpu_ffi.CONV_TARGET}"'
  calls = {argnums: jax.jit(jax.grad(loss, argnums)).lower(x, w).compile().as_text().count(target)
           for argnums in (0, (0, 1))}
  assert calls == {0: 2, (0, 1): 3}  # forward + backward-data (+ backward-weights)
