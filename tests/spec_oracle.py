"""An independent, deliberately plain implementation of the DFP spec for the tests.

Python integers and fractions only: slow, obviously exact, and sharing no code with
dfpjax. Use it on small tensors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np

FORMATS = {  # dtype: (precision, emin, emax)
    np.dtype(np.float32): (24, -126, 127),
    np.dtype(ml_dtypes.bfloat16): (8, -126, 127),
    np.dtype(np.float16): (11, -14, 15),
}
NONFINITE = 2**31 - 1


def fmix32(h: int) -> int:
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & 0xFFFFFFFF
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & 0xFFFFFFFF
  return h ^ (h >> 16)


def uniform_bits(k0: int, k1: int, index: int) -> int:
  return fmix32(k1 ^ fmix32(index ^ k0))


def quantize(x: np.ndarray, bits=16, headroom=0, rounding="nearest", key_words=None, axis=None):
  """Spec section 2. Returns (int mantissas as int64 array, exponent int or list)."""
  x = np.asarray(x)
  flat = [Fraction(float(v)) if np.isfinite(v) else None for v in x.astype(np.float64).reshape(-1)]
  if any(v is None for v in flat):
    shape = () if axis is None else (x.shape[axis],)
    return np.zeros(x.shape, np.int64), np.full(shape, NONFINITE, np.int64)
  values = np.array(flat, dtype=object).reshape(x.shape)
  if axis is None:
    groups = [(np.ones(x.shape, bool), None)]
  else:
    groups = []
    for c in range(x.shape[axis]):
      mask = np.zeros(x.shape, bool)
      index = [slice(None)] * x.ndim
      index[axis] = c
      mask[tuple(index)] = True
      groups.append((mask, c))
  limit = 2 ** (bits - 1) - 1
  m = np.zeros(x.shape, np.int64)
  exponents = []
  for mask, _ in groups:
    amax = max((abs(v) for v in values[mask]), default=Fraction(0))
    e = 0 if amax == 0 else _floor_log2(amax) - (bits - 2) + headroom
    exponents.append(e)
    for idx in zip(*np.nonzero(mask)):
      v = values[idx] / Fraction(2) ** e
      if rounding == "nearest":
        r = _round_half_even(v)
      else:
        flat_index = int(np.ravel_multi_index(idx, x.shape))
        u = Fraction(uniform_bits(key_words[0], key_words[1], flat_index), 2**32)
        r = math.floor(v + u)
      m[idx] = max(-limit, min(limit, r))
  exponent = exponents[0] if axis is None else np.array(exponents, np.int64)
  return m, exponent


def _floor_log2(v: Fraction) -> int:
  e = v.numerator.bit_length() - v.denominator.bit_length()
  while Fraction(2) ** e > v:
    e -= 1
  while Fraction(2) ** (e + 1) <= v:
    e += 1
  return e


def _round_half_even(v: Fraction) -> int:
  f = math.floor(v)
  rest = v - f
  if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and f % 2 == 1):
    return f + 1
  return f


def encode(s: int, k: int, dtype) -> float:
  """Spec section 3's ``fl(s) * 2**k``: round to the format's precision once (unbounded
  exponent), then IEEE scaling (Inf above the range, nearest-even subnormals below)."""
  p, emin, emax = FORMATS[np.dtype(dtype)]
  if s == 0:
    return 0.0
  sign = -1 if s < 0 else 1
  mag = abs(s)
  n = mag.bit_length()
  r = _round_half_even(Fraction(mag, 2 ** max(n - p, 0))) * 2 ** max(n - p, 0)  # p bits
  value = Fraction(r) * Fraction(2) ** k
  lead = _floor_log2(value)
  if lead > emax:
    return sign * math.inf
  if lead < emin:  # subnormal: a multiple of 2**(emin - p + 1)
    quantum = Fraction(2) ** (emin - p + 1)
    value = _round_half_even(value / quantum) * quantum
    if value == 0:
      return -0.0 if sign < 0 else 0.0
  return sign * float(value)


def dot_2d(ma, ea, mb, eb, out_dtype=np.float32):
  """Exact (M,K)x(K,N) DFP product of integer mantissas with scalar or per-row/col exponents."""
  ma = np.asarray(ma, np.int64)
  mb = np.asarray(mb, np.int64)
  s = ma @ mb  # exact: |s| < 2**63 for the sizes tests use
  ea = np.broadcast_to(np.asarray(ea).reshape(-1, 1), s.shape)
  eb = np.broadcast_to(np.asarray(eb).reshape(1, -1), s.shape)
  out = np.empty(s.shape, np.float64)
  for (i, j), v in np.ndenumerate(s):
    if ea[i, j] == NONFINITE or eb[i, j] == NONFINITE:
      out[i, j] = np.nan
    else:
      out[i, j] = encode(int(v), int(ea[i, j]) + int(eb[i, j]), out_dtype)
  return out.astype(out_dtype)
