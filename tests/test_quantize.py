"""Spec section 2: float -> DFP, checked against the plain oracle in spec_oracle.py."""

import ctypes
import ctypes.util
import platform
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dfpjax
from dfpjax import cpu_ffi
from dfpjax.numerics import quantization
from dfpjax.numerics.config import QuantConfig
from dfpjax.primitives import quantize as quantize_primitive
from dfpjax.primitives.quantize import (dfp_max_magnitudes_p, dfp_quantize_given_max_p,
                                        dfp_quantize_p)
import spec_oracle

FLOATS = [np.float32, ml_dtypes.bfloat16, np.float16]


def _key_words(key):
  return tuple(int(w) for w in np.asarray(jax.random.key_data(key)))


def _special_values(dtype):
  """Zeros, subnormals, powers of two, rounding ties and the extremes of the format."""
  info = ml_dtypes.finfo(dtype)
  tiny = float(info.smallest_subnormal)
  values = [0.0, -0.0, tiny, -tiny, 3 * tiny, float(info.smallest_normal), 1.0, -2.0, 0.5, 0.75,
            1.5, 2.5, -3.5, 1 + float(info.eps), float(info.max), -float(info.max) / 3]
  return np.array(values, dtype)


def _check(x, **kw):
  t = dfpjax.quantize(jnp.asarray(x), **{k: v for k, v in kw.items() if k != "key_words"})
  m, e = spec_oracle.quantize(np.asarray(x), bits=kw.get("bits", 16), headroom=kw.get("headroom", 0),
                              rounding=kw.get("rounding", "nearest"), key_words=kw.get("key_words"),
                              axis=kw.get("axis"))
  assert t.mantissa.dtype == jnp.int16 and t.exponent.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(t.mantissa), m)
  np.testing.assert_array_equal(np.asarray(t.exponent), e)
  return t


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 3, 8, 12, 16])
def test_nearest_matches_oracle(dtype, bits):
  rng = np.random.default_rng(bits)
  x = (rng.standard_normal((7, 13)) * 10.0 ** rng.integers(-3, 3, (7, 13))).astype(dtype)
  _check(x, bits=bits)
  _check(x, bits=bits, headroom=bits - 2)
  _check(x, bits=bits, granularity="channel", axis=1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_match_oracle(dtype):
  x = _special_values(dtype)
  _check(x)
  _check(x[:4])                      # a tensor of zeros and subnormals only
  _check(x[4:] * 0)                  # all zeros: exponent 0, mantissas 0
  for scale in [2.0**-10, 2.0**-20]:  # pushes values into the subnormal range
    _check((x.astype(np.float32) * scale).astype(dtype), bits=5)


def test_rounding_ties_go_to_even():
  # amax 2**14 gives exponent 0: the mantissa is x itself, so x.5 is an exact tie.
  x = np.array([16384.0, 0.5, 1.5, 2.5, -2.5, -3.5, 100.5], np.float32)
  t = dfpjax.quantize(jnp.asarray(x))
  assert int(t.exponent) == 0
  np.testing.assert_array_equal(np.asarray(t.mantissa), [16384, 0, 2, 2, -2, -4, 100])


def test_saturation_is_symmetric():
  # Rounding the maximum up reaches 2**15: it saturates to 32767, never to -32768.
  x = np.array([-32767.75, 32767.75, 1.0], np.float32)
  t = dfpjax.quantize(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(t.mantissa), [-32767, 32767, 1])
  _check(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_marks_the_whole_tensor(bad):
  x = np.array([[1.0, 2.0], [bad, 4.0]], np.float32)
  for kw in ({}, {"granularity": "channel", "axis": 0}):
    t = dfpjax.quantize(jnp.asarray(x), **kw)
    assert np.all(np.asarray(t.exponent) == quantization.NONFINITE_EXPONENT)
    assert bool(jnp.all(jnp.isnan(dfpjax.dequantize(t))))


@pytest.mark.parametrize("dtype", FLOATS)
def test_stochastic_matches_oracle_and_is_reproducible(dtype):
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.standard_normal(40), _special_values(np.float32)[:8]]).astype(dtype)
  key = jax.random.key(7)
  t = _check(x, rounding="stochastic", key=key, key_words=_key_words(key), bits=6)
  again = dfpjax.quantize(jnp.asarray(x), bits=6, rounding="stochastic", key=key)
  np.testing.assert_array_equal(np.asarray(t.mantissa), np.asarray(again.mantissa))
  other = dfpjax.quantize(jnp.asarray(x), bits=6, rounding="stochastic", key=jax.random.key(8))
  assert np.any(np.asarray(other.mantissa) != np.asarray(t.mantissa))


