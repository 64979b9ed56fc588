"""Exact float <-> integer arithmetic on IEEE bit patterns.

XLA:CPU runs with denormals flushed to zero and some backends flush on GPU too, so
every step of the DFP contract that could touch a subnormal is done here on the
integer bit patterns instead of with float arithmetic. The C kernel implements
the same algorithms (``cpu_ffi/src/encode.h``); both follow ``docs/numerics.md``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  dtype: np.dtype
  uint: np.dtype       # unsigned integer of the same width
  mantissa_bits: int   # stored fraction bits (23 for f32)
  exponent_bits: int
  bias: int

  @property
  def precision(self) -> int:  # significant bits including the implicit one
    return self.mantissa_bits + 1

  @property
  def emin(self) -> int:  # exponent of the smallest normal number
    return 1 - self.bias

  @property
  def emax(self) -> int:
    return (1 << self.exponent_bits) - 2 - self.bias

  @property
  def width(self) -> int:
    return 1 + self.exponent_bits + self.mantissa_bits


FORMATS = {
    np.dtype(jnp.float32): FloatFormat(np.dtype(jnp.float32), np.dtype(np.uint32), 23, 8, 127),
    np.dtype(jnp.bfloat16): FloatFormat(np.dtype(jnp.bfloat16), np.dtype(np.uint16), 7, 8, 127),
    np.dtype(jnp.float16): FloatFormat(np.dtype(jnp.float16), np.dtype(np.uint16), 10, 5, 15),
}


def float_format(dtype) -> FloatFormat:
  dtype = np.dtype(dtype)
  if dtype not in FORMATS:
    raise TypeError(
        f"DFP supports float32, bfloat16 and float16 tensors, got {dtype}")
  return FORMATS[dtype]


def magnitude_bits(x):
  """|x|'s bit pattern as int32: ordered like |x|, with Inf and NaN above all finite values."""
  fmt = float_format(x.dtype)
  u = lax.bitcast_convert_type(x, fmt.uint).astype(jnp.uint32)
  return (u & ((1 << (fmt.width - 1)) - 1)).astype(jnp.int32)


def nonfinite_threshold(dtype) -> int:
  """The magnitude bits of +Inf: magnitude bits at or above it are Inf or NaN."""
  fmt = float_format(dtype)
  return ((1 << fmt.exponent_bits) - 1) << fmt.mantissa_bits


def decode(x):
  """Splits finite x into ``(negative, sig, exp2)`` with ``|x| = sig * 2**exp2`` exactly.

  ``sig`` is uint32 below ``2**precision``; subnormals decode exactly.
  """
  fmt = float_format(x.dtype)
  u = lax.bitcast_convert_type(x, fmt.uint).astype(jnp.uint32)
  negative = (u >> (fmt.width - 1)) != 0
  biased = ((u >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)).astype(jnp.int32)
  fraction = u & ((1 << fmt.mantissa_bits) - 1)
  normal = biased > 0
  sig = jnp.where(normal, fraction | (1 << fmt.mantissa_bits), fraction)
  exp2 = jnp.where(normal, biased, 1) - (fmt.bias + fmt.mantissa_bits)
  return negative, sig, exp2


def floor_log2_of_magnitude_bits(mag, dtype):
  """floor(log2(v)) for the positive finite value whose magnitude bits are ``mag`` (int32)."""
  fmt = float_format(dtype)
  biased = mag >> fmt.mantissa_bits
  fraction = mag & ((1 << fmt.mantissa_bits) - 1)
  subnormal_log2 = (31 - lax.clz(fraction)) + (fmt.emin - fmt.mantissa_bits)
  return jnp.where(biased > 0, biased - fmt.bias, subnormal_log2)


def bit_length(v):
  """Number of significant bits of an unsigned integer array (0 for 0)."""
  return (np.iinfo(v.dtype).bits - lax.clz(v)).astype(jnp.int32)


def split_shift(sig, r):
  """Exact split of ``sig * 2**-r`` (unsigned ``sig``, int32 ``r >= 0``) into parts.

  Returns ``(q, t, sticky)`` with ``q = floor(sig * 2**-r)``, ``t`` the first W
  fraction bits (W the width of ``sig``'s dtype) and ``sticky`` whether any
  fraction bit below them is set. Shift amounts are clamped so no shift reaches
  the width; the clamping never changes the result.
  """
  width = np.iinfo(sig.dtype).bits
  udt = sig.dtype

  def shift(v, n, left):
    n = jnp.clip(n, 0, width - 1).astype(udt)
    return (v << n) if left else (v >> n)

  q = shift(sig, r, left=False)
  rem = sig - shift(q, r, left=True)
  t = jnp.where(r <= width, shift(rem, width - r, left=True), shift(rem, r - width, left=False))
  t = jnp.where(r == 0, jnp.zeros_like(t), t)
  sticky = (r > width) & (shift(t, r - width, left=True) != rem)
  return q, t, sticky


def round_half_even_up(q, t, sticky):
  """Whether rounding ``q + t/2**W (+ sticky)`` to nearest, ties to even, rounds up."""
  half = np.array(1 << (np.iinfo(t.dtype).bits - 1), t.dtype)
  return (t > half) | ((t == half) & (sticky | ((q & 1) == 1)))


