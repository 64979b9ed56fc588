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

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching

from dfpjax import cpu_ffi
from dfpjax._jax_compat import ad
from dfpjax.numerics.config import QuantConfig
from dfpjax.numerics.quantization import DFPTensor, quantize_with
from dfpjax.primitives import reference, registry
from dfpjax.primitives.registry import output_aval

dfp_quantize_p = registry.new_primitive("dfp_quantize", multiple_results=True)

# ---------------------------------------------------------------------------------------
# Shape rule.
# ---------------------------------------------------------------------------------------


def _abstract_eval(x, *, bits, headroom):
  if x.dtype != jnp.float32 or x.ndim < 1:
    raise TypeError(f"dfp_quantize_p takes a float32 array of rank >= 1, got {x.dtype}{x.shape}")
  return (output_aval(x.shape, jnp.int16, x), output_aval(x.shape[:1], jnp.int32, x))


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


registry.register(dfp_quantize_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=reference.quantize)

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
  m, e = dfp_quantize_p.bind(x.reshape(1, *x.shape), bits=config.bits, headroom=config.headroom)
  return DFPTensor(m.reshape(x.shape), e.reshape(()), None)
