"""DFP ``conv_general_dilated``: spec section 3 forward, section 4 gradients.

Same two layers as ``dot_general.py``: the primitive ``dfp_conv_general_dilated_p`` is the
exact convolution of quantized operands (INT16 mantissas, per-tensor exponents), and
``dfp_conv_general_dilated`` quantizes, calls it and carries the DFP gradient rule. The
backward-data and backward-weights passes are again exact convolutions of the quantized
cotangent with the forward's quantized operands, with the parameters JAX's own transpose
rules derive (``_transpose_lhs`` / ``_transpose_rhs`` below follow them line by line).

Status: the primitive lowers to the exact pure-XLA reference on every platform, CPU
included; the implicit-im2col C kernel is not written yet (issue 3).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lax import convolution as lax_conv  # JAX's transpose helpers; JAX is pinned
from jax.extend import core
from jax.interpreters import batching, mlir

from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import quantize_with
from dfpjax.primitives import reference
from dfpjax.primitives.operands import check_float_operand, fold_key, output_dtype

dfp_conv_general_dilated_p = core.Primitive("dfp_conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class ConvParams:
  """``lax.conv_general_dilated``'s parameters in canonical form (explicit padding, dnums)."""
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dimension_numbers: lax.ConvDimensionNumbers
  feature_group_count: int
  batch_group_count: int

  def as_kwargs(self):
    return dataclasses.asdict(self) | {"dimension_numbers": self.dimension_numbers}


def _float_conv_shape(lhs_shape, rhs_shape, params: ConvParams):
  """The output shape by JAX's own shape rule (which also validates every parameter)."""
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **params.as_kwargs()),
                       jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                       jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  return out.shape


def _abstract_eval(a, ea, b, eb, *, params: ConvParams, out_dtype):
  if a.dtype != jnp.int16 or b.dtype != jnp.int16 or ea.dtype != jnp.int32 or eb.dtype != jnp.int32:
    raise TypeError("dfp_conv_general_dilated_p takes int16 mantissas and int32 exponents")
  if ea.shape != () or eb.shape != ():
    raise ValueError("dfp_conv_general_dilated_p takes per-tensor (scalar) exponents")
  return jax.core.ShapedArray(_float_conv_shape(a.shape, b.shape, params), out_dtype)


def _impl(*args, **params):
  return _jitted_bind(**params)(*args)


@functools.cache
def _jitted_bind(**params):
  return jax.jit(functools.partial(dfp_conv_general_dilated_p.bind, **params))


def _batch_rule(args, dims, *, params, out_dtype):
  # Each vmapped instance has its own exponents; map the exact convolution over them.
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  args = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims)]
  out = lax.map(lambda xs: dfp_conv_general_dilated_p.bind(*xs, params=params, out_dtype=out_dtype),
                args)
  return out, 0


dfp_conv_general_dilated_p.def_impl(_impl)
dfp_conv_general_dilated_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[dfp_conv_general_dilated_p] = _batch_rule
mlir.register_lowering(
    dfp_conv_general_dilated_p,
    mlir.lower_fun(lambda a, ea, b, eb, *, params, out_dtype: reference.conv(
        a, ea, b, eb, out_dtype=out_dtype, **params.as_kwargs()), multiple_results=False))


def exact_conv(ma, ea, mb, eb, params: ConvParams, out_dtype):
  """``fl(conv(ma, mb)) * 2**(ea + eb)`` (spec section 3) for quantized operands."""
  if reference.in_reference_mode():
    return reference.conv(ma, ea, mb, eb, out_dtype=np.dtype(out_dtype), **params.as_kwargs())
  return dfp_conv_general_dilated_p.bind(ma, ea, mb, eb, params=params, out_dtype=np.dtype(out_dtype))


