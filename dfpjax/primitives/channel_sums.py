"""``dfp_channel_sums_p``: per-channel float sums in one read of the operands, in the C kernel.

BatchNorm's statistics are sums over every axis but the channels: the forward pass's sum and
sum of squares of the input, the backward pass's sums of the output cotangent ``dy`` and of
``dy`` times the centred input. As XLA:CPU code each is a reduction of its own (YNNPACK's, fast
alone), and a product's operand is first written out by a fusion: in the ResNet-50 DFP step
these sums took 247 ms of 1.96 s (docs/performance.md), where the kernel reads each operand
once. ``channel_sums(a, b, center)`` gives both sums of such a pair, ``sum(a)`` and
``sum(a * (b - center))``: ``channel_sums(x)`` is ``(sum(x), sum(x * x))``, and
``channel_sums(dy, x, mean)`` is ``(sum(dy), sum(dy * (x - mean)))``.

On CPU the kernel adds the terms in double (each product of two float32 values is exact there)
in an order set by the shape alone, and rounds each result once: more accurate than a float32
sum, and the same bits on every kernel path and thread count. Sharded, each device sums its
shard and the partial results are added over the devices in float32. On other platforms, and
in ``reference_mode``, the sums are XLA's float32 reductions (other rounding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import batching

from dfpjax import cpu_ffi
from dfpjax._jax_compat import ad
from dfpjax.primitives import partitioning, reference, registry
from dfpjax.primitives.registry import output_aval

dfp_channel_sums_p = registry.new_primitive("dfp_channel_sums", multiple_results=True)

# ---------------------------------------------------------------------------------------
# Shape rule: a, b [groups, ..., channels] and center [groups, channels] -> two [groups,
# channels], the sums over the dimensions between.
# ---------------------------------------------------------------------------------------


def _abstract_eval(a, b, center):
  if any(x.dtype != jnp.float32 for x in (a, b, center)) or a.ndim < 2:
    raise TypeError(f"dfp_channel_sums_p takes float32 operands, a of rank >= 2, got "
                    f"{a.dtype}{a.shape}, {b.dtype}{b.shape}, {center.dtype}{center.shape}")
  per_channel = (a.shape[0], a.shape[-1])
  if b.shape != a.shape or center.shape != per_channel:
    raise TypeError(f"dfp_channel_sums_p takes b shaped as a {a.shape} and center shaped "
                    f"{per_channel}, got {b.shape} and {center.shape}")
  spec = [registry.spec_entry(a, 0), registry.spec_entry(a, a.ndim - 1)]
  return [output_aval(per_channel, jnp.float32, a, b, center, spec=spec)] * 2


# ---------------------------------------------------------------------------------------
# Batching: the batch dimension becomes more groups.
# ---------------------------------------------------------------------------------------


def _batch_rule(args, dims):
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  a, b, center = (batching.bdim_at_front(x, d, size) for x, d in zip(args, dims))
  groups = a.shape[1]
  sums = dfp_channel_sums_p.bind(a.reshape(size * groups, *a.shape[2:]),
                                 b.reshape(size * groups, *b.shape[2:]),
                                 center.reshape(size * groups, -1))
  return [s.reshape(size, groups, -1) for s in sums], [0, 0]


# ---------------------------------------------------------------------------------------
# Lowerings: the C kernel on CPU, XLA's float32 sums elsewhere.
# ---------------------------------------------------------------------------------------


def _cpu_lowering(ctx, a, b, center):
  cpu_ffi.register()
  return jax.ffi.ffi_lowering(cpu_ffi.CHANNEL_SUMS_TARGET)(ctx, a, b, center)


def _per_channel(v, ndim):
  """``v`` [groups, channels] broadcastable against an operand of rank ``ndim``."""
  return v.reshape(v.shape[0], *(1,) * (ndim - 2), v.shape[1])


def _xla_sums(a, b, center):
  axes = tuple(range(1, a.ndim - 1))
  return [jnp.sum(a, axes), jnp.sum(a * (b - _per_channel(center, a.ndim)), axes)]


# ---------------------------------------------------------------------------------------
# Partitioning: each device sums its shard; the sums are added over the mesh axes that split
# the summed dimensions.
# ---------------------------------------------------------------------------------------


def _sharding_rule(shapes):
  summed = " ".join(partitioning.fresh_factors("r", len(shapes[0]) - 2))
  operand = f"g {summed} c" if summed else "g c"
  return f"{operand}, {operand}, g c -> g c, g c", ()


def _partition(mesh, specs, shapes, bind, *, wanted):
  del mesh, shapes, wanted
  spec = specs[0]
  per_channel = (spec[0], spec[-1])
  axes = partitioning.axes_of(*spec[1:-1])

  def per_shard(a, b, center):
    sums = bind(a, b, center)
    return [lax.psum(s, axes) for s in sums] if axes else sums

  return per_shard, (per_channel, per_channel), (spec, spec, per_channel)


registry.register(dfp_channel_sums_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=_xla_sums,
                  sharding_rule=_sharding_rule, partition=_partition)

# ---------------------------------------------------------------------------------------
# Differentiation: the sums are linear in a and bilinear in (a, b - center); their tangents
# are XLA's sums of the tangents' terms (the centred difference's rounding is not
# differentiated).
# ---------------------------------------------------------------------------------------


def _jvp(primals, tangents):
  a, b, center = primals
  da, db, dcenter = (None if type(t) is ad.Zero else t for t in tangents)
  sums = dfp_channel_sums_p.bind(a, b, center)
  axes = tuple(range(1, a.ndim - 1))
  terms = []
  if da is not None:
    terms.append(da * (b - _per_channel(center, a.ndim)))
  if db is not None:
    terms.append(a * db)
  if dcenter is not None:
    terms.append(-a * _per_channel(dcenter, a.ndim))
  dsum = ad.p2tz(sums[0]) if da is None else jnp.sum(da, axes)
  ddot = (jnp.sum(functools.reduce(jnp.add, terms), axes) if terms
          else ad.p2tz(sums[1]))
  return sums, [dsum, ddot]


ad.primitive_jvps[dfp_channel_sums_p] = _jvp

# ---------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------


def channel_sums(a, b=None, center=None):
  """Per-channel sums over every axis of ``a`` but the last, in one read of the operands:
  ``(sum(a), sum(a * (b - center)))``, each float32 of shape ``a.shape[-1:]``.

  ``a`` is float32 of rank >= 1; ``b`` (default ``a``) is float32 shaped as ``a``; ``center``
  (default zeros) is float32 of shape ``a.shape[-1:]``. ``channel_sums(x)`` is ``(sum(x),
  sum(x * x))``, BatchNorm's statistics; ``channel_sums(dy, x, mean)`` is ``(sum(dy), sum(dy *
  (x - mean)))``, its scale and bias gradients' sums. ``b - center`` is rounded to float32 as
  XLA would; on CPU the sums are then added in double (the products exact) and rounded once,
  the same bits on every kernel path and thread count; elsewhere they are XLA's float32 sums.
  Sharded along summed axes under ``jax.jit``, each device sums its shard and the results are
  added over the devices. Supports ``jax.vmap`` and forward and reverse differentiation.
  """
  a = jnp.asarray(a)
  b = a if b is None else jnp.asarray(b)
  for name, x in (("a", a), ("b", b)):
    if x.dtype != jnp.float32:
      raise TypeError(f"channel_sums: {name} must be float32, got {x.dtype}")
  if a.ndim < 1:
    raise ValueError("channel_sums: a must have at least one axis (the channels), got a scalar")
  if b.shape != a.shape:
    raise ValueError(f"channel_sums: b must have a's shape {a.shape}, got {b.shape}")
  channels = a.shape[-1]
  if center is None:
    center = jnp.zeros((channels,), jnp.float32)
  center = jnp.asarray(center)
  if center.dtype != jnp.float32 or center.shape != (channels,):
    raise ValueError(f"channel_sums: center must be float32 of shape ({channels},), got "
                     f"{center.dtype}{center.shape}")
  operands = (a[None], b[None], center[None])  # one group
  if reference.in_reference_mode():
    sums = _xla_sums(*operands)
  else:
    sums = dfp_channel_sums_p.bind(*operands)
  return tuple(s[0] for s in sums)
