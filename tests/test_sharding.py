"""DFP under ``jax.jit`` sharding: the batch split over 1, 2 or 4 simulated CPU devices gives
the same bits in every pass (spec sections 2-4: global exponents, exact sums rounded once),
and no device gathers the batch, except the INT16 operands of a weight gradient larger than
them, which each device then computes a block of."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest

import dfpjax
from multidevice import Run, run_on_devices

BATCH = 8
DEVICE_COUNTS = (1, 2, 4)

_ALL_PASSES = """
def all_passes(name, op, x, w, x_sharding, w_sharding):
  \"\"\"Reports the forward output, input gradient, weight gradient (it contracts the batch)
  and the forward-mode tangent (jax.jvp) of ``op(x, w)``, and the compiled program.\"\"\"
  x, w = jax.device_put(x, x_sharding), jax.device_put(w, w_sharding)
  def passes(x, w):
    y, vjp = jax.vjp(op, x, w)
    _, tangent = jax.jvp(op, (x, w), (jnp.cos(x), jnp.sin(w)))
    return (y, *vjp(jnp.sin(3.0 * y)), tangent)
  step = jax.jit(passes)
  report_hlo(step.lower(x, w).compile())
  for pass_name, value in zip(("forward", "input_grad", "weight_grad", "tangent"), step(x, w)):
    report(f"{name}.{pass_name}", value)
"""

_OPS = _ALL_PASSES + """
from jax import lax
split = dict(x_sharding=NamedSharding(mesh, P("data")), w_sharding=NamedSharding(mesh, P()))
keys = jax.random.split(jax.random.key(0), 6)

dense = lambda x, w: dfpjax.dfp_dot_general(x, w, (((1,), (0,)), ((), ())))
all_passes("dot", dense, jax.random.normal(keys[0], (8, 24)), jax.random.normal(keys[1], (24, 5)),
           **split)

def conv(x, w):
  return dfpjax.dfp_conv_general_dilated(x, w, (2, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
all_passes("conv", conv, jax.random.normal(keys[2], (8, 7, 6, 3)),
           jax.random.normal(keys[3], (3, 3, 3, 4)), **split)
all_passes("conv_wide", conv, 1e-3 * jax.random.normal(keys[4], (8, 5, 5, 20)),
           jax.random.normal(keys[5], (3, 3, 20, 6)), **split)
"""

_TRAIN_STEP = """
import flax.linen as nn

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))

net = Net()
x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
labels = jnp.arange(8) % 3
params = net.init(jax.random.key(2), x)

