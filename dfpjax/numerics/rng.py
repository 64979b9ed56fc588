"""The counter-based generator behind stochastic rounding (docs/numerics.md).

``u_i = U_i / 2**32`` with ``U_i = fmix32(k1 ^ fmix32(i ^ k0))``, where ``(k0, k1)``
is the key's raw uint32 data, ``i`` the element's row-major index in the operand and
``fmix32`` MurmurHash3's finaliser. Both steps are bijections of uint32, so within
one operand the draws are a permutation: distinct, and uniform over [0, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

MAX_ELEMENTS = 1 << 32  # indices are uint32


def fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def key_words(key):
  """The two uint32 words of a JAX PRNG key (typed or raw uint32[2])."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  key = jnp.asarray(key)
  if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
    raise TypeError(
        "stochastic rounding needs a jax.random key (threefry) or raw uint32[2] key data, "
        f"got {key.dtype}{list(key.shape)}")
  flat = key.reshape(-1)
  return flat[0], flat[1]


def uniform_bits(key, shape):
  """uint32 draws ``U_i`` for every element of an array of ``shape``."""
  size = 1
  for d in shape:
    size *= d
  if size > MAX_ELEMENTS:
    raise ValueError(f"stochastic rounding indexes elements with uint32; {size} elements is too many")
  k0, k1 = key_words(key)
  index = lax.iota(jnp.uint32, size).reshape(shape)
  return fmix32(k1 ^ fmix32(index ^ k0))
