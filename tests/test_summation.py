"""``dfpjax.reproducible_sum``: the same bits in any order of addition and on any device count,
within its documented error of the exact sum."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dfpjax
from dfpjax.numerics.summation import fold_count
from multidevice import run_on_devices


def wide_range(shape, seed=0, spread=4.0):
  """Normal samples scaled by log-normal factors: magnitudes over many binades, both signs."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * np.exp(spread * rng.standard_normal(shape))
          ).astype(np.float32)


def bits(x):
  return np.asarray(x).view(np.uint32)


def bound(x, axes):
  """The docstring's bound: (2K + 1) * 2**-24 * n * max|x| per output element."""
  n = math.prod(x.shape[a] for a in axes)
  folds, _ = fold_count(n)
  return (2 * folds + 1) * 2.0**-24 * n * np.max(np.abs(x), axis=axes)


def exact_sum(x, axes):
  """math.fsum over ``axes`` for every output element (correctly rounded float64)."""
  moved = np.moveaxis(x.astype(np.float64), axes, range(len(axes)))
  kept = moved.shape[len(axes):]
  columns = moved.reshape(-1, math.prod(kept))
  return np.array([math.fsum(c) for c in columns.T]).reshape(kept)


@pytest.mark.parametrize("n", [1, 37, 64, 65, 1000, 1 << 18, (1 << 18) + 1, 600_000])
def test_fold_count_keeps_24_bits_without_int32_overflow(n):
  folds, b = fold_count(n)
  assert folds * b >= 24 and (folds - 1) * b < 24
  assert n * 2**b <= 2**30


@pytest.mark.parametrize("shape, axis", [((1000,), 0), ((32, 10), 0), ((16, 7, 7, 12), (0, 1, 2)),
                                         ((9, 300000), 1), ((5, 6, 7), None)])
def test_error_against_the_exact_sum_within_the_bound(shape, axis):
  x = wide_range(shape, seed=len(shape))
  axes = tuple(range(x.ndim)) if axis is None else ((axis,) if isinstance(axis, int) else axis)
  got = np.asarray(jax.jit(lambda x: dfpjax.reproducible_sum(x, axis))(x), np.float64)
  error = np.abs(got - exact_sum(x, axes))
  assert np.all(error <= bound(x, axes)), np.max(error / bound(x, axes))


def test_as_accurate_as_a_float32_sum_on_cancelling_data():
  # 2**17 terms whose sum cancels to a small fraction of their magnitude.
  x = wide_range((1 << 17,), seed=3, spread=0.5)
  x = np.concatenate([x, -x[::-1] * np.float32(1 + 2**-10)])
  exact = math.fsum(x.astype(np.float64))
  ours = abs(float(dfpjax.reproducible_sum(x)) - exact)
  plain = abs(float(jnp.sum(x)) - exact)
  assert ours <= max(plain, 2.0**-24 * abs(exact)), (ours, plain)


def test_elements_below_float32_resolution_at_the_largest_count_down_to_the_last_grid():
  # 2**-30 is below float32's resolution at 1.0 (a sequential float32 sum stays at 1.0), but
  # 4097 elements take 2 folds of 17 bits: the grid is 2**-33 and 2**12 of them add 2**-18.
  x = np.concatenate([[np.float32(1.0)], np.full(1 << 12, 2.0**-30, np.float32)])
  assert fold_count(x.size) == (2, 17)
  assert float(dfpjax.reproducible_sum(x)) == 1.0 + 2.0**-18


@pytest.mark.parametrize("shape, axis", [((4096,), 0), ((64, 9, 5), (0, 1)), ((300, 3), 0)])
def test_the_same_bits_under_every_permutation(shape, axis):
  x = wide_range(shape, seed=7)
  total = jax.jit(lambda x: dfpjax.reproducible_sum(x, axis))
  axes = (axis,) if isinstance(axis, int) else axis
  expected = bits(total(x))
  rng = np.random.default_rng(1)
  flat = x.reshape(-1, *x.shape[len(axes):])
  for _ in range(5):
    permuted = flat[rng.permutation(flat.shape[0])].reshape(x.shape)
    np.testing.assert_array_equal(bits(total(permuted)), expected)
  # The same elements in another layout: reversed axes, summed over the other side.
  moved = np.moveaxis(x, axes, range(x.ndim - len(axes), x.ndim))
  trailing = tuple(range(x.ndim - len(axes), x.ndim))
  np.testing.assert_array_equal(bits(dfpjax.reproducible_sum(moved, trailing)), expected)


