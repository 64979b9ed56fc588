"""Tests of ``dfpjax.channel_sums``: per-channel ``(sum(a), sum(a * (b - center)))`` over every
axis but the last, on CPU in one read of the operands, added in double and rounded once; the
same bits on every kernel path; vmap, differentiation and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dfpjax
from dfpjax.primitives import reference_mode
from multidevice import run_on_devices


def exact_sums(a, b, center):
  """The sums as the kernel defines them: ``b - center`` rounded to float32, every term and sum
  in float64 (exact for the dyadic operands below), rounded to float32 once."""
  a, b = np.asarray(a), np.asarray(b)
  centered = (b - np.asarray(center, np.float32)).astype(np.float32).astype(np.float64)
  axes = tuple(range(a.ndim - 1))
  a = a.astype(np.float64)
  return (np.sum(a, axes).astype(np.float32), np.sum(a * centered, axes).astype(np.float32))


def dyadic(rng, shape, scale=8.0):
  """Floats k / scale with |k| < 1024: every double sum of their products here is exact."""
  return (rng.integers(-1023, 1024, size=shape) / scale).astype(np.float32)


# Channels: a row narrower than a vector, vector rows with a tail, and more than one task's
# block of channels (1024); rows: within one block of rows and across many (2048 rows of 64).
SHAPES = [(3, 5, 7), (2, 9, 11, 67), (4, 33, 1100), (16, 24, 24, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_sums_are_the_exact_sums_rounded_once(isa, shape):
  rng = np.random.default_rng(0)
  a, b = dyadic(rng, shape), dyadic(rng, shape)
  center = dyadic(rng, shape[-1:])
  total, dot = jax.jit(dfpjax.channel_sums)(a, b, center)
  expected_total, expected_dot = exact_sums(a, b, center)
  np.testing.assert_array_equal(total, expected_total)
  np.testing.assert_array_equal(dot, expected_dot)


def test_no_rows_give_positive_zeros(isa):
  """Sums over no rows: +0.0 for every channel, in both results."""
  a = np.zeros((0, 3, 5), np.float32)
  for result in jax.jit(dfpjax.channel_sums)(a, a, np.ones(5, np.float32)):
    np.testing.assert_array_equal(np.asarray(result).view(np.uint32), np.zeros(5, np.uint32))


def sequential_sums(a, b, center):
  """The kernel's definition for fewer rows than one task's block: each channel's terms added
  in row order in double, the products exact, rounded to float32 once."""
  a = np.asarray(a).reshape(-1, a.shape[-1])
  centered = (np.asarray(b).reshape(a.shape) - center).astype(np.float32)
  total, dot = np.zeros(a.shape[-1]), np.zeros(a.shape[-1])
  for row, c in zip(a.astype(np.float64), centered.astype(np.float64)):
    total, dot = total + row, dot + row * c
  return total.astype(np.float32), dot.astype(np.float32)


@pytest.mark.parametrize("channels", [5, 67, 600])
def test_a_few_rows_are_added_in_order_in_double(isa, channels):
  """Inexact terms (float32 products of normal floats are not exact in float32): every form,
  including a sum of squares, adds the exact products in double, row after row."""
  rng = np.random.default_rng(channels)
  a = (rng.normal(size=(7, channels)) * 3).astype(np.float32)
  b = rng.normal(size=(7, channels)).astype(np.float32)
  center = rng.normal(size=channels).astype(np.float32)
  zeros = np.zeros(channels, np.float32)
  itself = jax.jit(lambda a, center: dfpjax.channel_sums(a, a, center))  # one buffer twice
  for got, expected in ((jax.jit(dfpjax.channel_sums)(a, b, center), sequential_sums(a, b, center)),
                        (itself(a, zeros), sequential_sums(a, a, zeros)),
                        (itself(a, -zeros), sequential_sums(a, a, zeros)),
                        (itself(a, center), sequential_sums(a, a, center))):
    for g, e in zip(got, expected):
      np.testing.assert_array_equal(np.asarray(g).view(np.uint32), e.view(np.uint32))


def test_every_path_gives_the_same_bits(monkeypatch):
  """Inexact sums (normal floats of mixed scales, signed zeros): the order of the additions
  decides the bits, and every path adds each channel's terms in the same order; also in the
  forms with a zero center and ``b`` the same array as ``a`` (sums of squares, which a path may
  compute without forming ``b - center``: a center of -0.0 must give the same bits)."""
  rng = np.random.default_rng(1)
  shape = (8, 40, 40, 67)
  a = (rng.normal(size=shape) * np.exp(rng.normal(size=shape[-1:]) * 4)).astype(np.float32)
  a[0, 0, 0, :5] = -0.0
  b = (rng.normal(size=shape) + 3).astype(np.float32)
  center = rng.normal(size=shape[-1:]).astype(np.float32)
  zeros = np.zeros(shape[-1:], np.float32)
  # b is a in the trace, so that the kernel gets one buffer twice.
  itself = jax.jit(lambda a, center: dfpjax.channel_sums(a, a, center))
  general = jax.jit(dfpjax.channel_sums)
  forms = {"general": (general, a, b, center), "zero center": (general, a, b, zeros),
           "squares": (itself, a, zeros), "squares, -0 center": (itself, a, -zeros),
           "a with itself, centred": (itself, a, center)}
  results = {}
  for isa in dfpjax.kernel_info()["supported_isas"]:
    monkeypatch.setenv("DFPJAX_ISA", isa)
    for form, (f, *args) in forms.items():
      results[isa, form] = [np.asarray(s).view(np.uint32) for s in f(*args)]
  for (isa, form), sums in results.items():
    for s, first in zip(sums, results["portable", form]):
      np.testing.assert_array_equal(s, first, err_msg=f"{isa}, {form}")


def test_sums_of_normal_floats_are_within_an_ulp_of_the_exact_ones():
  rng = np.random.default_rng(2)
  shape = (16, 56, 56, 64)
  x = (rng.normal(size=shape) * 2 + 5).astype(np.float32)
  dy = rng.normal(size=shape).astype(np.float32)
  mean = np.mean(x, axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  for args in ((x, x, np.zeros(64, np.float32)), (dy, x, mean)):
    for got, exact in zip(jax.jit(dfpjax.channel_sums)(*args), exact_sums(*args)):
      np.testing.assert_array_max_ulp(np.asarray(got), exact, maxulp=1)


def test_defaults_give_the_sum_and_the_sum_of_squares():
  rng = np.random.default_rng(3)
  x = dyadic(rng, (6, 7, 24))
  total, squares = dfpjax.channel_sums(x)
  np.testing.assert_array_equal(total, np.sum(x.astype(np.float64), (0, 1)).astype(np.float32))
  np.testing.assert_array_equal(squares, np.sum(x.astype(np.float64) ** 2, (0, 1)).astype(np.float32))
  # Rank 1: nothing to sum over; the channels themselves.
  total, squares = dfpjax.channel_sums(x[0, 0])
  np.testing.assert_array_equal(total, x[0, 0])
  np.testing.assert_array_equal(squares, x[0, 0] * x[0, 0])


def test_non_finite_values_and_no_rows():
  x = np.ones((4, 3, 3), np.float32)
  x[0, 0, 0], x[1, 1, 1] = np.inf, np.nan
  total, squares = dfpjax.channel_sums(x)
  assert total[0] == np.inf and squares[0] == np.inf
  assert np.isnan(total[1]) and np.isnan(squares[1])
  assert total[2] == 12 and squares[2] == 12
  total, squares = dfpjax.channel_sums(np.zeros((0, 5), np.float32))
  np.testing.assert_array_equal(total, np.zeros(5, np.float32))
  np.testing.assert_array_equal(squares, np.zeros(5, np.float32))


def xla_sums(a, b, c):
  axes = tuple(range(a.ndim - 1))
  return jnp.sum(a, axes), jnp.sum(a * (b - c), axes)


def operands(seed=4, shape=(4, 5, 6, 16)):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape), jnp.float32),
          jnp.asarray(rng.normal(size=shape) + 1, jnp.float32),
          jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32))


def test_vmap_sums_each_example():
  a, b, c = operands()
  total, dot = jax.vmap(dfpjax.channel_sums, in_axes=(0, 0, None))(a, b, c)
  assert total.shape == dot.shape == (4, 16)
  for i in range(4):
    expected = exact_sums(a[i], b[i], c)
    np.testing.assert_array_max_ulp(np.asarray(total[i]), expected[0], maxulp=1)
    np.testing.assert_array_max_ulp(np.asarray(dot[i]), expected[1], maxulp=1)


def test_gradients_are_those_of_the_sums():
  a, b, c = operands()
  weights = jnp.arange(16.0) - 7

  def loss(sums):
    return lambda a, b, c: jnp.sum(sums(a, b, c)[1] * weights) + jnp.sum(sums(a, b, c)[0])

  got = jax.jit(jax.grad(loss(dfpjax.channel_sums), (0, 1, 2)))(a, b, c)
  expected = jax.jit(jax.grad(loss(xla_sums), (0, 1, 2)))(a, b, c)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-5)
  tangents = operands(seed=5)
  _, got = jax.jvp(dfpjax.channel_sums, (a, b, c), tangents)
  _, expected = jax.jvp(xla_sums, (a, b, c), tangents)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4)
  # Only some operands differentiated: the others' tangents are symbolic zeros.
  got = jax.grad(lambda b: jnp.sum(dfpjax.channel_sums(a, b, c)[1]))(b)
  np.testing.assert_allclose(got, jnp.broadcast_to(a, a.shape), rtol=0, atol=0)


def test_reference_mode_uses_xla_sums():
  a, b, c = operands()
  assert "dfp_channel_sums" in str(jax.make_jaxpr(lambda *x: dfpjax.channel_sums(*x))(a, b, c))
  with reference_mode():  # a new function: traces are cached per function
    jaxpr = jax.make_jaxpr(lambda *x: dfpjax.channel_sums(*x))(a, b, c)
    total, dot = jax.jit(lambda *x: dfpjax.channel_sums(*x))(a, b, c)
  assert "dfp_channel_sums" not in str(jaxpr)
  for got, expected in zip((total, dot), xla_sums(a, b, c)):
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda a: (a.astype(jnp.bfloat16),), "a must be float32, got bfloat16"),
    (lambda a: (a, a[:1]), r"b must have a's shape \(4, 5, 6, 16\), got \(1, 5, 6, 16\)"),
    (lambda a: (a, a, jnp.zeros(15, jnp.float32)), r"center must be float32 of shape \(16,\)"),
    (lambda a: (jnp.float32(1.0),), "a must have at least one axis"),
])
def test_bad_arguments_are_named(bad, message):
  a, _, _ = operands()
  with pytest.raises((TypeError, ValueError), match=message):
    dfpjax.channel_sums(*bad(a))


def test_sharded_batch_is_summed_per_device_then_added():
  """Under jit with the batch split over 4 devices: one kernel call per shard on its rows and a
  sum over the devices, the batch never gathered; the result is the one-device sums'
  to float32 rounding (the devices' partial sums are added in float32)."""
  run = run_on_devices("""
      rng = np.random.default_rng(6)
      a, b = (jnp.asarray(rng.normal(size=(8, 6, 6, 32)), jnp.float32) for _ in range(2))
      c = jnp.asarray(rng.normal(size=32), jnp.float32)
      split = NamedSharding(mesh, P("data"))
      f = jax.jit(dfpjax.channel_sums)
      compiled = f.lower(jax.device_put(a, split), jax.device_put(b, split), c).compile()
      report_hlo(compiled)
      total, dot = compiled(jax.device_put(a, split), jax.device_put(b, split), c)
      report("total", total)
      report("dot", dot)
      report("a", a)
      report("b", b)
      report("c", c)
  """, devices=4)
  text = run.hlo[0]
  assert "f32[1,2,6,6,32]" in text and "dfpjax_channel_sums" in text  # a shard of 2 examples
  assert not run.all_gathers()
  expected = exact_sums(run.results["a"], run.results["b"], run.results["c"])
  np.testing.assert_allclose(run.results["total"], expected[0], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(run.results["dot"], expected[1], rtol=1e-6, atol=1e-5)
