"""``dfp_quantize_p``: float32 operands to DFP in the C kernel (spec section 2).

The DFP ops quantize every operand and cotangent they take. As XLA code that is an
abs-max reduction and a float fast path guarded by ``lax.cond`` against an exact integer
path (``numerics.quantization``): a large HLO per operand, which dominates compile time
and memory of a whole train step. ``dfp_quantize_p`` is the same function as one kernel
call, integer-only and exact for every input, with one exponent per leading index
(``vmap`` folds into it). On other platforms, and in ``reference_mode``, it is the
numerics module's code. ``dfp_quantize_given_max_p`` is the same kernel on one shard of a
group whose amax over all shards is given (a sharded operand's global exponent), and
``dfp_max_magnitudes_p`` finds a shard's amax for it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import batching, mlir

from dfpjax import cpu_ffi
from dfpjax._jax_compat import ad
from dfpjax.numerics import floatbits
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
  return f"{factors} -> {factors}, g", ()


def _partition(mesh, specs, shapes, bind, *, wanted, bits, headroom):
  del mesh, shapes, wanted  # the mantissas keep the operand's split
  (spec,) = specs
  split_over = partitioning.axes_of(*spec[1:])  # the mesh axes that split a group
  per_shard = (functools.partial(_quantize_with_global_amax, axes=split_over, bits=bits,
                                 headroom=headroom) if split_over else bind)
  return per_shard, (spec, spec[:1]), (spec,)


def _quantize_with_global_amax(x, *, axes, bits, headroom):
  """``dfp_quantize_p`` of shard ``x`` with each group's exponent from the whole group: its
  amax (as a magnitude bit pattern, whose max is exact and ranks a NaN above Inf),
  max-reduced over ``axes`` (mesh axes of a partition or manual ``exponent_axes``), given
  to the kernel, which only forms the mantissas: one pass over the shard after
  ``dfp_max_magnitudes_p``'s.

  The exponent is a function of the amax alone and each mantissa of its element and the
  exponent (spec section 2), so the shard's mantissas are those one device forms.
  """
  group_max = lax.pmax(dfp_max_magnitudes_p.bind(x), axes)
  return dfp_quantize_given_max_p.bind(x, group_max, bits=bits, headroom=headroom)


registry.register(dfp_quantize_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=reference.quantize,
                  sharding_rule=_sharding_rule, partition=_partition)

# ---------------------------------------------------------------------------------------
# ``dfp_quantize_given_max_p``: ``dfp_quantize_p`` of a shard whose groups' amax, as magnitude
# bit patterns (uint32 [groups]), are given (their max over the shards). Bound only where
# every mesh axis is manual (a partition's per-shard function, ``shard_map``), so it has no
# partitioning of its own.
# ---------------------------------------------------------------------------------------

dfp_quantize_given_max_p = registry.new_primitive("dfp_quantize_given_max", multiple_results=True)


def _given_max_abstract_eval(x, group_max, *, bits, headroom):
  if group_max.dtype != jnp.uint32 or group_max.shape != x.shape[:1]:
    raise TypeError(f"dfp_quantize_given_max_p takes uint32 group maxima of shape {x.shape[:1]}, "
                    f"got {group_max.dtype}{group_max.shape}")
  return _abstract_eval(x, bits=bits, headroom=headroom)


def _given_max_batch_rule(args, dims, *, bits, headroom):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  x, group_max = (batching.bdim_at_front(a, d, size) for a, d in zip(args, dims))
  groups = x.shape[1]
  m, e = dfp_quantize_given_max_p.bind(x.reshape(size * groups, *x.shape[2:]),
                                       group_max.reshape(-1), bits=bits, headroom=headroom)
  return (m.reshape(x.shape), e.reshape(size, groups)), (0, 0)


def _given_max_cpu_lowering(ctx, x, group_max, *, bits, headroom):
  cpu_ffi.register()
  return jax.ffi.ffi_lowering(cpu_ffi.QUANTIZE_GIVEN_MAX_TARGET)(
      ctx, x, group_max, bits=np.int32(bits), headroom=np.int32(headroom))


def _given_max_xla_lowering(x, group_max, *, bits, headroom):
  """The reference's quantization of each group with its amax as one more element."""
  flat = x.reshape(x.shape[0], -1)
  amax = lax.bitcast_convert_type(group_max, jnp.float32)[:, None]
  m, e = reference.quantize(jnp.concatenate([flat, amax], axis=1), bits=bits, headroom=headroom)
  return m[:, :-1].reshape(x.shape), e