def test_stochastic_rounding_is_unbiased():
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, 64).astype(np.float32))
  keys = jax.random.split(jax.random.key(0), 2000)
  q = jax.vmap(lambda k: dfpjax.dequantize(dfpjax.quantize(x, bits=4, rounding="stochastic", key=k)))(keys)
  step = 2.0 ** float(dfpjax.quantize(x, bits=4).exponent)
  # Values beyond the largest mantissa (7 steps) saturate; the rest are unbiased: each
  # element's mean is within 5 standard errors of x (a draw's std is at most step / 2).
  inside = jnp.abs(x) <= 7 * step
  assert int(inside.sum()) > 50
  error = jnp.where(inside, jnp.abs(q.mean(0) - x), 0)
  assert float(jnp.max(error)) < 5 * (step / 2) / np.sqrt(len(keys))
  nearest = dfpjax.dequantize(dfpjax.quantize(x, bits=4))
  assert float(jnp.mean(jnp.where(inside, jnp.abs(nearest - x), 0))) > 5 * float(jnp.mean(error))


def test_float_and_integer_paths_agree():
  """Round-to-nearest takes an exact float shortcut when it can; it must equal the integer path."""
  rng = np.random.default_rng(3)
  base = rng.standard_normal((33, 17)).astype(np.float32)
  cases = [base, base * 1e-36, base * 1e-30, base * 1e30, np.where(base > 1, base * 1e-40, base),
           base / np.abs(base).max() * np.float32(3e38),   # 2-bit exponents reach 127
           base.astype(ml_dtypes.bfloat16), (base * 1e-5).astype(np.float16)]
  for x in cases:
    x = jnp.asarray(x)
    for bits, headroom in [(16, 0), (8, 3), (2, 0)]:
      cfg = QuantConfig(bits=bits, headroom=headroom)
      for axis, reduce_axes in [(None, (0, 1)), (0, (1,))]:
        fast = quantization._quantize(x, cfg, None, axis, reduce_axes, None)
        exact = quantization._quantize_exact(x, cfg, None, axis, reduce_axes, None)
        np.testing.assert_array_equal(np.asarray(fast.mantissa), np.asarray(exact.mantissa))
        np.testing.assert_array_equal(np.asarray(fast.exponent), np.asarray(exact.exponent))


def test_dequantize_is_exact():
  x = jnp.asarray(np.random.default_rng(2).standard_normal(100).astype(np.float32))
  t = dfpjax.quantize(x)
  m, e = np.asarray(t.mantissa, np.float64), int(t.exponent)
  np.testing.assert_array_equal(np.asarray(dfpjax.dequantize(t), np.float64), m * 2.0**e)
  # Quantization error of round-to-nearest is at most half a step.
  assert float(jnp.max(jnp.abs(dfpjax.dequantize(t) - x))) <= 2.0 ** (e - 1)


def test_quantize_under_jit_and_vmap():
  x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 9)).astype(np.float32))
  eager = dfpjax.quantize(x, bits=9)
  jitted = jax.jit(lambda x: dfpjax.quantize(x, bits=9))(x)
  np.testing.assert_array_equal(np.asarray(eager.mantissa), np.asarray(jitted.mantissa))
  rows = jax.vmap(lambda r: dfpjax.quantize(r, bits=9))(x)
  for i in range(5):
    np.testing.assert_array_equal(np.asarray(rows.mantissa[i]),
                                  np.asarray(dfpjax.quantize(x[i], bits=9).mantissa))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int16, jnp.complex64, jnp.bool_])
def test_non_float_input_is_rejected(dtype):
  with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
    dfpjax.quantize(jnp.zeros((3,), dtype))


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_out_of_range_is_rejected(bits):
  with pytest.raises(ValueError, match="bits must be an integer in 2..16"):
    dfpjax.quantize(jnp.ones(3), bits=bits)


