"""DFP ``conv_general_dilated``: spec section 3 forward, section 4 gradients.

``exact_conv`` is the exact convolution of quantized operands (INT16 mantissas, per-tensor
exponents) and ``dfp_conv_general_dilated`` quantizes, calls it and carries the DFP gradient
rule. The backward-data and backward-weights passes are again exact convolutions of the
quantized cotangent with the forward's quantized operands, with the parameters JAX's own
transpose rules derive (``_transpose_lhs`` / ``_transpose_rhs`` follow them line by line).

Status (issue 3): ``exact_conv`` materializes the input patches with XLA and multiplies
them with the exact DFP GEMM (the C kernel on CPU). The implicit-im2col kernel that packs
patches on the fly, and a primitive of its own, are still to come.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lax import convolution as lax_conv  # JAX's transpose helpers; JAX is pinned

from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import DFPTensor, quantize_with
from dfpjax.primitives.dot_general import DotDims, exact_dot
from dfpjax.primitives.operands import check_float_operand, fold_key, output_dtype


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
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _float_conv_shape(lhs_shape, rhs_shape, params: ConvParams):
  """The output shape by JAX's own shape rule (which also validates every parameter)."""
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **params.as_kwargs()),
                       jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                       jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  return out.shape


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
    limit = [n, *(f + (k - 1) * st + 1 for f, k, st in zip(first, count, step)), c]
    return lax.slice(x, start, limit, [1, *step, 1])

  if math.prod(window_shape) <= math.prod(out_spatial):
    taps = [window_slice([o * d for o, d in zip(offset, p.rhs_dilation)], out_spatial, p.window_strides)
            for offset in itertools.product(*map(range, window_shape))]
    return jnp.stack(taps, axis=-2)
  positions = [window_slice([o * st for o, st in zip(pos, p.window_strides)], window_shape,
                            p.rhs_dilation).reshape(n, -1, c)
               for pos in itertools.product(*map(range, out_spatial))]
  return jnp.stack(positions, axis=1).reshape(n, *out_spatial, -1, c)


def exact_conv(qa: DFPTensor, qb: DFPTensor, params: ConvParams, out_dtype):
  """``fl(conv(ma, mb)) * 2**(ea + eb)`` (spec section 3) for per-tensor quantized operands.

  Computed as the exact DFP matrix product of the input patches with the weights (grouped
  convolutions as a batch of products), so every platform -- and the C kernel on CPU --
  runs the same exact integer arithmetic as ``dot_general``.
  """
  lhs_spec, rhs_spec, out_spec = params.dimension_numbers
  nd = len(lhs_spec) - 2
  x = jnp.transpose(qa.mantissa, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))  # N, spatial, C
  w = jnp.transpose(qb.mantissa, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # window, I, O
  out_shape = _float_conv_shape(qa.shape, qb.shape, params)
  out_spatial = [out_shape[d] for d in out_spec[2:]]
  window = w.shape[:nd]
  taps, in_per_group, features = math.prod(window), w.shape[nd], w.shape[nd + 1]
  patches = _patches(x, window, out_spatial, params)  # N, out_spatial, taps, C
  n, positions = x.shape[0], math.prod(out_spatial)
  fg, bg = params.feature_group_count, params.batch_group_count
  groups = fg * bg  # at most one of them exceeds 1
  if bg > 1:  # the lhs batch and the output features split into groups
    patches = patches.reshape(bg, n // bg * positions, taps * in_per_group)
  else:  # the input channels and the output features split into groups
    patches = patches.reshape(n * positions, taps, fg, in_per_group)
    patches = jnp.transpose(patches, (2, 0, 1, 3)).reshape(fg, n * positions, taps * in_per_group)
  w = jnp.transpose(w.reshape(taps * in_per_group, groups, features // groups), (1, 0, 2))
  batched = DotDims((2,), (1,), (0,), (0,), 3, 3)
  y = exact_dot(DFPTensor(patches, qa.exponent), DFPTensor(w, qb.exponent), batched, out_dtype)
  n_out = n // bg
  y = jnp.transpose(y.reshape(groups, n_out, positions, features // groups), (1, 2, 0, 3))
  y = y.reshape(n_out, *out_spatial, features)  # N, out_spatial, O
  return jnp.transpose(y, np.argsort((out_spec[0], *out_spec[2:], out_spec[1])))


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
  y = exact_conv(qa, qb, spec.params, spec.out_dtype)
  return y, (qa, qb, key)  # only INT16 mantissas and exponents are kept


def _dfp_conv_bwd(spec: _Spec, residuals, g):
  qa, qb, key = residuals
  qg = quantize_with(g, spec.gradient, fold_key(key, 2))
  x, w, params = _transpose_lhs(qg.mantissa, qb.mantissa, spec.lhs_shape, spec.params)
  da = exact_conv(DFPTensor(x, qg.exponent), DFPTensor(w, qb.exponent), params, spec.lhs_dtype)
  da = _finish_transpose_lhs(da, spec.params)
  x, w, params = _transpose_rhs(qg.mantissa, qa.mantissa, spec.rhs_shape, spec.params)
  db = exact_conv(DFPTensor(x, qa.exponent), DFPTensor(w, qg.exponent), params, spec.rhs_dtype)
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
