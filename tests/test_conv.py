"""dfp_conv_general_dilated: spec section 3 forward and section 4 gradients over the parameter space.

Expected values: the quantized operands dequantized into float64 (exact), convolved with
XLA's float64 convolution (exact at these sizes), rounded once to float32; gradients through
JAX's own transpose rules on those values.
"""

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import dfpjax
from dfpjax.numerics.quantization import NONFINITE_EXPONENT
from dfpjax.primitives import partitioning, reference, reference_mode, registry
from dfpjax.primitives.conv_general_dilated import MODES, Geometry, dfp_conv_p
import spec_oracle


def _f64(t):
  return np.asarray(t.mantissa, np.float64) * np.ldexp(1.0, int(t.exponent))


def _exact(fn, *quantized):
  with jax.enable_x64(True):
    return np.asarray(fn(*[jnp.asarray(_f64(t)) for t in quantized])).astype(np.float32)


LAYOUTS = {1: [("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW")],
           2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OHWI", "NCHW")],
           3: [("NDHWC", "DHWIO", "NDHWC")]}


def _random_conv(rng, empty=False):
  """A random valid convolution: rank, layout, strides, padding, dilations, groups; if empty,
  one whose input or output has no elements (spatial sizes from 0)."""
  nd = int(rng.choice([1, 2, 2, 2, 3]))
  layout = LAYOUTS[nd][rng.integers(len(LAYOUTS[nd]))]
  groups = int(rng.choice([1, 1, 2, 4]))
  depthwise = rng.random() < 0.2
  batch_groups = 1 if groups > 1 or depthwise else int(rng.choice([1, 1, 2]))
  in_features = int(rng.integers(1, 4)) * groups
  if depthwise:
    groups = in_features = int(rng.integers(2, 5))
  out_features = int(rng.integers(1, 3)) * groups * batch_groups
  batch = int(rng.integers(1, 3)) * batch_groups
  spatial = [int(rng.integers(0, 3) if empty else rng.integers(3, 9 if nd < 3 else 6)) for _ in range(nd)]
  window = [int(rng.integers(1, 4)) for _ in range(nd)]
  strides = [int(rng.integers(1, 4)) for _ in range(nd)]  # stride > kernel included
  rhs_dilation = [int(rng.integers(1, 3)) for _ in range(nd)]
  lhs_dilation = [int(rng.integers(1, 3)) for _ in range(nd)] if rng.random() < 0.3 else None
  if lhs_dilation is None and rng.random() < 0.5:
    padding = str(rng.choice(["SAME", "VALID"]))
  else:
    padding = [(int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(nd)]
  lhs_spec, rhs_spec, _ = layout
  dims = dict(N=batch, C=in_features, O=out_features, I=in_features // groups)
  lhs_shape = [dims[c] if c in "NC" else spatial["DHW"[-nd:].index(c)] for c in lhs_spec]
  rhs_shape = [dims[c] if c in "OI" else window["DHW"[-nd:].index(c)] for c in rhs_spec]
  kwargs = dict(window_strides=strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=layout, feature_group_count=groups,
                batch_group_count=batch_groups)
  try:
    out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, **kwargs),
                         jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                         jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  except (ValueError, TypeError):
    return _random_conv(rng, empty)
  if (0 in out.shape or 0 in lhs_shape) != empty:
    return _random_conv(rng, empty)
  lhs = rng.standard_normal(lhs_shape).astype(np.float32)
  rhs = rng.standard_normal(rhs_shape).astype(np.float32)
  return lhs, rhs, kwargs


@pytest.mark.parametrize("seed, empty", [(seed, False) for seed in range(12)] +
                         [(seed, True) for seed in range(12)])
def test_random_convolutions_forward_and_gradients(seed, empty):
  rng = np.random.default_rng(seed)
  lhs, rhs, kw = _random_conv(rng, empty)
  f = lambda a, b: dfpjax.dfp_conv_general_dilated(a, b, **kw)
  y, vjp = jax.vjp(f, lhs, rhs)
  g = rng.standard_normal(y.shape).astype(np.float32)
  da, db = vjp(g)
  qa, qb, qg = dfpjax.quantize(lhs), dfpjax.quantize(rhs), dfpjax.quantize(g)
  conv = lambda a, b: lax.conv_general_dilated(a, b, **kw)
  np.testing.assert_array_equal(np.asarray(y), _exact(conv, qa, qb))
  want_da = _exact(lambda g, b: jax.vjp(lambda a: conv(a, b), jnp.zeros(lhs.shape, g.dtype))[1](g)[0], qg, qb)
  want_db = _exact(lambda g, a: jax.vjp(lambda b: conv(a, b), jnp.zeros(rhs.shape, g.dtype))[1](g)[0], qg, qa)
  np.testing.assert_array_equal(np.asarray(da), want_da)
  np.testing.assert_array_equal(np.asarray(db), want_db)
  assert y.shape == conv(lhs, rhs).shape


def test_strided_grouped_gradients_under_jit_and_vmap():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 2, 11, 11, 8)).astype(np.float32)
  w = rng.standard_normal((3, 3, 2, 8)).astype(np.float32)
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
  loss = lambda x, w: jnp.sum(jnp.tanh(f(x, w)))
  per_example = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), (0, None)))(x, w)
  for i in range(3):
    gx, gw = jax.grad(loss, argnums=(0, 1))(x[i], w)
    np.testing.assert_array_equal(np.asarray(per_example[0][i]), np.asarray(gx))
    np.testing.assert_array_equal(np.asarray(per_example[1][i]), np.asarray(gw))
  with reference_mode():
    ref = jax.jit(lambda x, w: jax.grad(loss, argnums=(0, 1))(x, w))(x[0], w)
  np.testing.assert_array_equal(np.asarray(ref[1]), np.asarray(jax.grad(loss, argnums=1)(x[0], w)))