def test_bad_settings_are_rejected():
  with pytest.raises(ValueError, match="needs a key"):
    dfpjax.quantize(jnp.ones(3), rounding="stochastic")
  with pytest.raises(ValueError, match="headroom"):
    dfpjax.quantize(jnp.ones(3), bits=8, headroom=7)
  with pytest.raises(ValueError, match="channel axis"):
    dfpjax.quantize(jnp.ones((2, 3)), granularity="channel")
  with pytest.raises(ValueError, match="out of range"):
    dfpjax.quantize(jnp.ones((2, 3)), granularity="channel", axis=2)
  with pytest.raises(ValueError, match="rounding"):
    dfpjax.quantize(jnp.ones(3), rounding="up")


def test_bits_and_headroom_are_integers_numpys_too_but_not_bools():
  config = dfpjax.QuantConfig(bits=np.int64(8), headroom=np.int32(1))
  assert (config.bits, config.headroom) == (8, 1) and type(config.bits) is int
  with pytest.raises(ValueError, match="headroom must be an integer in 0..bits-2=14, got True"):
    dfpjax.QuantConfig(headroom=True)
  with pytest.raises(ValueError, match="bits must be an integer in 2..16, got 8.0"):
    dfpjax.QuantConfig(bits=8.0)


def test_config_names_are_a_string_or_a_sequence_of_strings():
  assert dfpjax.DFPConfig(ops="dot_general").ops == ("dot_general",)
  assert dfpjax.DFPConfig(keep_float="*/head").keep_float == ("*/head",)
  for field, value in [("ops", None), ("keep_float", None), ("keep_float", [1])]:
    with pytest.raises(TypeError, match=f"DFPConfig.{field} must be a string or a sequence of "
                                        "strings"):
      dfpjax.DFPConfig(**{field: value})


def test_empty_tensors_quantize_to_exponent_zero():
  t = dfpjax.quantize(jnp.zeros((0, 3)))
  assert t.mantissa.shape == (0, 3) and int(t.exponent) == 0
  y = dfpjax.dfp_dot_general(jnp.zeros((0, 3)), jnp.ones((3, 2)), (((1,), (0,)), ((), ())))
  assert y.shape == (0, 2)


# ---------------------------------------------------------------------------------------
# The C kernel's quantization (dfp_quantize_p, float32, per group), on every path.
# ---------------------------------------------------------------------------------------


def _kernel_quantize(x, bits=16, headroom=0):
  m, e = jax.jit(lambda x: dfp_quantize_p.bind(x, bits=bits, headroom=headroom))(x)
  return np.asarray(m), np.asarray(e)


# The kernel's tasks and the pieces it maxes and quantizes in the cache (quantize.c's kChunk,
# kPiece), in elements: the cases below cross their boundaries.
_CHUNK, _PIECE = 1 << 16, 1 << 13


def _kernel_cases():
  rng = np.random.default_rng(11)
  special = _special_values(np.float32)
  big = rng.standard_normal(2 * _CHUNK + 21).astype(np.float32)   # several chunks and a tail
  return [special, special[:4], special[4:] * 0, special * np.float32(2.0**-20),
          rng.standard_normal(1000).astype(np.float32) * np.float32(1e-40),  # subnormals only
          np.append(rng.standard_normal(99).astype(np.float32) * np.float32(1e-40), 2.0**-112),
          np.arange(-40, 41, dtype=np.float32) / 4,                        # ties at every bit count
          big / np.abs(big).max() * np.float32(3e38), big, big * np.float32(1e-35),
          *_late_maximum_cases()]


def _late_maximum_cases():
  """Groups whose largest magnitude lies in a later chunk of the kernel's (_CHUNK elements) than
  the first: chunks quantized with the binade seen so far must still get the group's exponent."""
  ramp = (np.arange(3 * _CHUNK + 5) - 40).astype(np.float32) * np.float32(2.0**-7)  # a new binade per chunk
  rng = np.random.default_rng(13)
  zeros_first = np.concatenate([np.zeros(_CHUNK + 7000, np.float32), rng.standard_normal(30000).astype(np.float32)])
  # Within a chunk the kernel takes pieces of _PIECE elements: whole zero pieces before the first
  # nonzero one, and binades first met in a later piece, so the pieces before are quantized again.
  zero_pieces = np.concatenate([np.zeros(_CHUNK + 2 * _PIECE + 3, np.float32),
                                rng.standard_normal(20000).astype(np.float32)])
  late_pieces = rng.standard_normal(2 * _CHUNK + 9).astype(np.float32)
  late_pieces[2 * _PIECE + 5] = 20.0
  late_pieces[_CHUNK - 3] = 60.0
  # A piece is quantized with the exponent of the maxima before it: here binades far above it
  # (2**200 times), which the rows must survive (saturating, no undefined behaviour) until the
  # pieces are quantized again.
  jumps = rng.standard_normal(2 * _CHUNK + 9).astype(np.float32) * np.float32(1e-30)
  jumps[_PIECE + 100] = 1e30
  jumps[_CHUNK + 3 * _PIECE + 1] = -3e38
  return [ramp, ramp[::-1].copy(), zeros_first, zero_pieces, late_pieces, jumps]