# ``dfp_max_magnitudes_p``: each group's amax as a magnitude bit pattern (uint32 [groups]), what
# ``dfp_quantize_given_max_p`` takes. On CPU a kernel reads the floats once; XLA:CPU writes the
# magnitudes out before it reduces them (a pass more, and a shard-sized uint32 buffer).
dfp_max_magnitudes_p = registry.new_primitive("dfp_max_magnitudes")


def _max_magnitudes_abstract_eval(x):
  if x.dtype != jnp.float32 or x.ndim < 1:
    raise TypeError(f"dfp_max_magnitudes_p takes float32 [groups, ...], got {x.dtype}{x.shape}")
  return output_aval(x.shape[:1], jnp.uint32, x, spec=[registry.spec_entry(x, 0)])


def _max_magnitudes_batch_rule(args, dims):
  (x,), (d,) = args, dims
  x = batching.bdim_at_front(x, d, x.shape[d])
  top = dfp_max_magnitudes_p.bind(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]))
  return top.reshape(x.shape[:2]), 0


def _max_magnitudes_cpu_lowering(ctx, x):
  cpu_ffi.register()
  return jax.ffi.ffi_lowering(cpu_ffi.MAX_MAGNITUDES_TARGET)(ctx, x)


def _max_magnitudes_xla_lowering(x):
  magnitudes = floatbits.magnitude_bits(x).reshape(x.shape[0], -1)
  return jnp.max(magnitudes, axis=1, initial=0).astype(jnp.uint32)


dfp_max_magnitudes_p.def_abstract_eval(_max_magnitudes_abstract_eval)
batching.primitive_batchers[dfp_max_magnitudes_p] = _max_magnitudes_batch_rule
mlir.register_lowering(dfp_max_magnitudes_p, _max_magnitudes_cpu_lowering, platform="cpu")
mlir.register_lowering(dfp_max_magnitudes_p, mlir.lower_fun(_max_magnitudes_xla_lowering,
                                                            multiple_results=False))

dfp_quantize_given_max_p.def_abstract_eval(_given_max_abstract_eval)
batching.primitive_batchers[dfp_quantize_given_max_p] = _given_max_batch_rule
mlir.register_lowering(dfp_quantize_given_max_p, _given_max_cpu_lowering, platform="cpu")
mlir.register_lowering(dfp_quantize_given_max_p,
                       mlir.lower_fun(_given_max_xla_lowering, multiple_results=True))

# ---------------------------------------------------------------------------------------
# Differentiation: the outputs are integers, so their tangent is zero (float0). The DFP
# ops' straight-through rule (``bilinear``) differentiates with respect to the float
# operand instead.
# ---------------------------------------------------------------------------------------

def _integer_outputs_jvp(p, primals, tangents, **params):
  del tangents
  out = p.bind(*primals, **params)
  return out, [ad.p2tz(o) for o in out] if p.multiple_results else ad.p2tz(out)


for _p in (dfp_quantize_p, dfp_quantize_given_max_p, dfp_max_magnitudes_p):
  ad.primitive_jvps[_p] = functools.partial(_integer_outputs_jvp, _p)

# ---------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------


def quantize_operand(x, config: QuantConfig, key=None, axis=None) -> DFPTensor:
  """``quantize_with(x, config, key, axis)``, through ``dfp_quantize_p`` where it applies:
  float32, round to nearest, one exponent per tensor."""
  if (x.dtype != jnp.float32 or config.rounding != "nearest" or config.granularity != "tensor"
      or reference.in_reference_mode()):
    return quantize_with(x, config, key, axis)
  group = x.reshape(1, *x.shape)
  if config.exponent_axes:
    m, e = _quantize_with_global_amax(group, axes=config.exponent_axes, bits=config.bits,
                                      headroom=config.headroom)
  else:
    m, e = dfp_quantize_p.bind(group, bits=config.bits, headroom=config.headroom)
  return DFPTensor(m.reshape(x.shape), e.reshape(()), None)
