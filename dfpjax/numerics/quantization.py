"""Float -> DFP quantization (spec section 2) and its inverse."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax.numerics import floatbits, rng
from dfpjax.numerics.config import QuantConfig

# The exponent of an operand that held a NaN or an Inf: every product with it is NaN.
NONFINITE_EXPONENT = np.iinfo(np.int32).max
# floor(log2(0)) stand-in; far below any real exponent, far above int32 overflow when offset.
_LOG2_OF_ZERO = -(1 << 24)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DFPTensor:
  """INT16 mantissas sharing power-of-two exponents: value = mantissa * 2**exponent.

  ``exponent`` is a scalar (per-tensor) or a vector along ``channel_axis``. It is
  ``NONFINITE_EXPONENT`` everywhere when the quantized tensor held a NaN or an Inf.
  """

  mantissa: jax.Array
  exponent: jax.Array
  channel_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def shape(self):
    return self.mantissa.shape

  @property
  def is_nonfinite(self):
    return jnp.any(self.exponent == NONFINITE_EXPONENT)

  def broadcast_exponent(self):
    """The exponent broadcast to the mantissa's rank (size 1 off the channel axis)."""
    if self.channel_axis is None:
      return jnp.reshape(self.exponent, (1,) * self.mantissa.ndim)
    shape = [1] * self.mantissa.ndim
    shape[self.channel_axis] = self.mantissa.shape[self.channel_axis]
    return jnp.reshape(self.exponent, shape)


def _normalize_axis(axis, ndim):
  if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
    raise ValueError(f"channel axis {axis!r} is out of range for a rank-{ndim} tensor")
  return int(axis) % ndim