@pytest.mark.parametrize("bits, headroom", [(16, 0), (16, 2), (8, 3), (3, 1), (2, 0)])
def test_kernel_quantization_matches_oracle(isa, bits, headroom):
  for x in _kernel_cases():
    m, e = _kernel_quantize(x[None], bits, headroom)
    if x.size <= 1000:
      want_m, want_e = spec_oracle.quantize(x, bits=bits, headroom=headroom)
    else:  # the oracle is slow on big tensors; the jnp quantizer matches it above
      t = dfpjax.quantize(jnp.asarray(x), bits=bits, headroom=headroom)
      want_m, want_e = np.asarray(t.mantissa), np.asarray(t.exponent)
    np.testing.assert_array_equal(m[0], want_m)
    assert e[0] == want_e


def test_kernel_quantization_groups_and_nonfinite(isa):
  rng = np.random.default_rng(12)
  x = rng.standard_normal((4, 3, 50)).astype(np.float32) * np.float32([[[1e-3]], [[1.0]], [[1e3]], [[1.0]]])
  x[3, 1, 7] = np.nan
  m, e = _kernel_quantize(x)
  for g in range(3):
    t = dfpjax.quantize(jnp.asarray(x[g]))
    np.testing.assert_array_equal(m[g], np.asarray(t.mantissa))
    assert e[g] == int(t.exponent)
  assert e[3] == quantization.NONFINITE_EXPONENT and not m[3].any()
  # vmap folds into the groups: one exponent per example.
  mv, ev = jax.jit(jax.vmap(lambda x: dfp_quantize_p.bind(x, bits=16, headroom=0)))(x[:, None])
  np.testing.assert_array_equal(np.asarray(mv)[:, 0], m)
  np.testing.assert_array_equal(np.asarray(ev)[:, 0], e)


def test_kernel_quantization_late_nonfinite_and_binades_per_group(isa):
  # Several chunks per group: a NaN or Inf in the last chunk of one group zeroes what its
  # earlier chunks quantized; each group's later binades are its own.
  rng = np.random.default_rng(14)
  x = rng.standard_normal((4, 3 * _CHUNK + 7)).astype(np.float32)
  x[0, -1] = np.inf
  x[1, -2] = np.nan
  x[2, -3] = 1e6  # the only element of its binade, in the last chunk
  x[3] *= np.float32(1e-30)
  m, e = _kernel_quantize(x)
  assert list(e[:2]) == [quantization.NONFINITE_EXPONENT] * 2 and not m[:2].any()
  for g in (2, 3):
    t = dfpjax.quantize(jnp.asarray(x[g]))
    np.testing.assert_array_equal(m[g], np.asarray(t.mantissa))
    assert e[g] == int(t.exponent)


def test_kernel_quantization_past_the_caches_streams_the_same_bits(isa):
  """Mantissas of 8 MiB or more (macro.h, DFP_STREAM_OUTPUT_BYTES) are stored non-temporally
  by the AVX2 and AVX-512 rows: the same bits, on the float route (a normal scale) and the
  integer one (tiny values), with a tail and a late binade that redoes earlier chunks."""
  rng = np.random.default_rng(15)
  x = rng.standard_normal(2**22 + 21).astype(np.float32)
  x[-5] = 40.0  # the group's exponent is settled in its last chunk
  for scaled in (x, x * np.float32(1e-38)):
    m, e = _kernel_quantize(scaled[None])
    t = dfpjax.quantize(jnp.asarray(scaled))
    assert m.nbytes >= 8 << 20
    np.testing.assert_array_equal(m[0], np.asarray(t.mantissa))
    assert e[0] == int(t.exponent)


