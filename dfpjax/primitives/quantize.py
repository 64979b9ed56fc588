"""``dfp_quantize_p``: float32 operands to DFP in the C kernel (spec section 2).

The DFP ops quantize every operand and cotangent they take. As XLA code that is an
abs-max reduction and a float fast path guarded by ``lax.cond`` against an exact integer
path (``numerics.quantization``): a large HLO per operand, which dominates compile time
and memory of a whole train step. ``dfp_quantize_p`` is the same function as one kernel
call, integer-only and exact for every input, with one exponent per leading index
(``vmap`` folds into it). On other platforms, and in ``reference_mode``, it is the
numerics module's code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import batching

from dfpjax import cpu_ffi
from dfpjax._jax_compat import ad
from dfpjax.numerics.config import QuantConfig
from dfpjax.numerics.quantization import DFPTensor, quantize_with
from dfpjax.primitives import partitioning, reference, registry
from dfpjax.primitives.registry import output_aval

dfp_quantize_p = registry.new_primitive("dfp_quantize", multiple_results=True)

# ---------------------------------------------------------------------------------------
# Shape rule.
# ---------------------------------------------------------------------------------------


def _abstract_eval(x, *, bits, headroom):
  if x.dtype != jnp.float32 or x.ndim < 1:
    raise TypeError(f"dfp_quantize_p takes a float32 array of rank >= 1, got {x.dtype}{x.shape}")
  spec = [registry.spec_entry(x, d) for d in range(x.ndim)]
  return (output_aval(x.shape, jnp.int16, x, spec=spec),
          output_aval(x.shape[:1], jnp.int32, x, spec=spec[:1]))


# ---------------------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------------------


def _batch_rule(args, dims, *, bits, headroom):
  (x,), (d,) = args, dims
  x = batching.bdim_at_front(x, d, x.shape[d])
  size, groups = x.shape[:2]
  m, e = dfp_quantize_p.bind(x.reshape(size * groups, *x.shape[2:]), bits=bits,
                             headroom=headroom)
  return (m.reshape(x.shape), e.reshape(size, groups)), (0, 0)


# ---------------------------------------------------------------------------------------
# Lowerings: the C kernel on CPU, its pure-XLA twin (``reference.quantize``) elsewhere.
# ---------------------------------------------------------------------------------------


def _cpu_lowering(ctx, x, *, bits, headroom):
  cpu_ffi.register()
  return jax.ffi.ffi_lowering(cpu_ffi.QUANTIZE_TARGET)(
      ctx, x, bits=np.int32(bits), headroom=np.int32(headroom))


# ---------------------------------------------------------------------------------------
# Partitioning: each device quantizes its shard with the global exponent.
# ---------------------------------------------------------------------------------------


def _sharding_rule(shapes, *, bits, headroom):
  del bits, headroom
  factors = " ".join(["g", *partitioning.fresh_factors("d", len(shapes[0]) - 1)])
  return f"{factors} -> {factors}, g"


def _partition(mesh, specs, shapes, bind, *, bits, headroom):
  del mesh, shapes, bits, headroom
  (spec,) = specs
  split_over = partitioning.axes_of(*spec[1:])  # the mesh axes that split a group

  def per_shard(x):
    return _quantize_with_global_amax(bind, x, split_over) if split_over else bind(x)

  return per_shard, (spec, spec[:1]), (spec,)


def _quantize_with_global_amax(bind, x, axes):
  """The kernel on shard ``x`` with each group's exponent from the whole group: its amax,
  max-reduced over ``axes`` (mesh axes of a partition or manual ``exponent_axes``), joins
  the shard as one more element.

  The exponent is a function of the amax alone and each mantissa of its element and the
  exponent (spec section 2), so the shard's mantissas are those one device forms. A NaN
  amax goes over as +Inf, which makes every shard's exponent the non-finite marker.
  """
  flat = x.reshape(x.shape[0], -1)
  # Only the exponent depends on it, and the integer outputs carry no tangent (pmax has none).
  amax = lax.stop_gradient(jnp.max(jnp.abs(flat), axis=1, keepdims=True))
  amax = lax.pmax(jnp.where(jnp.isnan(amax), jnp.inf, amax), axes)
  m, e = bind(jnp.concatenate([flat, amax], axis=1))
  return m[:, :-1].reshape(x.shape), e


registry.register(dfp_quantize_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=reference.quantize,
                  sharding_rule=_sharding_rule, partition=_partition)

# ---------------------------------------------------------------------------------------
# Differentiation: the outputs are integers, so their tangent is zero (float0). The DFP
# ops' straight-through rule (``bilinear``) differentiates with respect to the float
# operand instead.
# ---------------------------------------------------------------------------------------

ad.primitive_jvps[dfp_quantize_p] = lambda primals, tangents, **params: (
    (out := dfp_quantize_p.bind(*primals, **params)), [ad.p2tz(o) for o in out])

# ---------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------


def quantize_operand(x, config: QuantConfig, key=None, axis=None) -> DFPTensor:
  """``quantize_with(x, config, key, axis)``, through ``dfp_quantize_p`` where it applies:
  float32, round to nearest, one exponent per tensor."""
  if (x.dtype != jnp.float32 or config.rounding != "nearest" or config.granularity != "tensor"
      or reference.in_reference_mode()):
    return quantize_with(x, config, key, axis)
  bind = functools.partial(dfp_quantize_p.bind, bits=config.bits, headroom=config.headroom)
  group = x.reshape(1, *x.shape)
  if config.exponent_axes:
    m, e = _quantize_with_global_amax(bind, group, config.exponent_axes)
  else:
    m, e = bind(group)
  return DFPTensor(m.reshape(x.shape), e.reshape(()), None)
