"""The forward kernel reading its weights through a view (``Geometry.weight_taps``,
``transposed_weights``, ``features_major_weights``; the kernel's ``dfp_weight_view``):
backward-data packs the forward's weights flipped and transposed in place, lhs-dilation phases
pick their taps in place, and weights all-gathered along their output features are read in the
layout the gather writes, so XLA makes no copy of the weights.

Expected values: the same convolution on the weights the view describes, materialized here by
plain numpy indexing and run through the kernel's plain packing (the bits must agree).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dfpjax
from dfpjax.primitives.conv_general_dilated import Geometry, dfp_conv_p


def _materialize(b, taps, transposed, groups):
  """w[t][c][g*cout + o] as the view reads it from b, by numpy indexing."""
  for d, (first, step, k) in enumerate(taps):
    b = np.take(b, [first + step * t for t in range(k)], axis=d)
  if not transposed:
    return b
  *window, cout, g_cin = b.shape
  cin = g_cin // groups
  w = np.empty((*window, cin, groups * cout), b.dtype)
  for g in range(groups):
    w[..., :, g * cout:(g + 1) * cout] = np.swapaxes(b[..., :, g * cin:(g + 1) * cin], -1, -2)
  return w


def _int64_sums(x, b, geometry):
  with jax.enable_x64(True):
    f = jax.jit(lambda x, b: dfp_conv_p.bind(x, jnp.zeros((1,), jnp.int32), b, jnp.zeros((1,), jnp.int32),
                                             geometry=geometry, mode="forward", out_dtype=np.dtype(np.int64))[0])
    return np.asarray(f(x, b))


# (input channels per group, output channels per group, groups, b's window, the window, (first,
# step) per dimension, transposed): even and odd cin (the path's copies vs element by element),
# taps straddling the 576-column K blocks (cin 100: tap 5 spans columns 500-600), edge panels
# (cout 40 = 32 + 8, 9, 5), feature groups, flips and strided tap picks (a phase's).
CASES = {
    "flipped_transposed": (20, 24, 1, (3, 3), (3, 3), ((2, -1), (2, -1)), True),
    "straddling_k_blocks": (100, 40, 1, (3, 3), (3, 3), ((2, -1), (2, -1)), True),
    "odd_cin_groups": (17, 10, 2, (3, 3), (3, 3), ((2, -1), (2, -1)), True),
    "phase_of_a_flip": (16, 9, 2, (5, 4), (3, 2), ((4, -2), (2, -2)), True),
    "plain_layout_strided_taps": (6, 33, 1, (5, 4), (3, 2), ((0, 2), (1, 2)), False),
    "odd_cin_plain_layout_flip": (3, 5, 3, (2, 3), (2, 3), ((1, -1), (2, -1)), False),
    "plain_taps": (6, 33, 1, (3, 2), (3, 2), ((0, 1), (0, 1)), False),
}


@pytest.mark.parametrize("features_major", [False, True], ids=["row_major", "features_major"])
@pytest.mark.parametrize("case", CASES)
def test_weights_through_a_view_equal_the_materialized_weights_on_every_path(isa, case,
                                                                             features_major):
  """The exact int64 sums of a forward convolution whose b holds the weights through a view
  equal those of the plain convolution on the weights materialized, with full-range mantissas;
  also with b laid out features-major (XLA copies b into that layout for the kernel here)."""
  cin, cout, groups, b_window, window, taps, transposed = CASES[case]
  rng = np.random.default_rng(len(case))
  b_shape = (*b_window, cout, groups * cin) if transposed else (*b_window, cin, groups * cout)
  b = rng.integers(-32767, 32768, b_shape).astype(np.int16)
  x = rng.integers(-32767, 32768, (2, 7, 6, groups * cin)).astype(np.int16)
  geometry = dict(window=window, strides=(1, 2), padding=((1, 1), (0, 2)), lhs_dilation=(1, 1),
                  rhs_dilation=(1, 1), groups=groups)
  view = Geometry(**geometry, weight_taps=taps, transposed_weights=transposed,
                  features_major_weights=features_major)
  w = _materialize(b, [(f, s, k) for (f, s), k in zip(taps, window)], transposed, groups)
  got, want = _int64_sums(x, b, view), _int64_sums(x, w, Geometry(**geometry))
  assert got.shape == want.shape == (2, *view.out_spatial((7, 6)), groups * cout)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("groups", [1, 2])
def test_backward_data_reads_features_major_weights_on_every_path(isa, groups):
  """The col2im input gradient (mode backward_data, few input channels) of weights laid out
  features-major (as an all-gather along the output features writes them) has the bits of the
  same weights row-major."""
  rng = np.random.default_rng(groups)
  cin, cout = 3, 5
  w = rng.integers(-32767, 32768, (3, 2, cin, groups * cout)).astype(np.int16)
  dy = rng.integers(-32767, 32768, (2, 4, 3, groups * cout)).astype(np.int16)
  plain = Geometry((3, 2), (2, 2), ((1, 1), (0, 1)), (1, 1), (1, 1), groups, input_spatial=(7, 6))
  assert plain.out_spatial((7, 6)) == (4, 3)
  e = jnp.zeros((1,), jnp.int32)
  def dx(geometry):
    with jax.enable_x64(True):
      f = lambda dy, w: dfp_conv_p.bind(dy, e, w, e, geometry=geometry, mode="backward_data",
                                        out_dtype=np.dtype(np.int64))[0]
      return np.asarray(jax.jit(f)(dy, w))
  want = dx(plain)
  assert want.shape == (2, 7, 6, groups * cin) and np.abs(want).max() > 2**30
  np.testing.assert_array_equal(dx(dataclasses.replace(plain, features_major_weights=True)), want)


def test_taps_outside_the_weights_are_an_error():
  """A view whose taps leave b's window is rejected when traced, naming the weights."""
  b = jnp.ones((3, 3, 4, 4), jnp.int16)
  x = jnp.ones((1, 5, 5, 4), jnp.int16)
  e = jnp.zeros((1,), jnp.int32)
  for taps in (((2, -1), (3, -1)), ((0, 2), (0, 1))):
    geometry = Geometry((3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), 1, weight_taps=taps,
                        transposed_weights=True)
    with pytest.raises(ValueError, match=r"weights \(3, 3, 4, 4\) do not fit"):
      dfp_conv_p.bind(x, e, b, e, geometry=geometry, mode="forward", out_dtype=np.dtype(np.float32))


