"""DFP ``conv_general_dilated``: spec section 3 forward, section 4 gradients.

Two layers, as for ``dot_general``:

* ``dfp_conv_p`` -- the exact convolution of quantized operands in the kernel's
  channels-last form (``x [N, *spatial, G*cin]``, ``w [*window, cin, G*cout]``), in three
  modes: ``forward``, ``backward_weights`` (the weight gradient from ``x`` and ``dy``) and
  ``backward_data`` (the input gradient from ``dy`` and ``w``, run as col2im: the route for
  inputs with few channels, such as an RGB stem).
  Abstract evaluation, a batching rule, a CPU lowering to the C kernel's implicit-im2col
  convolution through XLA FFI, and a pure-XLA lowering (input patches times the exact
  integer product) on every other platform.
* ``dfp_conv_general_dilated`` -- the user-facing op with ``lax.conv_general_dilated``'s
  signature: quantizes, transposes the mantissas into the canonical layout (a no-op for
  Flax's NHWC/HWIO), calls the primitive and carries the DFP gradient rule. Backward-data is
  a forward convolution with the parameters JAX's own transpose rule derives
  (``_transpose_lhs`` follows it line by line), split into stride-1 phases where the input
  is dilated, or col2im for inputs with few channels; backward-weights is the primitive's
  second mode, reading the forward's quantized input and the quantized cotangent as they are.
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
from jax.extend import core
from jax._src.lax import convolution as lax_conv  # JAX's transpose helpers; JAX is pinned
from jax.interpreters import batching, mlir

from dfpjax import cpu_ffi
from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, DFPTensor
from dfpjax.primitives import reference
from dfpjax.primitives.operands import (check_float_operand, classic_custom_vjp, fold_key,
                                        matching_manual_axes, output_aval, output_dtype)
from dfpjax.primitives.quantize import quantize_operand


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


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A channels-last convolution as the kernel sees it (per spatial dimension)."""
  window: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  groups: int
  input_spatial: tuple[int, ...] | None = None  # backward_data: the shape it produces

  def out_spatial(self, in_spatial):
    return tuple(max(0, ((i - 1) * ld + 1 + lo + hi - ((k - 1) * rd + 1)) // s + 1)
                 for i, k, s, (lo, hi), ld, rd in zip(in_spatial, self.window, self.strides,
                                                      self.padding, self.lhs_dilation,
                                                      self.rhs_dilation))

  def params(self) -> ConvParams:
    """The same convolution as ``lax.conv_general_dilated`` parameters (NHWC, HWIO)."""
    nd = len(self.window)
    spatial = tuple(range(1, nd + 1))
    dnums = lax.ConvDimensionNumbers((0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd)),
                                     (0, nd + 1) + spatial)
    return ConvParams(self.strides, self.padding, self.lhs_dilation, self.rhs_dilation, dnums,
                      self.groups, 1)

  def kernel_attributes(self, batch, in_spatial, cin, cout, mode) -> dict:
    """The kernel's named attributes for this convolution (``cpu_ffi.conv_attributes``)."""
    return cpu_ffi.conv_attributes(
        batch=batch, in_spatial=in_spatial, out_spatial=self.out_spatial(in_spatial),
        window=self.window, strides=self.strides, padding_lo=[lo for lo, _ in self.padding],
        lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation, groups=self.groups,
        in_channels=cin, out_channels=cout, mode=mode)


dfp_conv_p = core.Primitive("dfp_conv")
MODES = ("forward", "backward_weights", "backward_data")