def loss(params, x, labels):
  logits = net.apply(params, x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

step = jax.jit(dfpjax.dfp_transform(jax.value_and_grad(loss)))
x = jax.device_put(x, NamedSharding(mesh, P("data")))
labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
params = jax.device_put(params, NamedSharding(mesh, P()))
report_hlo(step.lower(params, x, labels).compile())
value, grads = step(params, x, labels)
report("loss", value)
for path, g in jax.tree_util.tree_leaves_with_path(grads):
  report(jax.tree_util.keystr(path), g)
"""


_WEIGHT_GRADS = [f"{op}.weight_grad" for op in ("dot", "conv", "conv_wide")]


@pytest.fixture(scope="module")
def op_runs():
  return {n: run_on_devices(_OPS, n) for n in DEVICE_COUNTS}


@pytest.fixture(scope="module")
def train_runs():
  return {n: run_on_devices(_TRAIN_STEP, n) for n in DEVICE_COUNTS}


def _assert_gathers_only_weight_gradients(run, weight_gradients):
  """No all-gather of the batch: the only all-gathers collect the devices' blocks of encoded
  float32 weight gradients (``partitioning.sum_and_encode``), each as large as a weight."""
  sizes = {run.results[name].size for name in weight_gradients}
  for result in run.all_gathers():
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", result).groups()
    assert dtype == "f32" and math.prod(map(int, dims.split(","))) in sizes, result


def _exchanged_blocks(hlo: str) -> set[tuple[str, tuple[int, ...]]]:
  """The blocks the all-to-alls exchange, each as (dtype, dimensions without the unit ones):
  XLA:CPU's all-to-all takes one tuple element a device, since jaxlib 0.12.1 with a unit
  dimension at the split."""
  blocks = set()
  for elements in re.findall(r"= \(([^=\n]*)\) all-to-all\(", hlo):
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", elements):
      blocks.add((dtype, tuple(int(d) for d in dims.split(",") if d != "1")))
  return blocks


def _assert_same_bits(runs, names, counts=DEVICE_COUNTS[1:]):
  one = runs[1].results
  for n in counts:
    for name in names:
      np.testing.assert_array_equal(runs[n].results[name].view(np.uint32),
                                    one[name].view(np.uint32), err_msg=f"{name} on {n} devices")


@pytest.mark.parametrize("op", ["dot", "conv", "conv_wide"])
@pytest.mark.parametrize("pass_name", ["forward", "input_grad", "weight_grad", "tangent"])
def test_ops_are_bit_identical_on_1_2_4_devices(op_runs, op, pass_name):
  _assert_same_bits(op_runs, [f"{op}.{pass_name}"])


def test_ops_under_auto_axes_give_the_same_bits(op_runs):
  auto = run_on_devices(_OPS, 4, axis_type="Auto")
  _assert_gathers_only_weight_gradients(auto, _WEIGHT_GRADS)
  for name, value in op_runs[1].results.items():
    np.testing.assert_array_equal(auto.results[name].view(np.uint32), value.view(np.uint32),
                                  err_msg=name)


def test_ops_gather_no_batch(op_runs):
  assert op_runs[1].all_gathers() == []
  for n in DEVICE_COUNTS:
    _assert_gathers_only_weight_gradients(op_runs[n], _WEIGHT_GRADS)


def test_ops_run_their_kernels_per_shard(op_runs):
  """The kernels see a quarter of the batch on 4 devices: the batch is split, not repeated.
  The weight gradients, which contract it, are the kernels' exact sums in two parts
  (``partitioning.split_sums``: 2 terms per device in the dot, 48 and 30 in the convolutions,
  so uint8, uint16 and uint8 low parts), each added by a reduce-scatter of its own (no float64
  or int64 dot of XLA's); each device encodes its quarter of the sums, and an all-gather
  collects the float32 results."""
  hlo = "\n".join(op_runs[4].hlo)
  assert f"f32[{BATCH // 4},24]" in hlo and "dfpjax_dot_general" in hlo
  assert f"s16[{BATCH // 4},7,6,3]" in hlo and "dfpjax_conv" in hlo
  # dot [1, 24, 5], conv [3, 3, 3, 4], conv_wide [3, 3, 20, 6]: split after the first
  # dimensions whose product 4 divides.
  for rows, cols, low in ((24, 5, "u8"), (108, 1, "u16"), (180, 6, "u8")):
    for part in ("s32", low):
      assert re.search(rf"{part}\[{rows // 4},{cols}\][^ ]* reduce-scatter\(", hlo), (rows, part)
    assert re.search(rf"f32\[{rows},{cols}\][^ ]* all-gather\(", hlo), (rows, cols)
  assert not re.search(r"= (s64|s32|u16|u8)\[[^]]*\][^ ]* all-reduce\(", hlo)
  assert not re.search(r"s64\[[^]]*\][^ ]* reduce-scatter\(", hlo)
  assert not re.search(r"= [fs]64\[[^]]*\][^ ]* (dot|convolution)\(", hlo)


def _entry_inputs(hlo: str, output: int) -> dict[str, str]:
  """The instructions of the entry computation (name -> the text after ``=``) that output
  ``output`` of its ROOT tuple is computed from, itself included."""
  entry = hlo[hlo.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  lines, root = {}, None
  for line in entry.splitlines()[1:]:
    match = re.match(r"\s*(ROOT )?%(\S+) = (.*)", line)
    if not match:
      continue
    is_root, name, text = match.groups()
    lines[name] = text.split(", metadata=")[0]
    root = name if is_root else root
  operands = lambda name: [o for o in re.findall(r"%([\w.\-]+)", lines[name]) if o in lines]
  todo, seen = [operands(root)[output]], {}
  while todo:
    name = todo.pop()
    if name not in seen:
      seen[name] = lines[name]
      todo += operands(name)
  return seen


def _kernel_calls(instructions: dict[str, str]) -> set[str]:
  return {name for name, text in instructions.items()
          if re.search(r'custom_call_target="dfpjax_(dot_general|conv)"', text)}


@pytest.mark.parametrize("devices", [1, 4])
def test_input_gradient_waits_for_the_weight_gradients_kernel_not_its_sum(op_runs, devices):
  """``bilinear._cotangent_value`` ties the input gradient to the weight gradient's kernel
  call, so that XLA runs every layer's weight gradient in its layer; on 4 devices to that call's
  partial sums (in two parts), before their reduce-scatters and all-gather: no wait for the
  cross-device sum."""
  for hlo in op_runs[devices].hlo:  # outputs: forward, input gradient, weight gradient, tangent
    input_grad, weight_grad = _entry_inputs(hlo, 1), _entry_inputs(hlo, 2)
    weight_kernels = _kernel_calls(weight_grad) - _kernel_calls(_entry_inputs(hlo, 0))
    assert weight_kernels and weight_kernels <= set(input_grad), weight_kernels
    if devices > 1:  # the sums' two parts
      assert all(re.match(r"\(s32\[[^]]*\][^ ]*, u(8|16)\[", weight_grad[k]) for k in weight_kernels)
      collectives = r" (reduce-scatter|all-gather|all-to-all)\("
      assert not [t for t in input_grad.values() if re.search(collectives, t)]
      assert [t for t in weight_grad.values() if re.search(collectives, t)]


def test_train_step_products_are_bit_identical_on_1_2_4_devices(train_runs):
  """The weight gradients are DFP products (of the batch's global-exponent cotangents and
  activations): the same bits. The loss mean and the bias gradients are XLA's own float sums
  over the batch, whose split may change their last bits (docs/transform.md)."""
  names = list(train_runs[1].results)
  products = [name for name in names if "kernel" in name]
  assert len(names) == 5 and len(products) == 2
  _assert_same_bits(train_runs, products)
  for n in DEVICE_COUNTS[1:]:
    for name in set(names) - set(products):
      np.testing.assert_allclose(train_runs[n].results[name], train_runs[1].results[name],
                                 rtol=1e-6, atol=1e-9, err_msg=f"{name} on {n} devices")


def test_train_step_gathers_no_batch(train_runs):
  for n in DEVICE_COUNTS:
    kernels = [name for name in train_runs[n].results if "kernel" in name]
    _assert_gathers_only_weight_gradients(train_runs[n], kernels)


_RESNET18 = """
import sys
sys.path.insert(0, REPO)
from examples.imagenet import models
model = models.create_model("resnet18", 10, num_filters=4)
x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
labels = jnp.arange(16) % 10
variables = model.init(jax.random.key(2), x, train=False)

def loss(params, x, labels):  # BatchNorm on running statistics: no float sum over the batch
  logits = model.apply({**variables, "params": params}, x, train=False)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

step = jax.jit(dfpjax.dfp_transform(jax.value_and_grad(loss)))
args = (jax.device_put(variables["params"], NamedSharding(mesh, P())),
        jax.device_put(x, NamedSharding(mesh, P("data"))),
        jax.device_put(labels, NamedSharding(mesh, P("data"))))
report_hlo(step.lower(*args).compile())
for path, g in jax.tree_util.tree_leaves_with_path(step(*args)[1]):
  report(jax.tree_util.keystr(path), g)
"""


def test_resnet18_weight_gradients_are_bit_identical_on_1_and_4_devices():
  """The examples' ResNet-18 with BatchNorm on running statistics, so that no float sum over
  the batch feeds a product: all 21 of its convolution and dense weight gradients (DFP
  products, the batch contracted across devices) are one device's bits, and the 4-device
  step gathers no batch. (Training-mode BatchNorm sums the batch in float: docs/transform.md.)"""
  snippet = f"REPO = {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}\n" + _RESNET18
  runs = {n: run_on_devices(snippet, n) for n in (1, 4)}
  kernels = [name for name in runs[1].results if "kernel" in name]
  _assert_gathers_only_weight_gradients(runs[4], kernels)
  assert len(kernels) == 21
  _assert_same_bits({n: runs[n] for n in (1, 4)}, kernels, counts=(4,))


_SHORT_WEIGHT_GRADIENTS = _ALL_PASSES + """
# A few pixels an example and more weights than the batch's elements (ResNet's last stages):
# the weight gradient is computed from the gathered batch, each device its block of dy's
# channels, for a replicated weight and for one split along its output channels (ZeRO); the
# split weight's forward product and input gradient work on the whole batch too, each device
# with its own block of the weight.
keys = jax.random.split(jax.random.key(7), 2)
def conv(x, w):
  return dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
x, w = jax.random.normal(keys[0], (8, 2, 2, 16)), jax.random.normal(keys[1], (3, 3, 16, 16))
for name, w_spec in (("replicated", P()), ("sharded", P(None, None, None, "data"))):
  all_passes(name, conv, x, w, NamedSharding(mesh, P("data")), NamedSharding(mesh, w_spec))
"""


def test_short_products_from_the_gathered_batch_give_one_devices_bits():
  """Where the batch's operands hold fewer elements than the weight
  (``partitioning.gathers_the_batch``), each device gathers the batch's INT16 activations,
  receives the whole batch of its quarter of the cotangent's channels (an all-to-all) and
  sums the whole batch for its quarter of the weight gradient: one device's bits in every
  pass. A replicated weight's other products run on the device's share of the batch, and its
  gradient is all-gathered in float32. A weight split along its output features is never
  gathered: the forward product computes the whole batch's output for the device's block of
  features (an all-to-all returns the batch split), the input gradient sums the whole batch
  of the device's block of cotangent channels against it (exact partial sums of the device's
  share of the batch, reduce-scattered), and the weight gradient stays split."""
  runs = {n: run_on_devices(_SHORT_WEIGHT_GRADIENTS, n) for n in DEVICE_COUNTS}
  _assert_same_bits(runs, list(runs[1].results))
  replicated, sharded = runs[4].hlo
  for hlo in (replicated, sharded):
    assert re.search(r"= s16\[8,2,2,16\][^ ]* all-gather\(", hlo)
    assert ("s16", (2, 2, 2, 4)) in _exchanged_blocks(hlo)  # dy's channel blocks
  assert "reduce-scatter(" not in replicated
  assert re.search(r"= f32\[3,3,16,16\][^ ]* all-gather\(", replicated)
  assert not re.search(r"= (s16|f32)\[3,3,16,16\][^ ]* all-gather\(", sharded)
  # The forward output's blocks of features, exchanged for the device's share of the batch.
  assert ("f32", (2, 2, 2, 4)) in _exchanged_blocks(sharded)
  scattered = re.findall(r"= (\w+)\[([\d,]+)\][^ ]* reduce-scatter\(", sharded)
  assert scattered and all(dims == "2,2,2,16" for _, dims in scattered), scattered


_PER_EXAMPLE_EXPONENTS = """
# A convolution mapped over examples (jax.vmap): its batching rule makes the examples one batch
# with an exponent each. Examples of different scales, a weight split along its output
# features that outweighs them: the gathered batch takes the examples' exponents along.
keys = jax.random.split(jax.random.key(7), 2)
x = 2.0 ** jnp.arange(8.0)[:, None, None, None] * jax.random.normal(keys[0], (8, 2, 2, 16))
w = jax.random.normal(keys[1], (3, 3, 16, 16))
def conv(x, w):
  return dfpjax.dfp_conv_general_dilated(x[None], w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
mapped = jax.jit(jax.vmap(conv, in_axes=(0, None)))
x = jax.device_put(x, NamedSharding(mesh, P("data")))
w = jax.device_put(w, NamedSharding(mesh, P(None, None, None, "data")))
report_hlo(mapped.lower(x, w).compile())
report("forward", mapped(x, w))
"""


def test_per_example_exponents_on_the_gathered_batch_give_one_devices_bits():
  """The forward product on the gathered batch (``partitioning.output_block_of_gathered_batch``)
  with an exponent per example (a ``vmap``ped convolution): each device gathers the examples'
  exponents with their mantissas, and the output is one device's bits."""
  runs = {n: run_on_devices(_PER_EXAMPLE_EXPONENTS, n, axis_type="Auto") for n in DEVICE_COUNTS}
  _assert_same_bits(runs, ["forward"])
  assert re.search(r"= s32\[8\][^ ]* all-gather\(", runs[4].hlo[0])
  assert re.search(r"= s16\[8,2,2,16\][^ ]* all-gather\(", runs[4].hlo[0])


_SHARD_MAP = """
from functools import partial
shared = dfpjax.QuantConfig(exponent_axes=("data",))
config = dfpjax.DFPConfig(forward=shared, gradient=shared)
keys = jax.random.split(jax.random.key(3), 4)

def conv(x, w):
  return dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME", config=config,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
def dense(x, w):
  return dfpjax.dfp_dot_general(x, w, (((1,), (0,)), ((), ())), config=config)

# Examples of different scales: each shard's own abs-max would give it its own exponent.
scales = 2.0 ** jnp.arange(8.0)
for name, op, x, w in (("conv", conv, scales[:, None, None, None] * jax.random.normal(
                            keys[0], (8, 5, 5, 3)), jax.random.normal(keys[1], (3, 3, 3, 4))),
                       ("dot", dense, scales[:, None] * jax.random.normal(keys[2], (8, 12)),
                        jax.random.normal(keys[3], (12, 5)))):
  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P("data"),) * 3)
  def passes(x, w):
    y, vjp = jax.vjp(lambda x: op(x, w), x)
    _, tangent = jax.jvp(lambda x: op(x, w), (x,), (x * jnp.cos(x),))
    return y, vjp(jnp.sin(3.0 * y) * jnp.abs(y))[0], tangent  # per-example scales
  y, dx, tangent = passes(jax.device_put(x, NamedSharding(mesh, P("data"))),
                          jax.device_put(w, NamedSharding(mesh, P())))
  report(f"{name}.forward", y)
  report(f"{name}.input_grad", dx)
  report(f"{name}.tangent", tangent)
"""


def test_shard_map_exponent_axes_give_one_devices_bits():
  """With ``exponent_axes`` a shard_map body quantizes each shard with the whole batch's
  exponent: forward outputs, input gradients and tangents are the bits of one device."""
  runs = {n: run_on_devices(_SHARD_MAP, n) for n in (1, 4)}
  for name in runs[1].results:
    np.testing.assert_array_equal(runs[4].results[name].view(np.uint32),
                                  runs[1].results[name].view(np.uint32), err_msg=name)


def test_exponent_axes_must_name_axes():
  with pytest.raises(TypeError, match="exponent_axes must be a tuple of mesh axis names"):
    dfpjax.QuantConfig(exponent_axes="data")


_SUM_AND_ENCODE = """
from dfpjax.primitives import partitioning, reference
rng = np.random.default_rng(0)
# On 4 devices, each shape with the dimension its result is also wanted split along (or
# None): rows split after dimension 0 (wanted split along that same dimension: the direct
# reduce-scatter); no leading dimensions divide (the all-reduce; the direct reduce-scatter
# along dimension 2); rows split after dimension 1 (exchanged by an all-to-all for dimension
# 2, the rows ending at it); rows split after dimension 0 (the all-to-all, rows ending before
# dimension 2).
for shape, d in (((4, 6), 0), ((3, 5), None), ((3, 5, 8), 2), ((2, 6, 8), 2), ((4, 3, 8), 2)):
  with jax.enable_x64(True):
    s = jnp.asarray(rng.integers(-2**40, 2**40, (4, *shape)))
    ea = jnp.asarray(rng.integers(-60, 0, (*shape[:-1], 1)), jnp.int32)
    ea = ea.at[(0,) * ea.ndim].set(dfpjax.numerics.quantization.NONFINITE_EXPONENT)
    eb = jnp.int32(-3)
    one = lambda parts: parts[0]
    # The same sums in two parts: high s >> 12 (|high| < 2**28) and low s mod 2**12, whose
    # sums over 4 devices fit int32 and uint16.
    halves = lambda s: [(s >> 12).astype(jnp.int32), (s & 4095).astype(jnp.uint16)]
    join = lambda parts: (parts[0].astype(jnp.int64) << 12) + parts[1].astype(jnp.int64)
    ways = {"split": lambda s: partitioning.sum_and_encode([s[0]], one, ea, eb, np.float32, mesh, "data"),
            "halves": lambda s: partitioning.sum_and_encode(halves(s[0]), join, ea, eb, np.float32, mesh,
                                                            "data"),
            "psum": lambda s: reference.encode_sums(jax.lax.psum(s[0], "data"), ea, eb, np.float32)}
    for name, fn in ways.items():
      f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))
      report(f"{shape}.{name}", f(jax.device_put(s, NamedSharding(mesh, P("data")))))
    # The result wanted split along a dimension: each device keeps its encoded block.
    if d is not None:
      for name, parts, rejoin in (("scattered", lambda s: [s], one), ("scattered_halves", halves, join)):
        scatter = lambda s: partitioning.sum_and_encode(parts(s[0]), rejoin, ea, eb, np.float32, mesh,
                                                        "data", d)
        f = jax.jit(jax.shard_map(scatter, mesh=mesh, in_specs=P("data"), check_vma=False,
                                  out_specs=P(*(None,) * d, "data")))
        report(f"{shape}.{name}", f(jax.device_put(s, NamedSharding(mesh, P("data")))))
"""


_SPLIT_EDGES = """
from jax import lax
from dfpjax.primitives import partitioning
# A product contracting the sharded batch with every term at +-32767 * 32767 (1.99997 quantizes
# to 32767): on 4 devices 32 terms each, the most the uint8 low parts admit there, and
# 4 * 8193 terms, one more per device than any split admits there (int64 sums). The low parts'
# rows of 2 columns travel as uint8, of 4 columns as uint32 words of 4 lanes.
full = 1.99997
for name, batch, columns in (("uint8_edge", 128, 2), ("uint8_edge_words", 128, 4),
                             ("int64_fallback", 4 * 8193, 2)):
  x = jnp.full((batch, 4), full).at[:, 2:].set(-full)
  y = jnp.full((batch, columns), full)
  contract = jax.jit(lambda x, y: dfpjax.dfp_dot_general(x, y, (((0,), (0,)), ((), ()))))
  x, y = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
  report_hlo(contract.lower(x, y).compile())
  report(name, contract(x, y))
"""


def test_split_sums_at_their_bound_give_one_devices_bits():
  """Sums at the very bound of their format (every term the largest product, at the largest
  reduction the format admits) and past every split format (the int64 fallback) give one
  device's bits on 2 and 4 devices."""
  runs = {n: run_on_devices(_SPLIT_EDGES, n) for n in DEVICE_COUNTS}
  for edge in ("uint8_edge", "uint8_edge_words"):
    np.testing.assert_allclose(np.abs(runs[1].results[edge]), 128 * 1.99997**2, rtol=1e-4)
  _assert_same_bits(runs, ["uint8_edge", "uint8_edge_words", "int64_fallback"])
  edge, words, fallback = runs[4].hlo
  assert re.search(r"u8\[[^]]*\][^ ]* reduce-scatter\(", edge)
  assert re.search(r"u32\[[^]]*\][^ ]* reduce-scatter\(", words)
  assert not re.search(r"u8\[[^]]*\][^ ]* reduce-scatter\(", words)
  assert not re.search(r"s64\[[^]]*\][^ ]* reduce-scatter\(", edge + words)
  assert re.search(r"s64\[[^]]*\][^ ]* reduce-scatter\(", fallback)


def test_sum_and_encode_is_the_encoded_all_reduce():
  """Each device encoding its block of the reduce-scattered int64 sums, or of their two
  parts reduce-scattered each on its own and rejoined, gives the bits of encoding the
  all-reduced sums, NaN markers included, whether the sums split evenly or not, and whether
  the blocks are gathered or stay split (a result wanted sharded)."""
  run = run_on_devices(_SUM_AND_ENCODE, 4)
  for shape in ((4, 6), (3, 5), (3, 5, 8), (2, 6, 8), (4, 3, 8)):
    psum = run.results[f"{shape}.psum"]
    for way in ("split", "halves"):
      got = run.results[f"{shape}.{way}"]
      assert got.shape == shape and np.isnan(got.reshape(-1)[0])
      np.testing.assert_array_equal(got.view(np.uint32), psum.view(np.uint32), err_msg=f"{shape} {way}")
    if shape != (3, 5):
      for name in ("scattered", "scattered_halves"):
        scattered = run.results[f"{shape}.{name}"]
        np.testing.assert_array_equal(scattered.view(np.uint32), psum.view(np.uint32),
                                      err_msg=f"{shape} {name}")


_MESH_2D = _ALL_PASSES + """
axis_type = mesh.axis_types[0]
mesh = jax.make_mesh((2, 2) if len(jax.devices()) == 4 else (1, 1), ("data", "model"),
                     axis_types=(axis_type,) * 2)
keys = jax.random.split(jax.random.key(0), 4)
at = lambda rank, d: P(*["model" if i == d else None for i in range(rank)])

# name: (op, x, weights, the weights' input and output feature dimensions)
ops = {
    "dot_kn": (lambda x, w: dfpjax.dfp_dot_general(x, w, (((1,), (0,)), ((), ()))), (32, 6), (6, 8), 0, 1),
    "dot_nk": (lambda x, w: dfpjax.dfp_dot_general(x, w, (((1,), (1,)), ((), ()))), (32, 6), (8, 6), 1, 0)}
for layout, w_shape, w_in, w_out in (("HWIO", (3, 3, 4, 6), 2, 3), ("OIHW", (6, 4, 3, 3), 1, 0)):
  ops[f"conv_{layout}"] = (lambda x, w, layout=layout: dfpjax.dfp_conv_general_dilated(
      x, w, (2, 1), "SAME", dimension_numbers=("NHWC", layout, "NHWC")),
      (16, 7, 6, 4), w_shape, w_in, w_out)
for name, (op, x_shape, w_shape, w_in, w_out) in ops.items():
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  features = P("data", *(None,) * (len(x_shape) - 2), "model")
  for split, x_spec, w_spec in (("x_features", features, P()),
                                ("w_in", P("data"), at(len(w_shape), w_in)),
                                ("w_out", P("data"), at(len(w_shape), w_out))):
    all_passes(f"{name}.{split}", op, x, w, NamedSharding(mesh, x_spec), NamedSharding(mesh, w_spec))
"""


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_2d_mesh_batch_and_features_give_one_devices_bits(axis_type):
  """On a 2x2 mesh, the batch split over one axis and features (the input's, or the weights'
  input or output features) over the other, for dot_general and convolution with both
  weight layouts (backward-data reads the forward's weights transposed): every pass is one
  device's bits, and no device gathers a batch-sized kernel operand (the int16 mantissas
  gathered are at most a weight). Convolutions also gather no batch-sized float: only
  weights' and, where the input's features are split, the encoded halves of the contracted
  sums (forward and the tangent's two products), as large as each device's output block."""
  runs = {n: run_on_devices(_MESH_2D, n, axis_type=axis_type) for n in (1, 4)}
  names = list(runs[1].results)
  assert len(names) == 4 * 3 * 4
  _assert_same_bits(runs, names, counts=(4,))
  weight_size = {"dot": 48, "conv": 216}
  y_block = 8 * 4 * 6 * 6  # a device's output block of the convolutions
  for program, hlo in zip(names[::4], runs[4].hlo):
    op, split = program.split(".")[0].split("_")[0], program.split(".")[1]
    gathers = [(dtype, math.prod(map(int, dims.split(","))))
               for dtype, dims in (re.match(r"(\w+)\[([\d,]*)\]", g).groups()
                                   for g in Run([], [hlo]).all_gathers())]
    assert all(size <= weight_size[op] for dtype, size in gathers if dtype == "s16"), program
    if op == "conv":
      # The contracted sums' halves, where the input's features are split: by the program
      # (x_features), by XLA's propagation of the weights' split (w_in, under Auto), never with
      # the output features split (w_out).
      batch_sized = [size for _, size in gathers if size > weight_size[op]]
      expected = {"x_features": [[y_block] * 3], "w_in": [[y_block] * 3, []], "w_out": [[]]}[split]
      assert batch_sized in expected, (program, gathers)