def _transpose_lhs(mg, mb, lhs_shape, p: ConvParams) -> tuple:
  """Operands and parameters of backward-data, as ``_conv_general_dilated_transpose_lhs``."""
  dn = p.dimension_numbers
  lhs_sdims, rhs_sdims, out_sdims = map(lax_conv._conv_sdims, dn)
  lhs_spec, rhs_spec, out_spec = dn
  feature_group_count = p.feature_group_count
  rhs_shape = mb.shape
  if p.feature_group_count > 1:
    mb = lax_conv._reshape_axis_out_of(rhs_spec[0], p.feature_group_count, mb)
    mb = lax_conv._reshape_axis_into(rhs_spec[0], rhs_spec[1], mb)
  elif p.batch_group_count > 1:
    mb = lax_conv._reshape_axis_out_of(rhs_spec[0], p.batch_group_count, mb)
    mb = lax_conv._reshape_axis_into(rhs_spec[0], rhs_spec[1], mb)
    feature_group_count = p.batch_group_count
  padding = lax_conv._conv_general_vjp_lhs_padding(
      np.take(lhs_shape, lhs_sdims), np.take(rhs_shape, rhs_sdims), p.window_strides,
      np.take(mg.shape, out_sdims), p.padding, p.lhs_dilation, p.rhs_dilation)
  params = ConvParams(p.lhs_dilation, tuple((int(lo), int(hi)) for lo, hi in padding), p.window_strides, p.rhs_dilation,
                      lax.ConvDimensionNumbers(out_spec, lax_conv._conv_spec_transpose(rhs_spec), lhs_spec),
                      feature_group_count, 1)
  return mg, lax.rev(mb, rhs_sdims), params


def _finish_transpose_lhs(out, p: ConvParams):
  if p.batch_group_count > 1:
    lhs_spec = p.dimension_numbers.lhs_spec
    out = lax_conv._reshape_axis_out_of(lhs_spec[1], p.batch_group_count, out)
    out = lax_conv._reshape_axis_into(lhs_spec[1], lhs_spec[0], out)
  return out


def _transpose_rhs(mg, ma, rhs_shape, p: ConvParams) -> tuple:
  """Operands and parameters of backward-weights, as ``_conv_general_dilated_transpose_rhs``."""
  dn = p.dimension_numbers
  lhs_sdims, rhs_sdims, out_sdims = map(lax_conv._conv_sdims, dn)
  lhs_trans, rhs_trans, out_trans = map(lax_conv._conv_spec_transpose, dn)
  feature_group_count, batch_group_count = p.feature_group_count, p.batch_group_count
  if batch_group_count > 1:
    feature_group_count, batch_group_count = batch_group_count, 1
  elif feature_group_count > 1:
    feature_group_count, batch_group_count = 1, feature_group_count
  padding = lax_conv._conv_general_vjp_rhs_padding(
      np.take(ma.shape, lhs_sdims), np.take(rhs_shape, rhs_sdims), p.window_strides,
      np.take(mg.shape, out_sdims), p.padding, p.lhs_dilation, p.rhs_dilation)
  params = ConvParams(p.rhs_dilation, tuple((int(lo), int(hi)) for lo, hi in padding), p.lhs_dilation, p.window_strides,
                      lax.ConvDimensionNumbers(lhs_trans, out_trans, rhs_trans),
                      feature_group_count, batch_group_count)
  return ma, mg, params


@dataclasses.dataclass(frozen=True)
class _Spec:
  params: ConvParams
  forward: QuantConfig
  gradient: QuantConfig
  out_dtype: np.dtype
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  lhs_dtype: np.dtype
  rhs_dtype: np.dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dfp_conv(lhs, rhs, key, spec: _Spec):
  return _dfp_conv_fwd(lhs, rhs, key, spec)[0]


def _dfp_conv_fwd(lhs, rhs, key, spec: _Spec):
  qa = quantize_with(lhs, spec.forward, fold_key(key, 0))
  qb = quantize_with(rhs, spec.forward, fold_key(key, 1))
  y = exact_conv(qa.mantissa, qa.exponent, qb.mantissa, qb.exponent, spec.params, spec.out_dtype)
  return y, (qa, qb, key)  # only INT16 mantissas and exponents are kept