def _abstract_eval(x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  if x.dtype != jnp.int16 or b.dtype != jnp.int16 or ex.dtype != jnp.int32 or eb.dtype != jnp.int32:
    raise TypeError("dfp_conv_p takes int16 mantissas and int32 exponents, got "
                    f"{x.dtype}, {ex.dtype}, {b.dtype}, {eb.dtype}")
  nd, g = len(geometry.window), geometry.groups
  if mode not in MODES or x.ndim != nd + 2 or b.ndim != nd + 2 or x.shape[-1] % g:
    raise ValueError(f"dfp_conv_p: operands {x.shape}, {b.shape} do not fit {mode} {geometry}")
  if ex.shape not in ((1,), (x.shape[0],)) or eb.shape != (1,) or (mode != "forward" and ex.shape != (1,)):
    raise ValueError(f"dfp_conv_p: exponent shapes {ex.shape}, {eb.shape}")
  batch = x.shape[0]
  if mode == "backward_data":  # x is dy, b the weights
    cin = b.shape[-2]
    if (x.shape[1:-1] != geometry.out_spatial(geometry.input_spatial) or x.shape[-1] != b.shape[-1]
        or b.shape[:-2] != geometry.window or b.shape[-1] % g):
      raise ValueError(f"dfp_conv_p: output gradient {x.shape} and weights {b.shape} do not fit "
                       f"{geometry}")
    return output_aval((batch, *geometry.input_spatial, g * cin), out_dtype, x, ex, b, eb)
  cin = x.shape[-1] // g
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  if mode == "forward":
    if b.shape[:-1] != (*geometry.window, cin) or b.shape[-1] % g:
      raise ValueError(f"dfp_conv_p: weights {b.shape} do not fit input {x.shape} and {geometry}")
    return output_aval((batch, *out_spatial, b.shape[-1]), out_dtype, x, ex, b, eb)
  if b.shape[:-1] != (batch, *out_spatial) or b.shape[-1] % g:
    raise ValueError(f"dfp_conv_p: output gradient {b.shape} does not fit input {x.shape} and "
                     f"{geometry}")
  return output_aval((*geometry.window, cin, b.shape[-1]), out_dtype, x, ex, b, eb)


def _impl(*args, **params):
  return _jitted_bind(**params)(*args)


@functools.cache
def _jitted_bind(**params):
  return jax.jit(functools.partial(dfp_conv_p.bind, **params))


def _cpu_lowering(ctx, x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  del out_dtype  # carried by the result's type
  cpu_ffi.register()
  x_aval, b_aval = ctx.avals_in[0], ctx.avals_in[2]
  cout = b_aval.shape[-1] // geometry.groups
  if mode == "backward_data":
    in_spatial, cin = geometry.input_spatial, b_aval.shape[-2]
  else:
    in_spatial, cin = x_aval.shape[1:-1], x_aval.shape[-1] // geometry.groups
  attributes = geometry.kernel_attributes(x_aval.shape[0], in_spatial, cin, cout, mode)
  return jax.ffi.ffi_lowering(cpu_ffi.CONV_TARGET)(ctx, x, ex, b, eb, **attributes)


def _reference(x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  """The exact pure-XLA twin of the kernel: input patches times ``reference.dot``."""
  if mode == "backward_data":  # as JAX's transpose rule: a forward convolution of dy
    lhs_shape = (x.shape[0], *geometry.input_spatial, geometry.groups * b.shape[-2])
    dy, w, params = _transpose_lhs(x, b, lhs_shape, geometry.params())
    with reference.reference_mode():
      return exact_conv(DFPTensor(dy, ex.reshape(())), DFPTensor(w, eb.reshape(())), params,
                        out_dtype)
  nd, g = len(geometry.window), geometry.groups
  batch, cin = x.shape[0], x.shape[-1] // g
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  taps, positions = math.prod(geometry.window), math.prod(out_spatial)
  patches = _patches(x, geometry.window, out_spatial, geometry.params())  # N, out, taps, G*cin
  patches = patches.reshape(batch * positions, taps, g, cin)
  patches = jnp.transpose(patches, (2, 0, 1, 3)).reshape(g, batch * positions, taps * cin)
  cout = b.shape[-1] // g
  if mode == "forward":
    w = jnp.transpose(b.reshape(taps * cin, g, cout), (1, 0, 2))
    rows = ex if ex.shape[0] == 1 else jnp.repeat(ex, positions)
    y = reference.dot(patches, rows.reshape(1, -1), w, eb.reshape(1, 1), lhs_kmajor=False,
                      rhs_nmajor=False, out_dtype=out_dtype)  # G, N*positions, cout
    return jnp.transpose(y, (1, 0, 2)).reshape(batch, *out_spatial, g * cout)
  dy = jnp.transpose(b.reshape(batch * positions, g, cout), (1, 0, 2))
  dw = reference.dot(patches, ex.reshape(1, 1), dy, eb.reshape(1, 1), lhs_kmajor=True,
                     rhs_nmajor=False, out_dtype=out_dtype)  # G, taps*cin, cout
  return jnp.transpose(dw, (1, 0, 2)).reshape(*geometry.window, cin, g * cout)


def _batch_rule(args, dims, *, geometry, mode, out_dtype):
  x, ex, b, eb = args
  dx, dex, db, deb = dims
  params = dict(geometry=geometry, mode=mode, out_dtype=out_dtype)
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  if mode == "forward" and db is None and deb is None:
    # Only the input varies: the copies join the batch, each keeping its own exponent.
    x = batching.bdim_at_front(x, dx, size)
    batch = x.shape[1]
    ex = batching.bdim_at_front(ex, dex, size) if dex is not None else ex[None]
    ex = jnp.broadcast_to(ex, (size, batch)).reshape(size * batch)
    y = dfp_conv_p.bind(x.reshape(size * batch, *x.shape[2:]), ex, b, eb, **params)
    return y.reshape(size, batch, *y.shape[1:]), 0
  # Otherwise one convolution per element (exact, but serial over the mapped axis).
  moved = [batching.bdim_at_front(a, d, size) if d is not None else None for a, d in zip(args, dims)]
  def one(mapped):
    full = [m if m is not None else a for a, m in zip(args, mapped)]
    return dfp_conv_p.bind(*full, **params)
  return lax.map(one, moved), 0


dfp_conv_p.def_impl(_impl)
dfp_conv_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[dfp_conv_p] = _batch_rule
mlir.register_lowering(dfp_conv_p, _cpu_lowering, platform="cpu")
mlir.register_lowering(dfp_conv_p, mlir.lower_fun(_reference, multiple_results=False))


# ---------------------------------------------------------------------------------------
# Exact convolutions of DFP tensors under general parameters.
# ---------------------------------------------------------------------------------------


# Input channels (per group) below which backward-data runs as col2im: with fewer than one
# microkernel column panel, im2col packing of dy would dominate the forward-style route.
_COL2IM_MAX_CHANNELS = 16


def _bind(*args, **params):
  impl = _reference if reference.in_reference_mode() else dfp_conv_p.bind
  return impl(*args, **params)


def _channels_last(spec) -> tuple[int, ...]:
  """Activations ``spec`` (N, C, spatial...) -> the kernel's N, spatial..., C."""
  return (spec[0], *spec[2:], spec[1])


def _window_first(spec) -> tuple[int, ...]:
  """Weights ``spec`` (O, I, spatial...) -> the kernel's window..., I, O."""
  return (*spec[2:], spec[1], spec[0])


def _canonical(ma, mb, p: ConvParams):
  """Mantissas in the kernel's layout, batch groups folded into feature groups."""
  lhs_spec, rhs_spec, _ = p.dimension_numbers
  x = jnp.transpose(ma, _channels_last(lhs_spec))  # N, spatial, C
  w = jnp.transpose(mb, _window_first(rhs_spec))  # window, I, O
  groups = p.feature_group_count
  if p.batch_group_count > 1:
    # Batch group j of the input pairs with output-feature group j: as channel groups.
    bg = groups = p.batch_group_count
    x = x.reshape(bg, x.shape[0] // bg, *x.shape[1:])
    x = jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], bg * x.shape[-1])
  geometry = Geometry(tuple(w.shape[:-2]), p.window_strides, p.padding, p.lhs_dilation,
                      p.rhs_dilation, groups)
  return x, w, geometry


def _phases(geometry: Geometry, in_spatial):
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
    phases = []
    for r in range(d):
      t0 = (lo - r) % d
      taps, out = len(range(t0, k, d)), max(0, -(-(q - r) // d))
      pad_lo = -((r + t0 - lo) // d)
      phases.append((slice(t0, None, d), (pad_lo, out - 1 + taps - size - pad_lo), out))
    per_dim.append(phases)
  return per_dim


def _forward_by_phases(x, ex, w, eb, geometry: Geometry, per_dim, out_dtype):
  """The forward convolution as one stride-1 convolution per phase, interleaved."""
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  ys = {}
  for phase in itertools.product(*(range(len(p)) for p in per_dim)):
    chosen = [per_dim[i][r] for i, r in enumerate(phase)]
    sub = Geometry(tuple(len(range(w.shape[i])[c[0]]) for i, c in enumerate(chosen)),
                   geometry.strides, tuple(c[1] for c in chosen), (1,) * len(per_dim),
                   geometry.rhs_dilation, geometry.groups)
    if 0 in sub.window:  # no tap lands on this phase: an empty sum, or NaN (spec section 2)
      shape = (x.shape[0], *(c[2] for c in chosen), w.shape[-1])
      nonfinite = (ex[0] == NONFINITE_EXPONENT) | (eb[0] == NONFINITE_EXPONENT)
      ys[phase] = jnp.where(nonfinite, jnp.nan, jnp.zeros(shape, out_dtype)).astype(out_dtype)
      continue
    ys[phase] = _bind(x, ex, w[tuple(c[0] for c in chosen)], eb, geometry=sub, mode="forward",
                      out_dtype=out_dtype)
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


def exact_conv(qa: DFPTensor, qb: DFPTensor, params: ConvParams, out_dtype):
  """``fl(conv(ma, mb)) * 2**(ea + eb)`` (spec section 3) for per-tensor quantized operands."""
  x, w, geometry = _canonical(qa.mantissa, qb.mantissa, params)
  ex, eb = jnp.reshape(qa.exponent, (1,)), jnp.reshape(qb.exponent, (1,))
  per_dim = _phases(geometry, x.shape[1:-1])
  if per_dim is None:
    y = _bind(x, ex, w, eb, geometry=geometry, mode="forward", out_dtype=np.dtype(out_dtype))
  else:
    y = _forward_by_phases(x, ex, w, eb, geometry, per_dim, np.dtype(out_dtype))
  out_spec = params.dimension_numbers.out_spec
  return jnp.transpose(y, np.argsort(_channels_last(out_spec)))


def _exact_backward_data(qg: DFPTensor, qw: DFPTensor, lhs_shape, p: ConvParams, out_dtype):
  """The input gradient of the convolution ``p`` from its quantized cotangent and weights."""
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  in_per_group = lhs_shape[lhs_spec[1]] // p.feature_group_count
  if p.batch_group_count > 1 or in_per_group >= _COL2IM_MAX_CHANNELS:
    dy, w, params = _transpose_lhs(qg.mantissa, qw.mantissa, lhs_shape, p)
    dx = exact_conv(DFPTensor(dy, qg.exponent), DFPTensor(w, qw.exponent), params, out_dtype)
    return _finish_transpose_lhs(dx, p)
  dy = jnp.transpose(qg.mantissa, _channels_last(out_spec))
  w = jnp.transpose(qw.mantissa, _window_first(rhs_spec))
  geometry = Geometry(tuple(w.shape[:-2]), p.window_strides, p.padding, p.lhs_dilation,
                      p.rhs_dilation, p.feature_group_count,
                      tuple(lhs_shape[d] for d in lhs_spec[2:]))
  dx = _bind(dy, jnp.reshape(qg.exponent, (1,)), w, jnp.reshape(qw.exponent, (1,)),
             geometry=geometry, mode="backward_data", out_dtype=np.dtype(out_dtype))
  return jnp.transpose(dx, np.argsort(_channels_last(lhs_spec)))


def _exact_backward_weights(qx: DFPTensor, qg: DFPTensor, rhs_shape, p: ConvParams, out_dtype):
  """The weight gradient of the convolution ``p`` from its quantized input and cotangent."""
  if p.batch_group_count > 1:  # JAX's transposed convolution, through the forward kernel
    x, g, params = _transpose_rhs(qg.mantissa, qx.mantissa, rhs_shape, p)
    return exact_conv(DFPTensor(x, qx.exponent), DFPTensor(g, qg.exponent), params, out_dtype)
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  x = jnp.transpose(qx.mantissa, _channels_last(lhs_spec))
  dy = jnp.transpose(qg.mantissa, _channels_last(out_spec))
  window = tuple(rhs_shape[d] for d in rhs_spec[2:])
  geometry = Geometry(window, p.window_strides, p.padding, p.lhs_dilation, p.rhs_dilation,
                      p.feature_group_count)
  dw = _bind(x, jnp.reshape(qx.exponent, (1,)), dy, jnp.reshape(qg.exponent, (1,)),
             geometry=geometry, mode="backward_weights", out_dtype=np.dtype(out_dtype))
  return jnp.transpose(dw, np.argsort(_window_first(rhs_spec)))


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


@functools.partial(classic_custom_vjp, nondiff_argnums=(3,))
def _dfp_conv(lhs, rhs, key, spec: _Spec):
  return _dfp_conv_fwd(lhs, rhs, key, spec)[0]


def _dfp_conv_fwd(lhs, rhs, key, spec: _Spec):
  qa = quantize_operand(lhs, spec.forward, fold_key(key, 0))
  qb = quantize_operand(rhs, spec.forward, fold_key(key, 1))
  y = exact_conv(qa, qb, spec.params, spec.out_dtype)
  return y, (qa, qb, key)  # only INT16 mantissas and exponents are kept


def _dfp_conv_bwd(spec: _Spec, residuals, g):
  qa, qb, key = residuals
  qg = quantize_operand(g, spec.gradient, fold_key(key, 2))
  da = _exact_backward_data(qg, qb, spec.lhs_shape, spec.params, spec.lhs_dtype)
  db = _exact_backward_weights(qa, qg, spec.rhs_shape, spec.params, spec.rhs_dtype)
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
  lhs, rhs = matching_manual_axes(lhs, rhs)
  return _dfp_conv(lhs, rhs, key if config.needs_key else None, spec)