def test_weight_gradient_with_long_reduction_is_exact():
  """Backward-weights of a 1x1 convolution sums over N*H*W = 2**17 products of full-range
  same-sign mantissas: the exact sum is far beyond int32."""
  x = np.full((8, 128, 128, 1), 1.5, np.float32)
  w = np.full((1, 1, 1, 1), 0.75, np.float32)
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(f, x, w)
  _, dw = vjp(np.full((8, 128, 128, 1), 1.25, np.float32))
  assert float(dw[0, 0, 0, 0]) == 8 * 128 * 128 * 1.5 * 1.25


def test_nan_operand_gives_all_nan_output():
  x = np.ones((1, 5, 5, 2), np.float32)
  x[0, 2, 2, 1] = np.nan
  y = dfpjax.dfp_conv_general_dilated(x, np.ones((3, 3, 2, 2), np.float32), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert np.isnan(np.asarray(y)).all()


def test_invalid_configurations_raise_at_trace_time():
  x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
  nhwc = ("NHWC", "HWIO", "NHWC")
  with pytest.raises(TypeError, match="lhs must be float32"):
    dfpjax.dfp_conv_general_dilated(x.astype(jnp.int32), w, (1, 1), "SAME", dimension_numbers=nhwc)
  with pytest.raises((TypeError, ValueError)):
    dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=nhwc, feature_group_count=3)
  with pytest.raises((TypeError, ValueError)):
    dfpjax.dfp_conv_general_dilated(x, jnp.ones((3, 3, 5, 6)), (1, 1), "SAME", dimension_numbers=nhwc)
  with pytest.raises(ValueError, match="lhs_dilation"):
    dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME", lhs_dilation=(2, 2), dimension_numbers=nhwc)
  with pytest.raises(NotImplementedError, match="granularity"):
    dfpjax.dfp_conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=nhwc,
        config=dfpjax.DFPConfig(forward=dfpjax.QuantConfig(granularity="channel")))