def encode_scaled(negative, magnitude, scale_exp, dtype):
  """``fl(±magnitude) * 2**scale_exp`` as ``dtype`` (spec section 3, docs/numerics.md).

  ``magnitude`` is an unsigned integer (uint32 or uint64). It is first rounded to
  the format's precision (nearest, ties to even, unbounded exponent range); the
  exact power-of-two scaling then overflows to Inf or rounds into the subnormal
  range as IEEE multiplication does. Zero encodes as +0.
  """
  fmt = float_format(dtype)
  p = fmt.precision
  udt = magnitude.dtype
  n = bit_length(magnitude)
  # Round to p significant bits: sig * 2**ex with sig in [2**(p-1), 2**p].
  excess = jnp.maximum(n - p, 0)
  q, t, sticky = split_shift(magnitude, excess)
  sig = q + round_half_even_up(q, t, sticky).astype(udt)
  sig = jnp.where(n < p, magnitude << jnp.clip(p - n, 0, p).astype(udt), sig)
  carried = sig >> p  # rounding up reached 2**p
  sig = jnp.where(carried != 0, sig >> 1, sig)
  lead = n - 1 + carried.astype(jnp.int32) + scale_exp  # exponent of the leading bit
  # Subnormal: shift the significand right (again rounding half to even).
  sub_shift = jnp.clip(fmt.emin - lead, 0, 2 * p + 2)
  sq, st, ss = split_shift(sig, sub_shift)
  sub_sig = sq + round_half_even_up(sq, st, ss).astype(udt)
  normal_bits = ((lead + fmt.bias).astype(udt) << fmt.mantissa_bits) | (sig & ((1 << fmt.mantissa_bits) - 1))
  bits = jnp.where(lead >= fmt.emin, normal_bits, sub_sig)  # a subnormal that rounds up to 2**(p-1) is the least normal
  inf_bits = np.array(nonfinite_threshold(dtype), udt)
  bits = jnp.where(lead > fmt.emax, inf_bits, bits)
  bits = jnp.where(magnitude == 0, jnp.zeros_like(bits), bits)
  sign_bit = np.array(1 << (fmt.width - 1), udt)
  bits = jnp.where(negative & (magnitude != 0), bits | sign_bit, bits)
  return lax.bitcast_convert_type(bits.astype(fmt.uint), fmt.dtype)


def after(value, anchor):
  """``value``, bit for bit, as a function of ``anchor`` (broadcast to ``value``'s shape): XLA
  computes nothing that reads the result before ``anchor`` exists.

  The result is ``value``'s bits OR-ed with ``false_from(anchor)``. ``lax.optimization_barrier``
  cannot order work on XLA:CPU, which removes barriers before it schedules (docs/performance.md,
  "Memory of the ResNet-50 DFP step").
  """
  value = jnp.asarray(value)
  bits = _bits(value)
  bits = bits | jnp.broadcast_to(false_from(anchor), value.shape).astype(bits.dtype)
  if value.dtype == bool:
    return bits.astype(bool)
  return lax.bitcast_convert_type(bits, value.dtype)


def materialized(x):
  """``x``, bit for bit, written to memory where it is computed, so that XLA:CPU's consumers of
  the result read it there instead of each recomputing ``x`` from its producers.

  XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them: a chain of
  them (a residual network's stream of BatchNorms, adds and ReLUs, whose block outputs feed the
  next block, its residual add and the backward pass's ReLU masks) is then recomputed from its
  start inside each consumer, and no block output is ever read back. A division is one producer
  XLA:CPU does not duplicate, so the result is ``x`` divided by a 1 that XLA's own simplifier
  cannot fold (``after``) but its code generator (LLVM) does: no division is executed, so no
  subnormal is flushed, and every value, signed zeros and NaN payloads included, comes back as it
  was. The derivative is the identity: the backward pass divides nothing. ``x``: an array of
  floating-point or integer numbers (integers divide as integers).
  """
  x = jnp.asarray(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"materialized: x has dtype {x.dtype}; an array of floating-point or integer "
                    f"numbers is needed")
  return _materialized(x)


@jax.custom_jvp
@jax.jit  # one computation even when called eagerly, so that the division by 1 folds away
def _materialized(x):
  one = after(jnp.ones_like(x), x)
  return x / one if jnp.issubdtype(x.dtype, jnp.floating) else lax.div(x, one)


@_materialized.defjvp
def _materialized_jvp(primals, tangents):
  return _materialized(primals[0]), tangents[0]


def false_from(anchor):
  """``False`` for each element of ``anchor``, computed from its bits, ``(bits | 1) == 0``, which
  XLA's simplifier cannot prove false: a flag that exists only once ``anchor`` does (``after``)."""
  return (_bits(jnp.asarray(anchor)) | 1) == 0


def _bits(x):
  """``x``'s bit pattern as unsigned integers of its width (a bool as one byte)."""
  if x.dtype == bool:
    return x.astype(jnp.uint8)
  return lax.bitcast_convert_type(x, np.dtype(f"uint{8 * x.dtype.itemsize}"))