class _QuantizeArgs(ctypes.Structure):
  """dfp_kernel.h's dfp_quantize_args."""
  _fields_ = [("groups", ctypes.c_size_t), ("n", ctypes.c_size_t), ("x", ctypes.c_void_p),
              ("bits", ctypes.c_int), ("headroom", ctypes.c_int), ("m", ctypes.c_void_p),
              ("e", ctypes.c_void_p), ("group_max", ctypes.c_void_p)]


def _sse_rounding():
  """The SSE unit's rounding mode as seen on this thread: +-1/3 in float32 tell all four apart."""
  third = np.float32(1) / np.float32(3)
  return int(third.view(np.uint32)), int((-np.float32(1) / np.float32(3)).view(np.uint32))


# glibc's x86-64 <fenv.h>: FE_TONEAREST, FE_DOWNWARD, FE_UPWARD, FE_TOWARDZERO.
_ROUNDING_MODES = (0x000, 0x400, 0x800, 0xc00)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 rounding-mode constants")
def test_kernel_quantization_keeps_the_callers_rounding_mode(isa):
  """The AVX2 rows round by the conversion under a floating-point mode of their own: called
  (serially, on this thread) under each rounding mode, the spec's bits, and the caller's mode
  as it was before the call."""
  libm, lib = ctypes.CDLL(ctypes.util.find_library("m")), cpu_ffi._library()
  rng = np.random.default_rng(16)
  x = np.concatenate([np.arange(-40, 41, dtype=np.float32) / 4,  # ties at 16 bits after scaling
                      rng.standard_normal(3 * _CHUNK + 11).astype(np.float32)])
  x[:81] *= np.float32(2.0**-13)
  t = dfpjax.quantize(jnp.asarray(x))
  for mode in _ROUNDING_MODES:
    m, e = np.zeros(x.size, np.int16), np.zeros(1, np.int32)
    args = _QuantizeArgs(1, x.size, x.ctypes.data, 16, 0, m.ctypes.data, e.ctypes.data, None)
    assert libm.fesetround(mode) == 0
    try:
      before = _sse_rounding()
      status = lib.dfp_quantize(ctypes.byref(args), cpu_ffi.ISAS.index(isa), None)
      after = _sse_rounding()
    finally:
      libm.fesetround(0)
    assert status == 0 and after == before
    np.testing.assert_array_equal(m, np.asarray(t.mantissa))
    assert e[0] == int(t.exponent)


def _magnitude_max(x):
  """Each group's largest magnitude bit pattern (NaN's above Inf's), as a pmax takes it."""
  return (x.reshape(x.shape[0], -1).view(np.uint32) & np.uint32(0x7fffffff)).max(axis=1, initial=0)


def test_kernel_max_magnitudes_match_numpy(isa):
  # A shard's contribution to its group's exponent (before the pmax): NaN above Inf above
  # every finite magnitude, subnormals exact, -0 as 0, an empty group 0; the kernel and its
  # XLA twin alike, several chunks per group, and under vmap.
  kernel = jax.jit(dfp_max_magnitudes_p.bind)
  twin = jax.jit(quantize_primitive._max_magnitudes_xla_lowering)
  rng = np.random.default_rng(17)
  x = rng.standard_normal((4, 2, 3 * _CHUNK + 7)).astype(np.float32)
  x[0, 1, -1], x[1, 0, 5], x[2], x[3] = np.inf, np.float32(-np.nan), -0.0, x[3] * np.float32(1e-42)
  cases = [c.astype(np.float32)[None] for c in _kernel_cases()] + [x, np.zeros((3, 0), np.float32)]
  for case in cases:
    for got in (kernel(case), twin(case)):
      assert got.dtype == jnp.uint32 and got.shape == case.shape[:1]
      np.testing.assert_array_equal(np.asarray(got), _magnitude_max(case))
  batched = jax.jit(jax.vmap(dfp_max_magnitudes_p.bind, in_axes=1))(x)
  np.testing.assert_array_equal(np.asarray(batched),
                                _magnitude_max(x.transpose(1, 0, 2).reshape(8, -1)).reshape(2, 4))


