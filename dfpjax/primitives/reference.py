"""Pure-XLA exact DFP products: the lowering on every non-CPU platform and the tests' reference.

Sums of INT16 products are formed exactly in int64. JAX without ``jax_enable_x64`` has no
int64 arrays, so these functions switch x64 on locally: inside a lowering that yields s64
operations while the user's program stays 32-bit.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax.numerics import floatbits
from dfpjax.numerics.quantization import NONFINITE_EXPONENT


def encode_exact(s, exponent, nonfinite, out_dtype):
  """``fl(s) * 2**exponent`` for exact int64 sums ``s`` (spec section 3), NaN where ``nonfinite``.

  ``exponent`` may be any int64 (a sum of two int32 exponents): past +-2**20 every non-zero
  sum gives +-Inf or +-0 in any format, so clamping there keeps the arithmetic in range.
  """
  with jax.enable_x64(True):
    exponent = jnp.clip(exponent.astype(jnp.int64), -(1 << 20), 1 << 20).astype(jnp.int32)
    y = floatbits.encode_scaled(s < 0, jnp.abs(s).astype(jnp.uint64), exponent, out_dtype)
    return jnp.where(nonfinite, jnp.array(jnp.nan, out_dtype), y)


def dot(a, ea, b, eb, *, lhs_kmajor: bool, rhs_nmajor: bool, out_dtype):
  """The DFP product in the kernel's canonical form (see ``dot_general.dfp_dot_general_p``).

  ``a`` is int16 [B, M, K] (or [B, K, M] if ``lhs_kmajor``), ``b`` int16 [B, K, N] (or
  [B, N, K] if ``rhs_nmajor``); ``ea`` int32 [1 or B, 1 or M], ``eb`` int32 [1 or B, 1 or N].
  Returns ``out_dtype`` [B, M, N].
  """
  with jax.enable_x64(True):
    dims = (((1 if lhs_kmajor else 2,), (2 if rhs_nmajor else 1,)), ((0,), (0,)))
    s = lax.dot_general(a.astype(jnp.int64), b.astype(jnp.int64), dims,
                        preferred_element_type=jnp.int64)
    exponent = ea.astype(jnp.int64)[:, :, None] + eb.astype(jnp.int64)[:, None, :]  # never wraps
    nonfinite = (ea == NONFINITE_EXPONENT)[:, :, None] | (eb == NONFINITE_EXPONENT)[:, None, :]
    shape = s.shape
    return encode_exact(s, jnp.broadcast_to(exponent, shape), jnp.broadcast_to(nonfinite, shape),
                        np.dtype(out_dtype))


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