def test_special_values():
  inf, nan = np.float32(np.inf), np.float32(np.nan)
  rsum = dfpjax.reproducible_sum
  assert float(rsum(np.array([1.0, inf, 3e38, 3e38], np.float32))) == np.inf
  assert float(rsum(np.array([-inf, 1.0], np.float32))) == -np.inf
  assert np.isnan(float(rsum(np.array([inf, 2.0, -inf], np.float32))))
  assert np.isnan(float(rsum(np.array([1.0, nan, inf], np.float32))))
  assert bits(rsum(-np.zeros(7, np.float32))) == 0  # +0.0
  assert float(rsum(np.array([3e38, 3e38, -3e38], np.float32))) == np.float32(3e38)
  assert float(rsum(np.array([2.0**-120, 3 * 2.0**-120], np.float32))) == 2.0**-118
  assert float(rsum(np.array([2.0**127, 2.0**127], np.float32))) == np.inf
  assert rsum(np.zeros((0, 3), np.float32), 0).shape == (3,)
  # Each column its own: the NaN stays in its column.
  got = np.asarray(rsum(np.array([[1.0, nan], [2.0, 1.0]], np.float32), 0))
  assert got[0] == 3.0 and np.isnan(got[1])


def test_keepdims_and_axes_like_jnp_sum():
  x = wide_range((3, 4, 5), seed=2, spread=0.0)
  for axis in (None, 0, -1, (0, 2), (2, 0)):
    for keepdims in (False, True):
      want = np.sum(x.astype(np.float64), axis=axis, keepdims=keepdims)
      got = dfpjax.reproducible_sum(x, axis, keepdims)
      assert got.shape == want.shape and got.dtype == jnp.float32
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_gradient_is_a_broadcast_and_forward_mode_a_sum():
  x = wide_range((6, 5), seed=4)
  weights = jnp.arange(5.0)
  loss = lambda x: jnp.dot(dfpjax.reproducible_sum(x, 0), weights)
  np.testing.assert_array_equal(jax.grad(loss)(x), np.broadcast_to(weights, x.shape))
  assert "reduce" not in str(jax.make_jaxpr(jax.grad(loss))(x)).split("custom_jvp_call")[-1]
  _, tangent = jax.jvp(lambda x: dfpjax.reproducible_sum(x, 0), (x,), (np.ones_like(x),))
  np.testing.assert_array_equal(tangent, np.full(5, 6.0, np.float32))


def test_arguments_are_checked():
  with pytest.raises(TypeError, match="x must be float32, got int32"):
    dfpjax.reproducible_sum(jnp.arange(3))
  with pytest.raises(ValueError, match="axis 2 is out of range for a rank-2 array"):
    dfpjax.reproducible_sum(jnp.zeros((2, 2)), 2)
  with pytest.raises(ValueError, match=r"axis \(0, -2\) repeats an axis"):
    dfpjax.reproducible_sum(jnp.zeros((2, 2)), (0, -2))
  with pytest.raises(ValueError, match="exceed the int32 folds' limit"):
    jax.eval_shape(dfpjax.reproducible_sum, jax.ShapeDtypeStruct(((1 << 29) + 1,), jnp.float32))


_SHARDED = """
x = np.random.default_rng(0).standard_normal((64, 6, 5)).astype(np.float32)
x *= np.exp(4 * np.random.default_rng(1).standard_normal(x.shape)).astype(np.float32)
x = jax.device_put(x, NamedSharding(mesh, P("data")))  # the reduced batch axis is split
for name, fn in (("rsum", dfpjax.reproducible_sum), ("jnp_sum", jnp.sum)):
  for axis in (0, (0, 1), None, 1):
    report(f"{name}{axis}", jax.jit(lambda x: fn(x, axis))(x))
grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(dfpjax.reproducible_sum(x * x, 0)))))(x)
report("grad", grad)
"""


def test_the_same_bits_on_1_2_and_4_devices():
  runs = {n: run_on_devices(_SHARDED, n).results for n in (1, 2, 4)}
  for n in (2, 4):
    for name, value in runs[1].items():
      if name.startswith("rsum") or name == "grad":
        np.testing.assert_array_equal(bits(runs[n][name]), bits(value), err_msg=f"{name}, {n}")
  # The check has teeth: XLA's float sums of the same data do change with the device count.
  assert any(not np.array_equal(bits(runs[n][name]), bits(value))
             for n in (2, 4) for name, value in runs[1].items() if name.startswith("jnp_sum"))