def quantize(x, bits: int = 16, rounding: str = "nearest", key: Any = None,
             granularity: str = "tensor", axis: int | None = None, headroom: int = 0,
             *, scale_exponent=None, exponent_axes: tuple[str, ...] = ()) -> DFPTensor:
  """Quantizes a float tensor to DFP exactly as spec section 2 defines.

  Args:
    x: float32, bfloat16 or float16 array.
    bits, rounding, headroom, granularity, exponent_axes: see :class:`dfpjax.QuantConfig`.
    key: a ``jax.random`` key; required for ``rounding="stochastic"``.
    axis: the channel axis for ``granularity="channel"`` (one exponent per index).
    scale_exponent: optional int32 array broadcastable to ``x``; quantizes
      ``x * 2**scale_exponent`` without forming it in floating point (used to fold
      per-channel exponents of a partner operand into a gradient).
  Returns:
    A :class:`DFPTensor` with int16 mantissas and int32 exponents.
  """
  config = QuantConfig(bits=bits, headroom=headroom, rounding=rounding, granularity=granularity,
                       exponent_axes=exponent_axes)
  x = jnp.asarray(x)
  floatbits.float_format(x.dtype)  # raises for integer, complex, float64 ...
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs a key (a jax.random key)")
  if granularity == "channel":
    if axis is None:
      raise ValueError("granularity='channel' needs the channel axis")
    axis = _normalize_axis(axis, x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
  else:
    if axis is not None:
      raise ValueError("axis is only meaningful with granularity='channel'")
    reduce_axes = tuple(range(x.ndim))
  return _quantize(x, config, key, axis, reduce_axes, scale_exponent)


def quantize_with(x, config: QuantConfig, key=None, axis=None, scale_exponent=None) -> DFPTensor:
  """:func:`quantize` with the settings of a :class:`QuantConfig`."""
  return quantize(x, config.bits, config.rounding, key, config.granularity,
                  axis if config.granularity == "channel" else None, config.headroom,
                  scale_exponent=scale_exponent, exponent_axes=config.exponent_axes)


def _quantize(x, config: QuantConfig, key, axis, reduce_axes, scale_exponent) -> DFPTensor:
  if config.rounding == "nearest" and scale_exponent is None:
    return _quantize_nearest(x, config, axis, reduce_axes)
  return _quantize_exact(x, config, key, axis, reduce_axes, scale_exponent)


def _shared(config: QuantConfig, group_max):
  """A group's maximum (or any-flag) over the shards of ``config.exponent_axes``."""
  if not config.exponent_axes:
    return group_max
  group_max = lax.stop_gradient(group_max)  # it picks an exponent; pmax has no derivative
  if group_max.dtype == jnp.bool_:
    return lax.pmax(group_max.astype(jnp.int32), config.exponent_axes) > 0
  return lax.pmax(group_max, config.exponent_axes)


def _finish(m, exponent, nonfinite, config, x_shape, axis) -> DFPTensor:
  limit = (1 << (config.bits - 1)) - 1
  m = jnp.where(nonfinite, 0, jnp.clip(m, -limit, limit)).astype(jnp.int16)
  exponent = jnp.where(nonfinite, NONFINITE_EXPONENT, exponent).astype(jnp.int32)
  exponent = exponent.reshape(()) if axis is None else exponent.reshape(x_shape[axis])
  return DFPTensor(m, exponent, axis)


def _quantize_nearest(x, config: QuantConfig, axis, reduce_axes) -> DFPTensor:
  """Round-to-nearest quantization with float arithmetic where it is provably exact.

  Scaling by ``2**-e`` is exact for normal results when ``2**-e`` is a normal float
  (``e <= 126``; only 2-bit mantissas of values near the top of the float range go
  beyond), and ``lax.round`` rounds half to even. Flush-to-zero cannot change a result
  when every group's ``e >= -125``: then a subnormal input scales below 1/2 and rounds
  to 0 either way. Other groups, and all-zero ones, take the integer path, which is
  exact everywhere.
  """
  p, s = config.bits, config.headroom
  xf = x.astype(jnp.float32)
  # XLA's max may drop NaNs: count them as Inf, which max keeps.
  amax = _shared(config, jnp.max(jnp.where(jnp.isnan(xf), jnp.inf, jnp.abs(xf)),
                                 axis=reduce_axes, keepdims=True, initial=0.0))
  nonfinite = ~jnp.isfinite(jnp.max(amax, initial=0.0))
  log2 = floatbits.floor_log2_of_magnitude_bits(floatbits.magnitude_bits(amax), jnp.float32)
  exponent = log2 - (p - 2) + s
  fast = jnp.all((amax >= np.float32(2.0**-126)) & (exponent >= -125) & (exponent <= 126)) | nonfinite

  def float_path(xf, exponent):
    scale = lax.bitcast_convert_type(((127 - exponent) << 23).astype(jnp.int32), jnp.float32)
    return _finish(lax.round(xf * scale, lax.RoundingMethod.TO_NEAREST_EVEN).astype(jnp.int32),
                   exponent, nonfinite, config, x.shape, axis)

  def integer_path(xf, exponent):
    del xf, exponent
    return _quantize_exact(x, config, None, axis, reduce_axes, None)

  return lax.cond(fast, float_path, integer_path, xf, exponent)


def _quantize_exact(x, config: QuantConfig, key, axis, reduce_axes, scale_exponent) -> DFPTensor:
  """Quantization on the integer bit patterns: exact for every input, subnormals included."""
  p, s = config.bits, config.headroom
  mag = floatbits.magnitude_bits(x)
  nonfinite = _shared(config, jnp.any(mag >= floatbits.nonfinite_threshold(x.dtype)))
  negative, sig, exp2 = floatbits.decode(x)
  offset = jnp.zeros((), jnp.int32) if scale_exponent is None else jnp.asarray(scale_exponent, jnp.int32)
  exp2 = exp2 + offset

  log2 = jnp.where(mag == 0, _LOG2_OF_ZERO, floatbits.floor_log2_of_magnitude_bits(mag, x.dtype) + offset)
  top = _shared(config, jnp.max(log2, axis=reduce_axes, keepdims=True, initial=_LOG2_OF_ZERO))
  exponent = jnp.where(top == _LOG2_OF_ZERO, 0, top - (p - 2) + s)

  shift = exp2 - exponent  # m = R(sig * 2**shift)
  q, t, sticky = floatbits.split_shift(sig, jnp.maximum(-shift, 0))
  if config.rounding == "nearest":
    magnitude = (q + floatbits.round_half_even_up(q, t, sticky).astype(jnp.uint32)).astype(jnp.int32)
    m = jnp.where(negative, -magnitude, magnitude)
  else:
    u = rng.uniform_bits(key, x.shape)
    # floor(v + u) over 32 fraction bits, exact (docs/numerics.md): for v >= 0 it is
    # q + carry(t + U); for v < 0 it is -q - [frac != 0] + carry((-c) + U), with
    # c = ceil(frac * 2**32) = t + sticky.
    carry_pos = ((t + u) < u).astype(jnp.int32)
    c = t + sticky.astype(jnp.uint32)
    carry_neg = (((jnp.uint32(0) - c) + u) < u).astype(jnp.int32)
    qi = q.astype(jnp.int32)
    m = jnp.where(negative, -qi - (c != 0).astype(jnp.int32) + carry_neg, qi + carry_pos)
  exact = (sig << jnp.clip(shift, 0, 31).astype(jnp.uint32)).astype(jnp.int32)
  m = jnp.where(shift >= 0, jnp.where(negative, -exact, exact), m)
  return _finish(m, exponent, nonfinite, config, x.shape, axis)


def dequantize(t: DFPTensor, dtype=jnp.float32):
  """The exact value ``mantissa * 2**exponent`` as ``dtype`` (NaN for a non-finite tensor).

  Exact whenever the value is representable in ``dtype``; otherwise rounded as IEEE
  scaling does (to Inf above the range, to nearest-even subnormals below it).
  """
  m = t.mantissa.astype(jnp.int32)
  e = t.broadcast_exponent()
  magnitude = jnp.abs(m).astype(jnp.uint32)
  y = floatbits.encode_scaled(m < 0, magnitude, jnp.broadcast_to(e, m.shape), dtype)
  return jnp.where(e == NONFINITE_EXPONENT, jnp.array(jnp.nan, dtype), y)
