"""Backward convolutions as forward ones: JAX's transpose rules for
``conv_general_dilated``, and the sub-pixel phases of a convolution over an lhs-dilated
input (a strided convolution's backward-data) that skip the inserted zeros. Backward-data
hands the kernel the forward's weights as they lie, with a geometry that reads them flipped
and transposed (``backward_data_conv``); ``transpose_lhs`` makes that operand with XLA.

The functions that run a convolution take it as ``conv``, a callable with
``reference.conv``'s signature: the primitive's product (``registry.product``), or its
pure-XLA twin, which computes backward-data the same way.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax._jax_compat import lax_conv
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor
from dfpjax.primitives.conv_params import ConvParams, Geometry, canonical, channels_last, window_first


def _transpose_lhs_params(g_shape, rhs_shape, lhs_shape, p: ConvParams) -> ConvParams:
  """The parameters of backward-data, as ``_conv_general_dilated_transpose_lhs`` derives them."""
  dn = p.dimension_numbers
  lhs_sdims, rhs_sdims, out_sdims = map(lax_conv._conv_sdims, dn)
  lhs_spec, rhs_spec, out_spec = dn
  padding = lax_conv._conv_general_vjp_lhs_padding(
      np.take(lhs_shape, lhs_sdims), np.take(rhs_shape, rhs_sdims), p.window_strides,
      np.take(g_shape, out_sdims), p.padding, p.lhs_dilation, p.rhs_dilation)
  return ConvParams(p.lhs_dilation, tuple((int(lo), int(hi)) for lo, hi in padding), p.window_strides,
                    p.rhs_dilation,
                    lax.ConvDimensionNumbers(out_spec, lax_conv._conv_spec_transpose(rhs_spec), lhs_spec),
                    max(p.feature_group_count, p.batch_group_count), 1)


def transpose_lhs(mg, mb, lhs_shape, p: ConvParams) -> tuple:
  """Operands and parameters of backward-data, as ``_conv_general_dilated_transpose_lhs``:
  the weights flipped and regrouped by XLA (``backward_data_conv`` leaves that to the kernel)."""
  rhs_spec = p.dimension_numbers.rhs_spec
  params = _transpose_lhs_params(mg.shape, mb.shape, lhs_shape, p)
  groups = max(p.feature_group_count, p.batch_group_count)
  if groups > 1:
    mb = lax_conv._reshape_axis_out_of(rhs_spec[0], groups, mb)
    mb = lax_conv._reshape_axis_into(rhs_spec[0], rhs_spec[1], mb)
  return mg, lax.rev(mb, lax_conv._conv_sdims(rhs_spec)), params


def backward_data_conv(conv, qg: DFPTensor, qw: DFPTensor, lhs_shape, p: ConvParams, out_dtype):
  """Backward-data of the convolution ``p`` (without batch groups): ``transpose_lhs``'s forward
  convolution of dy, run by ``conv`` with the forward's weights as they lie. Its geometry says
  that they are flipped (taps ``k - 1 - t``) and transposed (``Geometry.transposed_weights``),
  and the kernel's packing reads them so: no reversed, regrouped copy of them is made."""
  params = _transpose_lhs_params(qg.mantissa.shape, qw.mantissa.shape, lhs_shape, p)
  x = jnp.transpose(qg.mantissa, channels_last(params.dimension_numbers.lhs_spec))
  w = jnp.transpose(qw.mantissa, window_first(p.dimension_numbers.rhs_spec))  # as the forward's
  window = tuple(w.shape[:-2])
  geometry = Geometry(window, params.window_strides, params.padding, params.lhs_dilation,
                      params.rhs_dilation, p.feature_group_count,
                      weight_taps=tuple((k - 1, -1) for k in window), transposed_weights=True)
  return _run(conv, x, qg.exponent, w, qw.exponent, geometry, params, out_dtype)


def finish_transpose_lhs(out, p: ConvParams):
  if p.batch_group_count > 1:
    lhs_spec = p.dimension_numbers.lhs_spec
    out = lax_conv._reshape_axis_out_of(lhs_spec[1], p.batch_group_count, out)
    out = lax_conv._reshape_axis_into(lhs_spec[1], lhs_spec[0], out)
  return out


def transpose_rhs(mg, ma, rhs_shape, p: ConvParams) -> tuple:
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