def _dfp_conv_bwd(spec: _Spec, residuals, g):
  qa, qb, key = residuals
  qg = quantize_with(g, spec.gradient, fold_key(key, 2))
  x, w, params = _transpose_lhs(qg.mantissa, qb.mantissa, spec.lhs_shape, spec.params)
  da = _finish_transpose_lhs(exact_conv(x, qg.exponent, w, qb.exponent, params, spec.lhs_dtype),
                             spec.params)
  x, w, params = _transpose_rhs(qg.mantissa, qa.mantissa, spec.rhs_shape, spec.params)
  db = exact_conv(x, qa.exponent, w, qg.exponent, params, spec.rhs_dtype)
  return da, db, None


_dfp_conv.defvjp(_dfp_conv_fwd, _dfp_conv_bwd)


def _canonical_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count) -> ConvParams:
  nspatial = lhs.ndim - 2
  if nspatial < 1:
    raise ValueError(f"dfp_conv_general_dilated needs operands of rank 3 or more, got {lhs.shape}")
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_dilation = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * nspatial
  rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nspatial
  if isinstance(padding, str):
    if any(d != 1 for d in lhs_dilation):
      raise ValueError("dfp_conv_general_dilated: string padding is not defined with lhs_dilation; "
                       "give explicit padding (as lax.conv_general_dilated requires)")
    lhs_perm, rhs_perm, _ = dnums
    effective_rhs = [(k - 1) * r + 1 for k, r in zip(np.take(rhs.shape, rhs_perm)[2:], rhs_dilation)]
    padding = lax.padtype_to_pads(np.take(lhs.shape, lhs_perm)[2:], effective_rhs, window_strides,
                                  padding)
  params = ConvParams(tuple(int(s) for s in window_strides),
                      tuple((int(lo), int(hi)) for lo, hi in padding),
                      tuple(int(d) for d in lhs_dilation), tuple(int(d) for d in rhs_dilation),
                      dnums, int(feature_group_count), int(batch_group_count))
  _float_conv_shape(lhs.shape, rhs.shape, params)  # JAX's checks, with JAX's messages
  return params


def dfp_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None, *,
                             config: DFPConfig | None = None, key=None):
  """``jax.lax.conv_general_dilated`` computed in DFP (spec sections 3 and 4).

  Any number of spatial dimensions, dimension numbers, padding, strides, lhs/rhs dilation,
  feature groups (depthwise included) and batch groups. Both operands are quantized per
  tensor with ``config.forward``, convolved exactly over the integers and scaled once into
  the output type; backward-data and backward-weights are exact convolutions of the
  cotangent (quantized with ``config.gradient``) with the forward's quantized operands.
  ``precision`` is accepted for compatibility and ignored.
  """
  del precision
  config = DFPConfig() if config is None else config
  if not isinstance(config, DFPConfig):
    raise TypeError(f"config must be a dfpjax.DFPConfig, got {type(config).__name__}")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  check_float_operand(lhs, "lhs", "dfp_conv_general_dilated")
  check_float_operand(rhs, "rhs", "dfp_conv_general_dilated")
  if config.forward.granularity != "tensor":
    raise NotImplementedError("dfp_conv_general_dilated supports granularity='tensor' only so far")
  if config.needs_key and key is None:
    raise ValueError("dfp_conv_general_dilated: stochastic rounding needs key=jax.random.key(...)")
  params = _canonical_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                             dimension_numbers, feature_group_count, batch_group_count)
  spec = _Spec(params, config.forward, config.gradient,
               output_dtype(preferred_element_type, "dfp_conv_general_dilated"), lhs.shape,
               rhs.shape, np.dtype(lhs.dtype), np.dtype(rhs.dtype))
  return _dfp_conv(lhs, rhs, key if config.needs_key else None, spec)
