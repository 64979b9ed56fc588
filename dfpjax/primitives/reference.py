"""The pure-XLA twins of the C kernels: the DFP primitives' lowering on every non-CPU
platform, what ``reference_mode`` traces, and the tests' reference.

Sums of INT16 products are formed exactly in int64. JAX without ``jax_enable_x64`` has no
int64 arrays, so these functions switch x64 on locally: inside a lowering that yields s64
operations while the user's program stays 32-bit.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax.numerics import floatbits
from dfpjax.numerics.config import QuantConfig
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor, quantize_with
from dfpjax.primitives import conv_transpose
from dfpjax.primitives.conv_params import ConvParams, Geometry, dilated_size


def encode_exact(s, exponent, nonfinite, out_dtype):
  """``fl(s) * 2**exponent`` for exact int64 sums ``s`` (spec section 3), NaN where ``nonfinite``.

  ``exponent`` may be any int64 (a sum of two int32 exponents): past +-2**20 every non-zero
  sum gives +-Inf or +-0 in any format, so clamping there keeps the arithmetic in range.
  """
  with jax.enable_x64(True):
    exponent = jnp.clip(exponent.astype(jnp.int64), -(1 << 20), 1 << 20).astype(jnp.int32)
    y = floatbits.encode_scaled(s < 0, jnp.abs(s).astype(jnp.uint64), exponent, out_dtype)
    return jnp.where(nonfinite, jnp.array(jnp.nan, out_dtype), y)


def encode_sums(s, ea, eb, out_dtype):
  """The kernels' output stage: ``fl(s) * 2**(ea + eb)`` in ``out_dtype`` for exact int64
  sums ``s``, NaN where either exponent marks a non-finite operand; the int32 exponents
  ``ea`` and ``eb`` broadcast against ``s``."""
  with jax.enable_x64(True):
    exponent = ea.astype(jnp.int64) + eb.astype(jnp.int64)  # never wraps
    nonfinite = (ea == NONFINITE_EXPONENT) | (eb == NONFINITE_EXPONENT)
    return encode_exact(s, jnp.broadcast_to(exponent, s.shape),
                        jnp.broadcast_to(nonfinite, s.shape), np.dtype(out_dtype))


def dot(a, ea, b, eb, *, lhs_kmajor: bool, rhs_nmajor: bool, out_dtype):
  """``dfp_dot_general_p``: the DFP product in the kernel's canonical form.

  ``a`` is int16 [B, M, K] (or [B, K, M] if ``lhs_kmajor``), ``b`` int16 [B, K, N] (or
  [B, N, K] if ``rhs_nmajor``); ``ea`` int32 [1 or B, 1 or M], ``eb`` int32 [1 or B, 1 or N].
  Returns ``out_dtype`` [B, M, N]; with ``out_dtype`` int64, the exact sums themselves
  (exponents unread), as the kernel's int64 output.
  """
  with jax.enable_x64(True):
    dims = (((1 if lhs_kmajor else 2,), (2 if rhs_nmajor else 1,)), ((0,), (0,)))
    s = lax.dot_general(a.astype(jnp.int64), b.astype(jnp.int64), dims,
                        preferred_element_type=jnp.int64)
    if np.dtype(out_dtype) == np.int64:
      return s
    return encode_sums(s, ea[:, :, None], eb[:, None, :], out_dtype)


def _patches(x, window_shape, out_spatial, p: ConvParams):
  """Input patches [N, *out_spatial, prod(window), C] of channels-last ``x`` [N, *spatial, C].

  Pure data movement (pad with interior dilation, strided slices), so it is exact for the
  int16 mantissas: every element is an input value or a padding zero. One strided slice per
  window tap, or per output position when there are fewer of those (backward-weights
  convolutions have windows as large as the image and few output positions).
  """
  config = ([(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(p.padding, p.lhs_dilation)]
            + [(0, 0, 0)])
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  n, c = x.shape[0], x.shape[-1]

  def window_slice(first, count, step):
    start = [0, *first, 0]
    limit = [n, *(f + dilated_size(k, st) for f, k, st in zip(first, count, step)), c]
    return lax.slice(x, start, limit, [1, *step, 1])

  if math.prod(out_spatial) == 0 or math.prod(window_shape) == 0:  # no patches, or empty ones
    return jnp.zeros((n, *out_spatial, math.prod(window_shape), c), x.dtype)
  if math.prod(window_shape) <= math.prod(out_spatial):
    taps = [window_slice([o * d for o, d in zip(offset, p.rhs_dilation)], out_spatial, p.window_strides)
            for offset in itertools.product(*map(range, window_shape))]
    return jnp.stack(taps, axis=-2)
  positions = [window_slice([o * st for o, st in zip(pos, p.window_strides)], window_shape,
                            p.rhs_dilation).reshape(n, -1, c)
               for pos in itertools.product(*map(range, out_spatial))]
  return jnp.stack(positions, axis=1).reshape(n, *out_spatial, -1, c)


def conv(x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  """``dfp_conv_p``: input patches times ``dot``; backward-data as JAX's transpose rule
  makes it, a forward convolution of dy (``conv_transpose``). ``out_dtype`` int64 gives the
  exact sums, as for ``dot``."""
  if mode == "backward_data":
    lhs_shape = (x.shape[0], *geometry.input_spatial, geometry.groups * b.shape[-2])
    dy, w, params = conv_transpose.transpose_lhs(x, b, lhs_shape, geometry.params())
    return conv_transpose.forward_conv(conv, DFPTensor(dy, ex.reshape(())),
                                       DFPTensor(w, eb.reshape(())), params, out_dtype)
  if mode == "forward":
    b = geometry.weights_of(b)
  g = geometry.groups
  batch, cin = x.shape[0], x.shape[-1] // g
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  taps, positions = math.prod(geometry.window), math.prod(out_spatial)
  patches = _patches(x, geometry.window, out_spatial, geometry.params())  # N, out, taps, G*cin
  patches = patches.reshape(batch * positions, taps, g, cin)
  patches = jnp.transpose(patches, (2, 0, 1, 3)).reshape(g, batch * positions, taps * cin)
  cout = b.shape[-1] // g
  if mode == "forward":
    w = jnp.transpose(b.reshape(taps * cin, g, cout), (1, 0, 2))
    rows = ex if ex.shape[0] == 1 else jnp.repeat(ex, positions)
    y = dot(patches, rows.reshape(1, -1), w, eb.reshape(1, 1), lhs_kmajor=False,
            rhs_nmajor=False, out_dtype=out_dtype)  # G, N*positions, cout
    return jnp.transpose(y, (1, 0, 2)).reshape(batch, *out_spatial, g * cout)
  dy = jnp.transpose(b.reshape(batch * positions, g, cout), (1, 0, 2))
  dw = dot(patches, ex.reshape(1, 1), dy, eb.reshape(1, 1), lhs_kmajor=True,
           rhs_nmajor=False, out_dtype=out_dtype)  # G, taps*cin, cout
  return jnp.transpose(dw, (1, 0, 2)).reshape(*geometry.window, cin, g * cout)


def quantize(x, *, bits, headroom):
  """``dfp_quantize_p``: the numerics module's quantization, one exponent per leading index."""
  config = QuantConfig(bits=bits, headroom=headroom)
  t = jax.vmap(lambda group: quantize_with(group, config))(x)
  return t.mantissa, t.exponent


_mode = threading.local()


@contextlib.contextmanager
def reference_mode():
  """Within this context, DFP ops are traced with these pure-XLA implementations on every
  platform instead of binding the kernel primitives (the CPU path's bit-exact twin).

  It acts when a function is traced: a function jitted earlier keeps what it compiled.
  """
  previous = getattr(_mode, "active", False)
  _mode.active = True
  try:
    yield
  finally:
    _mode.active = previous


def in_reference_mode() -> bool:
  return getattr(_mode, "active", False)
