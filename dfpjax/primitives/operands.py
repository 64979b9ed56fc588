"""Shared by the DFP ops: argument checks, keys, gradient folding; and the classic
custom_vjp of the site wrapper of report and diagnose."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dfpjax._jax_compat import auto_insert_reshard
from dfpjax.numerics import floatbits
from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor, quantize_with


def check_float_operand(x, name: str, op: str) -> None:
  if np.dtype(x.dtype) not in floatbits.FORMATS:
    raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16 to be quantized to DFP, "
                    f"got {x.dtype}")


def float_operands(op: str, lhs, rhs, config, key):
  """``lhs, rhs`` as arrays and ``config`` (default ``DFPConfig()``), checked for a DFP op
  that quantizes float operands."""
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if isinstance(x, DFPTensor):
      raise TypeError(f"{op}: {name} is a DFPTensor; {op} takes float arrays and quantizes them "
                      "itself (dfp_dot_general also multiplies two DFPTensors as they are)")
  config = DFPConfig() if config is None else config
  if not isinstance(config, DFPConfig):
    raise TypeError(f"config must be a dfpjax.DFPConfig, got {type(config).__name__}")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  check_float_operand(lhs, "lhs", op)
  check_float_operand(rhs, "rhs", op)
  if config.needs_key and key is None:
    raise ValueError(f"{op}: stochastic rounding needs key=jax.random.key(...)")
  return lhs, rhs, config


def check_dfp_operand(t: DFPTensor, name: str, op: str) -> None:
  """Checks a DFPTensor operand: int16 mantissas, and int32 exponents shaped as its
  ``channel_axis`` says (one per tensor, or one per index along that axis)."""
  mantissa_dtype = getattr(t.mantissa, "dtype", None)
  if mantissa_dtype is None:
    raise TypeError(f"{op}: {name} is a DFPTensor whose mantissa is a {type(t.mantissa).__name__}, "
                    "not an array; DFP mantissas are int16 arrays")
  if np.dtype(mantissa_dtype) != np.int16:
    raise TypeError(f"{op}: {name} is a DFPTensor with {mantissa_dtype} mantissas; DFP "
                    "mantissas are int16")
  exponent_dtype = jnp.result_type(t.exponent)  # a Python int's is int32
  if exponent_dtype != np.int32:
    raise TypeError(f"{op}: {name} is a DFPTensor with a {exponent_dtype} exponent; DFP "
                    "exponents are int32")
  shape = np.shape(t.exponent)
  if t.channel_axis is None:
    if math.prod(shape) != 1:
      raise ValueError(f"{op}: {name} is a DFPTensor with an exponent of shape {shape} and no "
                       "channel_axis; a per-channel exponent needs DFPTensor(..., channel_axis=...)")
    return
  if not 0 <= t.channel_axis < len(t.shape):
    raise ValueError(f"{op}: {name} is a DFPTensor with channel_axis {t.channel_axis}, out of "
                     f"range for its rank-{len(t.shape)} mantissa")
  channels = t.shape[t.channel_axis]
  if shape not in ((), (1,), (channels,)):
    raise ValueError(f"{op}: {name} is a DFPTensor with an exponent of shape {shape}; along its "
                     f"channel_axis {t.channel_axis} (mantissa shape {t.shape}) it needs one "
                     f"exponent per channel, shape ({channels},)")


def output_dtype(preferred_element_type, op: str) -> np.dtype:
  if preferred_element_type is None:
    return np.dtype(jnp.float32)
  dtype = np.dtype(preferred_element_type)
  if dtype not in floatbits.FORMATS:
    raise TypeError(f"{op}: preferred_element_type must be float32, bfloat16 or float16 "
                    f"(DFP outputs are floating point), got {dtype}")
  return dtype


def matching_manual_axes(lhs, rhs):
  """``lhs, rhs`` made to vary over the same manual axes inside a ``shard_map`` with
  ``check_vma`` (``pvary`` on the invariant one), as ``lax.dot_general`` does: an
  invariant operand's gradient is then summed over those axes by ``pvary``'s transpose."""
  return auto_insert_reshard(lhs, rhs)


def fold_key(key, n: int):
  """The key for the n-th quantization of an op (docs/numerics.md), or None."""
  return None if key is None else jax.random.fold_in(key, n)


def partner_folded(g, partner: DFPTensor, channel_axis_in_g, cfg: QuantConfig, key):
  """Quantizes cotangent ``g`` for a backward op that contracts ``partner``'s exponent.

  The partner's exponent (per tensor, or per channel along ``channel_axis_in_g`` of g) is
  folded into g exactly before quantization, so that the backward op is an integer product
  of g's mantissas with the partner's unchanged mantissas. Returns ``(g_q, partner_m)``
  where ``partner_m`` is the partner's mantissas with exponent 0.
  """
  if partner.channel_axis is None:
    offset = partner.exponent
  else:
    shape = [1] * g.ndim
    shape[channel_axis_in_g] = g.shape[channel_axis_in_g]
    offset = partner.exponent.reshape(shape)
  nonfinite = jnp.any(partner.exponent == NONFINITE_EXPONENT)
  offset = jnp.where(offset == NONFINITE_EXPONENT, 0, offset)
  g_q = quantize_with(g, dataclasses.replace(cfg, granularity="tensor"), key, scale_exponent=offset)
  g_q = DFPTensor(g_q.mantissa, jnp.where(nonfinite, NONFINITE_EXPONENT, g_q.exponent))
  return g_q, DFPTensor(partner.mantissa, jnp.zeros((), jnp.int32))