# An XLA instruction producing INT16 by moving elements: what a flipped, regrouped or sliced
# copy of the weight mantissas would be.
_INT16_MOVE = re.compile(r"= s16\[[^\]]*\][^ ]* (reverse|transpose|copy|slice|gather)\(")


@pytest.mark.parametrize("kw", [
    dict(window_strides=(1, 1), padding="SAME"),
    dict(window_strides=(2, 2), padding="SAME"),  # by phases
    dict(window_strides=(1, 1), padding="SAME", feature_group_count=2),
], ids=["stride1", "stride2_phases", "groups"])
def test_backward_data_makes_no_copy_of_the_weights(kw):
  """The compiled input gradient of an NHWC/HWIO convolution (the layouts Flax uses, where the
  forward needs no transposes either) holds no INT16 reverse, transpose, copy, slice or
  gather: the kernel reads the weights' mantissas where the quantizer wrote them."""
  x = jnp.ones((2, 9, 9, 32), jnp.float32)
  w = jnp.ones((3, 3, 32 // kw.get("feature_group_count", 1), 24), jnp.float32)
  f = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
  y = jax.eval_shape(f, x, w)
  dx = lambda x, w, g: jax.vjp(f, x, w)[1](g)[0]
  hlo = jax.jit(dx).lower(x, w, jnp.ones(y.shape, y.dtype)).compile().as_text()
  assert "dfpjax_conv" in hlo
  assert not _INT16_MOVE.findall(hlo), _INT16_MOVE.findall(hlo)