def test_kernel_quantization_given_max_matches_the_plain_kernel(isa):
  # A shard with its whole group's amax given: the mantissas and exponents one device forms
  # for the group. The group's other shard is the last column here, which carries its max.
  rng = np.random.default_rng(15)
  cases = [c.astype(np.float32) for c in _kernel_cases() if c.size <= 3 * _CHUNK]
  groups = [np.append(c, other) for c in cases
            for other in (np.float32(0), np.float32(7e3), np.float32(-1e-40), np.float32(np.inf),
                          np.float32(np.nan))]
  groups.append(np.zeros(5, np.float32))
  groups.append(np.append(rng.standard_normal(70000).astype(np.float32), np.float32(-np.nan)))
  given_max = jax.jit(lambda x, g: dfp_quantize_given_max_p.bind(x, g, bits=12, headroom=1))
  twin = jax.jit(lambda x, g: quantize_primitive._given_max_xla_lowering(x, g, bits=12, headroom=1))
  for group in groups:
    m, e = _kernel_quantize(group[None], bits=12, headroom=1)
    shard, top = group[None, :-1], _magnitude_max(group[None])
    for got_m, got_e in (given_max(shard, top), twin(shard, top)):
      np.testing.assert_array_equal(np.asarray(got_m), m[:, :-1])
      np.testing.assert_array_equal(np.asarray(got_e), e)


def test_kernel_quantization_given_max_per_group_and_under_vmap(isa):
  rng = np.random.default_rng(16)
  x = rng.standard_normal((2, 4, 300)).astype(np.float32) * np.float32([[[1e-3]], [[1e3]]])
  x[0, 1, 5], x[1, 2, :] = np.nan, 0.0
  m, e = _kernel_quantize(x.reshape(8, 300))
  shard, top = x[..., 100:], _magnitude_max(x.reshape(8, 300)).reshape(2, 4)
  mv, ev = jax.jit(jax.vmap(lambda x, g: dfp_quantize_given_max_p.bind(x, g, bits=16, headroom=0)))(
      shard, top)
  np.testing.assert_array_equal(np.asarray(mv).reshape(8, 200), m[:, 100:])
  np.testing.assert_array_equal(np.asarray(ev).reshape(8), e)
  assert list(np.asarray(ev)[0, 1:3]) == [quantization.NONFINITE_EXPONENT, np.asarray(ev)[0, 2]]
  assert ev[1, 2] == 0 and not np.asarray(mv)[1, 2].any()


def test_kernel_quantization_given_max_rejects_bad_maxima():
  x = jnp.ones((3, 4), jnp.float32)
  with pytest.raises(TypeError, match="uint32 group maxima of shape"):
    dfp_quantize_given_max_p.bind(x, jnp.ones((3,), jnp.int32), bits=16, headroom=0)
  with pytest.raises(TypeError, match="uint32 group maxima of shape"):
    dfp_quantize_given_max_p.bind(x, jnp.ones((4,), jnp.uint32), bits=16, headroom=0)


def _transparent_huge_pages() -> bool:
  """Whether Linux grants transparent huge pages (``always`` or ``madvise``)."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def _vm_flags(address: int) -> list[str]:
  """The VmFlags of the mapping of this process that holds ``address`` (Linux's smaps)."""
  with open("/proc/self/smaps", encoding="ascii") as f:
    inside = False
    for line in f:
      if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
        begin, end = (int(v, 16) for v in line.split()[0].split("-"))
        inside = begin <= address < end
      elif inside and line.startswith("VmFlags:"):
        return line.split()[1:]
  raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not _transparent_huge_pages(), reason="Linux's transparent huge pages")
def test_kernel_outputs_of_a_few_megabytes_ask_for_huge_pages():
  # A train step's buffers lie in XLA's temporary block, mapped afresh each step: an INT16
  # output of 6 MB (a 56x56x64 activation at batch 16) would fault in 1,536 pages on every
  # step; its 2 MB-aligned interior is advised as transparent huge pages (macro.c).
  x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 56, 56, 64)).astype(np.float32))
  m, _ = jax.jit(lambda x: dfp_quantize_p.bind(x, bits=16, headroom=0))(x)
  m.block_until_ready()
  huge = 2 << 20
  interior = (m.unsafe_buffer_pointer() + huge - 1) // huge * huge
  assert "hg" in _vm_flags(interior)
