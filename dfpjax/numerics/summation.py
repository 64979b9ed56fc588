"""Reproducible float32 sums: the same bits in any order of addition, on any number of devices.

A float sum's rounding depends on the order of its additions, and XLA chooses that order: its
vectorized loops, its fusions, and, for an operand sharded over devices, the split into
per-device partial sums joined by an all-reduce. ``reproducible_sum`` removes the order from the
result by pre-rounding (Demmel & Nguyen, "Fast reproducible floating-point summation", 2013; the
idea behind ReproBLAS): every element is split exactly into a few parts on fixed power-of-two
grids chosen from the reduced elements' global abs-max, each part an integer on its grid, and the
integers are summed exactly in int32 (integer addition is associative, also inside XLA's
all-reduce). Only a max and integer sums cross devices, and both are exact in any order.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax.numerics import floatbits

# Every fold sums integers of at most _FOLD_BITS - ceil(log2(n)) bits, so that n of them stay
# below 2**30 in magnitude: int32 never overflows.
_FOLD_BITS = 30
# The folds together keep every element to 2**-_KEPT_BITS of the binade of the largest one.
_KEPT_BITS = 24
_MAX_COUNT = 1 << (_FOLD_BITS - 1)


def fold_count(count: int) -> tuple[int, int]:
  """``(folds, bits)`` of a sum of ``count`` elements: ``folds`` int32 sums of integers of at
  most ``bits`` bits each, together ``folds * bits >= 24`` bits below the abs-max's binade."""
  bits = _FOLD_BITS - max(0, math.ceil(math.log2(count)))
  return -(-_KEPT_BITS // bits), bits


def _pow2(n):
  """2.0**n as float32 for int32 ``n`` in [-126, 127], built from its bits (exact)."""
  return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def _times_pow2(v, n):
  """v * 2**n for int32 ``n`` in [-252, 254]: two exact power-of-two factors, so that neither
  overflows where the product does not."""
  half = n >> 1
  return v * _pow2(half) * _pow2(n - half)


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
  if axis is None:
    return tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
      raise ValueError(f"axis {axis!r} is out of range for a rank-{ndim} array")
  normalized = tuple(sorted(int(a) % ndim for a in axes))
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"axis {axis!r} repeats an axis")
  return normalized


def reproducible_sum(x: jax.Array, axis: int | Sequence[int] | None = None,
                     keepdims: bool = False) -> jax.Array:
  """The sum of float32 ``x`` over ``axis`` (as ``jnp.sum``), with bits that do not depend on
  the order of the additions: the same under any permutation of the reduced elements, any XLA
  fusion or vectorization, and any sharding of ``x`` over devices (``jax.jit`` with
  ``NamedSharding``).

  Method. Let ``n`` be the number of reduced elements, ``M`` their largest magnitude and
  ``2**e`` the power of two just above ``M`` (from M's exponent bits; ``M`` is an integer max, so
  exact across devices). With ``b = 30 - ceil(log2(n))`` bits per fold and ``K = ceil(24 / b)``
  folds (``fold_count``), each element is split exactly into ``K`` integers ``r_k`` on the grids
  ``2**(e - b*(k+1))``: ``r_0`` is the element rounded to the first grid, ``r_1`` its residual
  rounded to the next, and so on (multiplications by powers of two and ``round``, all exact).
  ``|r_k| <= 2**b``, so each fold's ``n`` integers add up in int32 without overflow, exactly, in
  any order; the ``K`` fold sums are then scaled and added in a fixed order in float32.
  K is 1 for n <= 64, 2 for n <= 2**18, 3 for n <= 2**22; n may not exceed 2**29.

  Accuracy: ``|reproducible_sum(x) - sum(x)| <= (2*K + 1) * 2**-24 * n * M`` against the exact
  sum: ``n * M * 2**-24`` for the residuals below the last grid, the rest for the ``2*K - 1``
  float32 roundings that join the folds. That is the order of a float32 sum's own error bound
  (``(n - 1) * 2**-24 * sum(|x|)`` for a sequential sum).

  Cost: one pass for the integer max (and the sum of the non-finite elements alone) and ``K``
  passes of elementwise work and an int32 sum, where ``jnp.sum`` makes one pass; across devices
  one int32 max and ``K`` int32 sums are all-reduced (plus the non-finite sum, float32, but of
  zeros, infinities and NaNs only) instead of one float32 sum.

  Special values: any NaN, or both +Inf and -Inf, give NaN (its bits unspecified), otherwise an
  Inf gives that Inf; a sum whose exact value is zero is +0.0. Subnormal elements count as zero
  where XLA flushes them (XLA:CPU does), as in ``jnp.sum``.

  Differentiation: the sum is linear, so its cotangent is broadcast to ``x`` (no reduction: the
  gradient is exact). Forward-mode tangents are summed by ``jnp.sum``.

  Args:
    x: a float32 array.
    axis: the axes to sum over: an int, a sequence of ints, or None for all.
    keepdims: keep the summed axes with size 1.

  Returns:
    float32 of ``x``'s shape without the summed axes (with them as size 1 if ``keepdims``).
  """
  x = jnp.asarray(x)
  if x.dtype != jnp.float32:
    raise TypeError(f"reproducible_sum: x must be float32, got {x.dtype}")
  axes = _normalize_axes(axis, x.ndim)
  count = math.prod(x.shape[a] for a in axes)
  if count > _MAX_COUNT:
    raise ValueError(f"reproducible_sum: {count} elements per sum exceed the int32 folds' limit "
                     f"of 2**{_FOLD_BITS - 1}; sum over fewer axes first")
  return _reproducible_sum(x, axes, bool(keepdims))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _reproducible_sum(x, axes, keepdims):
  count = math.prod(x.shape[a] for a in axes)
  if count == 0:
    return jnp.sum(x, axes, keepdims=keepdims)
  folds, bits = fold_count(count)
  magnitude = floatbits.magnitude_bits(x)
  largest = jnp.max(magnitude, axes, keepdims=True)
  # 2**e > M: M's binade is [2**(biased - 127), 2**(biased - 126)); subnormal M (biased 0) and
  # zero take the smallest normal binade's bound.
  e = jnp.maximum(largest >> 23, 1) - 126
  z = _times_pow2(x, bits - e)  # |z| < 2**bits
  fold_sums = []
  for _ in range(folds):
    r = lax.round(z, lax.RoundingMethod.TO_NEAREST_EVEN)
    fold_sums.append(jnp.sum(r.astype(jnp.int32), axes, dtype=jnp.int32, keepdims=True))
    z = (z - r) * float(2**bits)  # exact: |z - r| <= 1/2 on r's grid
  total = fold_sums[-1].astype(jnp.float32)
  for fold_sum in reversed(fold_sums[:-1]):
    total = fold_sum.astype(jnp.float32) + total * float(2.0**-bits)
  total = _times_pow2(total, e - bits)
  # The infinities and NaNs alone: their float sum is the same in any order.
  nonfinite = magnitude >= floatbits.nonfinite_threshold(jnp.float32)
  special = jnp.sum(jnp.where(nonfinite, x, 0.0), axes, keepdims=True)
  total = jnp.where(largest >= floatbits.nonfinite_threshold(jnp.float32), special, total)
  return total if keepdims else jnp.squeeze(total, axes)


@_reproducible_sum.defjvp
def _reproducible_sum_jvp(axes, keepdims, primals, tangents):
  (x,), (t,) = primals, tangents
  # jnp.sum's tangent is linear, so reverse mode transposes it into a broadcast.
  return _reproducible_sum(x, axes, keepdims), jnp.sum(t, axes, keepdims=keepdims)