def phases(geometry: Geometry, in_spatial):
  """Sub-pixel form of a convolution over an lhs-dilated input (a strided convolution's
  backward-data), or None where it does not apply.

  Along a dimension dilated by d (stride and rhs dilation 1), output q = d*j + r reads only
  the taps t = t0 + d*m with t0 = (pad_lo - r) mod d, from the undilated input at
  j + m + (r + t0 - pad_lo) / d: a stride-1 convolution with the sub-kernel w[t0::d]. So the
  d-fold waste of multiplying inserted zeros disappears. Returns, per dimension, the list of
  phases (tap slice, padding, output length); undilated dimensions have one phase.
  """
  if all(d == 1 for d in geometry.lhs_dilation):
    return None
  per_dim = []
  for size, k, s, (lo, hi), d, rd, q in zip(in_spatial, geometry.window, geometry.strides,
                                            geometry.padding, geometry.lhs_dilation,
                                            geometry.rhs_dilation, geometry.out_spatial(in_spatial)):
    if d == 1:
      per_dim.append([(slice(None), (lo, hi), q)])
      continue
    if s != 1 or rd != 1:
      return None
    dim_phases = []
    for r in range(d):
      t0 = (lo - r) % d
      taps, out = len(range(t0, k, d)), max(0, -(-(q - r) // d))
      pad_lo = -((r + t0 - lo) // d)
      dim_phases.append((slice(t0, None, d), (pad_lo, out - 1 + taps - size - pad_lo), out))
    per_dim.append(dim_phases)
  return per_dim


def _forward_by_phases(conv, x, ex, w, eb, geometry: Geometry, per_dim, out_dtype):
  """The forward convolution as one stride-1 convolution per phase, interleaved. Each phase
  reads its taps of ``w`` in place (``Geometry.weight_taps``): no sliced copies."""
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  ys = {}
  for phase in itertools.product(*(range(len(p)) for p in per_dim)):
    chosen = [per_dim[i][r] for i, r in enumerate(phase)]
    picks = [range(k)[c[0]] for k, c in zip(geometry.window, chosen)]
    taps = tuple((f + s * r.start, s * r.step) for (f, s), r in zip(geometry.taps(), picks))
    sub = dataclasses.replace(geometry, window=tuple(map(len, picks)),
                              padding=tuple(c[1] for c in chosen), lhs_dilation=(1,) * len(per_dim),
                              weight_taps=taps)
    if 0 in sub.window:  # no tap lands on this phase: an empty sum, or NaN (spec section 2)
      shape = (x.shape[0], *(c[2] for c in chosen), geometry.weight_channels(w.shape)[1])
      nonfinite = (ex[0] == NONFINITE_EXPONENT) | (eb[0] == NONFINITE_EXPONENT)
      ys[phase] = jnp.where(nonfinite, jnp.nan, jnp.zeros(shape, out_dtype)).astype(out_dtype)
      continue
    ys[phase] = conv(x, ex, w, eb, geometry=sub, mode="forward", out_dtype=out_dtype)
  # Interleave, last dimension first: stack the phases after their axis, merge, trim.
  for i in reversed(range(len(per_dim))):
    d = len(per_dim[i])
    longest = max(p[2] for p in per_dim[i])
    merged = {}
    for phase in {k[:i] + k[i + 1:] for k in ys}:
      parts = []
      for r in range(d):
        y = ys[phase[:i] + (r,) + phase[i:]]
        widths = [(0, 0)] * y.ndim
        widths[1 + i] = (0, longest - y.shape[1 + i])
        parts.append(jnp.pad(y, widths))
      y = jnp.stack(parts, axis=2 + i)
      y = y.reshape(*y.shape[:1 + i], longest * d, *y.shape[3 + i:])
      merged[phase[:i] + (0,) + phase[i:]] = lax.slice_in_dim(y, 0, out_spatial[i], axis=1 + i)
    ys = merged
  return ys[(0,) * len(per_dim)]


def forward_conv(conv, qa: DFPTensor, qb: DFPTensor, params: ConvParams, out_dtype):
  """``fl(conv(ma, mb)) * 2**(ea + eb)`` (spec section 3) for per-tensor quantized operands,
  run by ``conv`` in the kernel's layout, by phases where the input is lhs-dilated."""
  x, w, geometry = canonical(qa.mantissa, qb.mantissa, params)
  return _run(conv, x, qa.exponent, w, qb.exponent, geometry, params, out_dtype)


def _run(conv, x, ex, w, eb, geometry: Geometry, params: ConvParams, out_dtype):
  """The forward convolution in the kernel's layout, by phases where the input is
  lhs-dilated, transposed to ``params``' output layout."""
  ex, eb = jnp.reshape(ex, (1,)), jnp.reshape(eb, (1,))
  per_dim = phases(geometry, x.shape[1:-1])
  if per_dim is None:
    y = conv(x, ex, w, eb, geometry=geometry, mode="forward", out_dtype=np.dtype(out_dtype))
  else:
    y = _forward_by_phases(conv, x, ex, w, eb, geometry, per_dim, np.dtype(out_dtype))
  out_spec = params.dimension_numbers.out_spec
  return jnp.transpose(y, np.argsort(channels_last(out_spec)))