def _blocking_conv(rng):
  """A random NHWC convolution large enough to cross the kernel's blocking: several K blocks
  (taps * channels > 576), row and column cache blocks, odd tails, groups and dilations."""
  groups = int(rng.choice([1, 1, 2]))
  cin = int(rng.choice([1, 3, 37, 70, 130]))
  cout = int(rng.choice([1, 5, 17, 40, 300]))
  window = [int(rng.integers(1, 4)) for _ in range(2)]
  kw = dict(window_strides=[int(rng.integers(1, 3)) for _ in range(2)],
            padding=[(int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(2)],
            rhs_dilation=[int(rng.integers(1, 3)) for _ in range(2)],
            lhs_dilation=[int(rng.integers(1, 3)) for _ in range(2)] if rng.random() < 0.3 else None,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
  spatial = [int(rng.integers(5, 21)) for _ in range(2)]
  lhs = rng.standard_normal((int(rng.integers(1, 4)), *spatial, cin * groups)).astype(np.float32)
  rhs = rng.standard_normal((*window, cin, cout * groups)).astype(np.float32)
  return lhs, rhs, kw


def _forward_and_gradients(lhs, rhs, kw, g_seed=0):
  f = lambda a, b: dfpjax.dfp_conv_general_dilated(a, b, **kw)
  y, vjp = jax.vjp(jax.jit(f), lhs, rhs)
  g = np.random.default_rng(g_seed).standard_normal(y.shape).astype(np.float32)
  return [np.asarray(v) for v in (y, *vjp(g))]


# Convolutions with no output pixels: a window past the input, and an input with none ('SAME');
# few input channels (backward-data by col2im) and many, the latter also strided (backward-data
# then convolves dy dilated by the stride: an empty dy dilates to nothing); batch groups, whose
# backward-weights is a forward convolution with dy, now empty, as its window.
EMPTY_CASES = {"window_past_input": ((2, 3, 3, 3), (5, 5, 3, 4), dict(padding="VALID")),
               "input_without_pixels": ((2, 0, 5, 3), (3, 3, 3, 4), dict(padding="SAME")),
               "many_channels": ((2, 3, 3, 40), (5, 5, 40, 4), dict(padding="VALID")),
               "many_channels_strided": ((2, 4, 5, 20), (8, 3, 20, 4),
                                         dict(window_strides=(2, 1), padding=((0, 0), (1, 1)))),
               "batch_groups_window_past_input": ((4, 3, 3, 2), (5, 5, 2, 4),
                                                  dict(padding="VALID", batch_group_count=2)),
               "batch_groups_input_without_pixels": ((4, 7, 0, 2), (2, 2, 2, 4),
                                                     dict(window_strides=(2, 2), padding="SAME",
                                                          batch_group_count=2))}


def _empty_case_passes(lhs_shape, rhs_shape, kw):
  """The three passes on the forced path and on the reference twin (_forward_and_gradients),
  the forward output checked against lax's shape."""
  rng = np.random.default_rng(0)
  lhs = rng.standard_normal(lhs_shape).astype(np.float32)
  rhs = rng.standard_normal(rhs_shape).astype(np.float32)
  kw = {"window_strides": (1, 1), "dimension_numbers": ("NHWC", "HWIO", "NHWC"), **kw}
  got = _forward_and_gradients(lhs, rhs, kw)
  assert got[0].shape == lax.conv_general_dilated(lhs, rhs, **kw).shape
  with reference_mode():
    want = _forward_and_gradients(lhs, rhs, kw)
  return got, want


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_outputs_have_zero_gradients_on_every_path(isa, case):
  """An empty output, and zero gradients, as lax.conv_general_dilated gives, on the forced
  kernel path and the reference twin (the weight gradient's kernel divided by the output's
  pixels per image, which are none, and the twin stacked no patches)."""
  lhs_shape, rhs_shape, kw = EMPTY_CASES[case]
  got, want = _empty_case_passes(lhs_shape, rhs_shape, kw)
  assert got[0].size == 0 and got[0].shape == want[0].shape
  for a, b, shape in zip(got[1:], want[1:], (lhs_shape, rhs_shape)):
    np.testing.assert_array_equal(a, np.zeros(shape, np.float32))
    np.testing.assert_array_equal(b, a)


def test_empty_input_dilated_gives_laxs_output_of_zeros_on_every_path(isa):
  """An input with no pixels along a dilated dimension dilates to nothing, so its padding
  alone makes lax's output rows (4 here, not 3): zeros, with zero gradients."""
  got, want = _empty_case_passes((2, 0, 5, 3), (1, 3, 3, 4),
                                 dict(lhs_dilation=(2, 1), padding=((2, 2), (1, 1))))
  assert got[0].shape == (2, 4, 5, 4)
  for a, b, shape in zip(got, want, ((2, 4, 5, 4), (2, 0, 5, 3), (1, 3, 3, 4))):
    np.testing.assert_array_equal(a, np.zeros(shape, np.float32))
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("seed", range(5))
def test_kernel_equals_reference_on_every_path(isa, seed):
  """Forward, backward-data and backward-weights on the forced kernel path equal the pure-XLA
  reference bit for bit."""
  lhs, rhs, kw = _blocking_conv(np.random.default_rng(1000 + seed))
  got = _forward_and_gradients(lhs, rhs, kw)
  with reference_mode():
    want = _forward_and_gradients(lhs, rhs, kw)
  for name, a, b in zip(("forward", "backward-data", "backward-weights"), got, want):
    np.testing.assert_array_equal(a, b, err_msg=f"{name} on {isa} for {kw}")


def test_concurrent_calls_on_several_threads_equal_calls_one_at_a_time(isa):
  """The kernel's scratch buffers belong to the thread that runs a task, kept from call to call:
  convolutions of different sizes run at once from three threads, in turn on each (so that a
  thread's buffers grow and are reused by other shapes), give the bits of the same calls made
  one at a time."""
  cases = [_blocking_conv(np.random.default_rng(2000 + seed)) for seed in range(6)]

  calls = []
  for lhs, rhs, kw in cases:
    conv = functools.partial(dfpjax.dfp_conv_general_dilated, **kw)

    def forward_and_gradients(lhs, rhs, g, conv=conv):
      y, vjp = jax.vjp(conv, lhs, rhs)
      return (y, *vjp(g))

    shape = jax.eval_shape(conv, lhs, rhs).shape
    g = np.random.default_rng(lhs.size).standard_normal(shape).astype(np.float32)
    calls.append((jax.jit(forward_and_gradients), lhs, rhs, g))
  want = [[np.asarray(v) for v in fn(lhs, rhs, g)] for fn, lhs, rhs, g in calls]

  def run(order):
    return [(i, [np.asarray(v) for v in calls[i][0](*calls[i][1:])]) for _ in range(2) for i in order]

  orders = [list(range(k, len(calls))) + list(range(k)) for k in (0, 2, 4)]
  with concurrent.futures.ThreadPoolExecutor(len(orders)) as pool:
    results = [r for thread in pool.map(run, orders) for r in thread]
  assert len(results) == 2 * len(calls) * len(orders)
  for i, got in results:
    for name, a, b in zip(("forward", "backward-data", "backward-weights"), got, want[i]):
      np.testing.assert_array_equal(a, b, err_msg=f"{name} of case {i} on {isa}")


# 1x1 convolutions the kernel reads as plain GEMMs (stride 1, no padding: x is the patch matrix)
# and their near misses (stride, padding, lhs dilation), which must not take that route. Tails
# in M (pixels), N (out channels), K (in channels, or pixels for the weight gradient: odd and
# past one 512-column block), feature groups.
DENSE_CASES = {
    "odd_everything": ((1, 9, 7, 3), (1, 1, 3, 5), {}),
    "groups_long_pixels": ((2, 23, 25, 74), (1, 1, 37, 40), dict(feature_group_count=2)),
    "deep_channels": ((1, 6, 5, 1030), (1, 1, 1030, 70), {}),
    "strided": ((2, 11, 9, 20), (1, 1, 20, 33), dict(window_strides=(2, 1))),
    "padded": ((1, 10, 9, 18), (1, 1, 18, 9), dict(padding=((1, 0), (0, 2)))),
    "lhs_dilated": ((1, 7, 6, 16), (1, 1, 16, 8), dict(lhs_dilation=(2, 1), padding=((0, 1), (0, 0)))),
}


def _assert_passes_equal_reference(lhs, rhs, kw, where):
  """Forward, backward-data and backward-weights equal the reference twin's bits."""
  got = _forward_and_gradients(lhs, rhs, kw)
  with reference_mode():
    want = _forward_and_gradients(lhs, rhs, kw)
  for name, a, b in zip(("forward", "backward-data", "backward-weights"), got, want):
    np.testing.assert_array_equal(a, b, err_msg=f"{name} {where}")


@pytest.mark.parametrize("case", DENSE_CASES)
def test_1x1_convolutions_as_gemms_equal_reference_on_every_path(isa, case):
  """All three passes of 1x1 convolutions, dense or nearly so, on the forced kernel path equal
  the pure-XLA reference bit for bit."""
  lhs_shape, rhs_shape, extra = DENSE_CASES[case]
  rng = np.random.default_rng(len(case))
  lhs = rng.standard_normal(lhs_shape).astype(np.float32)
  rhs = rng.standard_normal(rhs_shape).astype(np.float32)
  kw = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kw.update(extra)
  _assert_passes_equal_reference(lhs, rhs, kw, f"on {isa} for {case}")


# Windows whose rows are runs of 8-32 elements in x (window width x channels), which the
# im2col copies move by fixed-size head and tail copies: each length band's ends, and the stem
# (7x7 stride 2 on 3 channels: 21), padded so that edge windows take the bounds-checked copy.
# Where consecutive pixels' rows lie a few words apart (the stem's 6; 8 channels at stride 1,
# whose two pairs' four rows fill exactly 32 words, over runs of an odd number of pairs), the
# AVX-512 copies take two pairs per load (backward-weights' taps view) or a part's pairs from two
# loads (the forward's pixels view).
SHORT_RUN_CASES = {
    "stem_21": ((1, 29, 27, 3), (7, 7, 3, 10), dict(window_strides=(2, 2), padding=((3, 3), (3, 3)))),
    "close_rows_32": ((2, 9, 11, 8), (3, 1, 8, 6), dict(padding=((1, 1), (0, 0)))),
    "runs_8": ((2, 9, 12, 2), (3, 4, 2, 7), dict(padding=((1, 1), (2, 1)))),
    "runs_15": ((1, 11, 13, 5), (2, 3, 5, 6), dict(window_strides=(1, 2), padding=((0, 1), (1, 1)))),
    "runs_32": ((1, 12, 14, 4), (2, 8, 4, 5), dict(padding=((1, 0), (3, 4)))),
}


@pytest.mark.parametrize("case", SHORT_RUN_CASES)
def test_short_window_rows_equal_reference_on_every_path(isa, case):
  """All three passes of convolutions whose window rows are short runs of x equal the pure-XLA
  reference bit for bit on the forced kernel path."""
  lhs_shape, rhs_shape, extra = SHORT_RUN_CASES[case]
  rng = np.random.default_rng(len(case) + 40)
  lhs = rng.standard_normal(lhs_shape).astype(np.float32)
  rhs = rng.standard_normal(rhs_shape).astype(np.float32)
  kw = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  kw.update(extra)
  _assert_passes_equal_reference(lhs, rhs, kw, f"on {isa} for {case}")


def test_weight_gradient_over_several_packing_rounds_on_every_path(isa):
  """Weight gradients whose int64 sums over all rows (288 or 300 x 256 columns) outgrow a task's
  budget, so that the kernel packs the cotangent in rounds of K blocks (4 MB each) shared by
  the tasks: a 3x3 window over 4900 pixels x 512 channels (9 K blocks, rounds of 8: on two
  threads the last round shorter than its two ranges, one empty) and a 1x1 window over 1600
  pixels (3 K blocks, one round). All passes equal the reference bit for bit."""
  rng = np.random.default_rng(11)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for lhs_shape, rhs_shape in (((1, 70, 70, 32), (3, 3, 32, 512)), ((1, 40, 40, 300), (1, 1, 300, 512))):
    lhs = rng.standard_normal(lhs_shape).astype(np.float32)
    rhs = rng.standard_normal(rhs_shape).astype(np.float32)
    _assert_passes_equal_reference(lhs, rhs, kw, f"on {isa}, {rhs_shape}")


def test_weight_gradient_with_the_cotangent_packed_in_the_tasks_on_every_path(isa):
  """Weight gradients whose tasks pack their own K blocks of the cotangent: the stem's kind
  (3 channels in, one row block; 260 channels out in two column blocks, 200 in one; 35 and 31
  K blocks) and, their sums small enough, two row blocks run on each packed block (3x3 x 32
  and 1x1 x 300 channels in; 6 and 7 K blocks). All passes equal the reference bit for bit."""
  rng = np.random.default_rng(13)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for lhs_shape, rhs_shape in (((2, 100, 100, 3), (3, 3, 3, 260)), ((2, 94, 94, 3), (3, 3, 3, 200)),
                               ((2, 40, 40, 32), (3, 3, 32, 40)), ((1, 60, 60, 300), (1, 1, 300, 24))):
    lhs = rng.standard_normal(lhs_shape).astype(np.float32)
    rhs = rng.standard_normal(rhs_shape).astype(np.float32)
    _assert_passes_equal_reference(lhs, rhs, kw, f"on {isa}, {rhs_shape}")


def test_weight_gradient_in_one_round_without_sums_on_every_path(isa):
  """Weight gradients whose cache blocks each reduce all pixels in one go, with no int64 sums
  across K ranges: over two K blocks (625 pixels, 3x3 x 256 -> 64: nine or ten row blocks by
  the path's tile, the avx2 path's ten enough tasks for two threads), and over a cotangent
  (2704 pixels x 1024 channels) the kernel packs at once because rounds would need more memory
  for their sums. All passes equal the reference bit for bit."""
  rng = np.random.default_rng(12)
  kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for lhs_shape, rhs_shape in (((1, 25, 25, 256), (3, 3, 256, 64)), ((1, 52, 52, 300), (1, 1, 300, 1024))):
    lhs = rng.standard_normal(lhs_shape).astype(np.float32)
    rhs = rng.standard_normal(rhs_shape).astype(np.float32)
    _assert_passes_equal_reference(lhs, rhs, kw, f"on {isa}, {rhs_shape}")


def test_int32_overflowing_sums_are_exact_on_every_path(isa):
  """Full-range same-sign mantissas: a 3x3x512 forward sum (K = 4608) and a 1x1 weight
  gradient over 2**15 pixels both exceed int32 many times over."""
  x = np.full((1, 6, 6, 512), 1.5, np.float32)
  w = np.full((3, 3, 512, 4), 0.75, np.float32)
  y = dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert float(y[0, 3, 3, 0]) == 9 * 512 * 1.5 * 0.75
  assert float(y[0, 0, 0, 0]) == 4 * 512 * 1.5 * 0.75
  x = np.full((2, 128, 128, 1), 1.5, np.float32)
  f = lambda w: dfpjax.dfp_conv_general_dilated(x, w, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(f, np.full((1, 1, 1, 3), 0.75, np.float32))
  (dw,) = vjp(np.full((2, 128, 128, 3), 1.25, np.float32))
  assert np.all(np.asarray(dw) == 2 * 128 * 128 * 1.5 * 1.25)


def test_vmap_keeps_each_examples_exponent():
  """vmap over the input joins the batch with one exponent per example: an example holding NaN
  turns only its own output to NaN, and every other example equals its own unbatched call."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 2, 9, 9, 6)).astype(np.float32)
  x[1] *= 1000.0  # a different exponent per example
  x[2, 0, 4, 4, 1] = np.nan
  w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, (2, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  batched = np.asarray(jax.jit(jax.vmap(f, (0, None)))(x, w))
  for i in range(4):
    np.testing.assert_array_equal(batched[i], np.asarray(f(x[i], w)))
  assert np.isnan(batched[2]).all() and not np.isnan(batched[[0, 1, 3]]).any()
  ws = rng.standard_normal((4, 3, 3, 6, 5)).astype(np.float32)
  both = np.asarray(jax.jit(jax.vmap(f))(x, ws))
  for i in (0, 1, 3):
    np.testing.assert_array_equal(both[i], np.asarray(f(x[i], ws[i])))


def test_strided_backward_data_phases_without_taps():
  """Backward-data of a 1x1 stride-3 convolution: 8 of 9 input phases get no tap (exact zeros),
  and a NaN in the cotangent still turns every element NaN (spec section 2)."""
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, (3, 3), "VALID",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x, w = np.ones((1, 9, 9, 2), np.float32), np.ones((1, 1, 2, 2), np.float32)
  y, vjp = jax.vjp(f, x, w)
  dx = np.asarray(vjp(np.ones(y.shape, np.float32))[0])
  hit = np.zeros((9, 9), bool)
  hit[::3, ::3] = True
  assert np.all(dx[0][hit] == 2.0) and np.all(dx[0][~hit] == 0.0)
  g = np.ones(y.shape, np.float32)
  g[0, 1, 2, 0] = np.nan
  dx, dw = vjp(g)
  assert np.isnan(np.asarray(dx)).all() and np.isnan(np.asarray(dw)).all()


def _expected_scaled(s, k):
  """Spec section 3 in float32 for any integer exponent k: past +-1000 no int64 sum escapes
  Inf or 0 (the oracle would build 2**k exactly)."""
  if s == 0 or abs(k) <= 1000:
    return spec_oracle.encode(s, k, np.float32)
  return math.copysign(math.inf if k > 0 else 0.0, s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ex,eb", [(2**31 - 2, 2**30), (-2**31, -2**30), (2**30 + 7, -2**30)],
                         ids=["to_inf", "to_zero", "cancelling"])
def test_huge_exponent_sums_saturate_exactly_on_every_path(isa, mode, ex, eb):
  """Hand-built exponents whose sum leaves int32 give the exact +-Inf or +-0 (zero sums stay
  +0) in every mode, and two huge exponents that cancel give the finite product."""
  rng = np.random.default_rng(7)
  x = rng.integers(-300, 301, (2, 5, 5, 3)).astype(np.int16)
  w = rng.integers(-300, 301, (1, 1, 3, 4)).astype(np.int16)
  dy = rng.integers(-300, 301, (2, 5, 5, 4)).astype(np.int16)
  x[0, 0, 0], dy[0, 0, 0] = 0, 0  # zero sums at pixel 0 (forward, backward-data)
  lhs, rhs, s = {"forward": (x, w, np.einsum("nhwc,co->nhwo", x, w[0, 0], dtype=np.int64)),
                 "backward_weights": (x, dy, np.einsum("nhwc,nhwo->co", x, dy, dtype=np.int64)[None, None]),
                 "backward_data": (dy, w, np.einsum("nhwo,co->nhwc", dy, w[0, 0], dtype=np.int64))}[mode]
  geometry = Geometry((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1,
                      (5, 5) if mode == "backward_data" else None)
  got = np.asarray(dfp_conv_p.bind(lhs, np.array([ex], np.int32), rhs, np.array([eb], np.int32),
                                   geometry=geometry, mode=mode, out_dtype=np.dtype(np.float32))[0])
  want = np.vectorize(lambda v: _expected_scaled(int(v), ex + eb), otypes=[np.float32])(s)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  assert (np.isfinite(got) & (got != 0)).any() == (abs(ex + eb) < 100)


def _product(*args, **params):
  return dfp_conv_p.bind(*args, **params)[0]  # [product, flag]


def _int64_sums(fn, lhs, ex, rhs, eb, geometry, mode):
  with jax.enable_x64(True):
    f = jax.jit(lambda *args: fn(*args, geometry=geometry, mode=mode, out_dtype=np.dtype(np.int64)))
    return np.asarray(f(lhs, ex, rhs, eb))


@pytest.mark.parametrize("mode", MODES)
def test_int64_output_is_the_exact_sums_on_every_path(isa, mode):
  """The int64 output (a split contraction's partial sums, added across devices before the
  one rounding) holds the exact sums in every mode, exponents unread: a strided 3x3 layer
  across the kernel's blocking against the reference's int64 sums, and a 1x1 layer over many
  pixels (backward-weights splits that reduction across threads) against numpy's."""
  rng = np.random.default_rng(9)
  full = lambda *shape: rng.integers(-32767, 32768, shape).astype(np.int16)
  nonfinite, zero = np.array([NONFINITE_EXPONENT], np.int32), np.zeros((1,), np.int32)
  geometry = Geometry((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 1,
                      (9, 9) if mode == "backward_data" else None)
  x, w, dy = full(2, 9, 9, 70), full(3, 3, 70, 40), full(2, 5, 5, 40)
  lhs, rhs = {"forward": (x, w), "backward_weights": (x, dy), "backward_data": (dy, w)}[mode]
  got = _int64_sums(_product, lhs, nonfinite, rhs, zero, geometry, mode)
  want = _int64_sums(reference.conv, lhs, zero, rhs, zero, geometry, mode)
  assert got.dtype == np.int64 and np.abs(want).max() > 2**31
  np.testing.assert_array_equal(got, want)

  x, w, dy = full(2, 64, 64, 3), full(1, 1, 3, 4), full(2, 64, 64, 4)
  geometry = Geometry((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1,
                      (64, 64) if mode == "backward_data" else None)
  lhs, rhs, want = {
      "forward": (x, w, np.einsum("nhwc,co->nhwo", x, w[0, 0], dtype=np.int64)),
      "backward_weights": (x, dy, np.einsum("nhwc,nhwo->co", x, dy, dtype=np.int64)[None, None]),
      "backward_data": (dy, w, np.einsum("nhwo,co->nhwc", dy, w[0, 0], dtype=np.int64))}[mode]
  np.testing.assert_array_equal(
      _int64_sums(_product, lhs, nonfinite, rhs, nonfinite, geometry, mode), want)


@pytest.mark.parametrize("mode", MODES)
def test_split_output_is_the_exact_sums_on_every_path(isa, mode):
  """The two-part output (``cpu_ffi.SplitSums``, for sums added across devices part by part)
  rejoins to the exact int64 sums in every mode, exponents unread: the strided 3x3 layer of
  the int64 test, in the narrowest format of its reduction for 1, 2 and 8 devices (uint8 or
  uint16 low parts, 5 to 12 low bits), random and with every mantissa at +32767 (the sums at
  their bound)."""
  rng = np.random.default_rng(10)
  full = lambda *shape: rng.integers(-32767, 32768, shape).astype(np.int16)
  nonfinite, zero = np.array([NONFINITE_EXPONENT], np.int32), np.zeros((1,), np.int32)
  geometry = Geometry((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (1, 1), 1,
                      (9, 9) if mode == "backward_data" else None)
  terms = {"forward": 9 * 70, "backward_weights": 2 * 5 * 5, "backward_data": 9 * 40}[mode]
  for x, w, dy in ((full(2, 9, 9, 70), full(3, 3, 70, 40), full(2, 5, 5, 40)),
                   (np.full((2, 9, 9, 70), 32767, np.int16), np.full((3, 3, 70, 40), 32767, np.int16),
                    np.full((2, 5, 5, 40), 32767, np.int16))):
    lhs, rhs = {"forward": (x, w), "backward_weights": (x, dy), "backward_data": (dy, w)}[mode]
    want = _int64_sums(reference.conv, lhs, zero, rhs, zero, geometry, mode)
    for devices in (1, 2, 8):
      split = partitioning.split_sums(terms, devices)
      bind = registry.split_kernel(dfp_conv_p).bind
      high, low_parts = jax.jit(lambda *args: bind(*args, geometry=geometry, mode=mode, out_dtype=split))(
          lhs, nonfinite, rhs, zero)
      assert high.dtype == np.int32 and low_parts.dtype == split.low_dtype
      joined = (np.asarray(high).astype(np.int64) << split.low_bits) + np.asarray(low_parts)
      np.testing.assert_array_equal(joined, want)
