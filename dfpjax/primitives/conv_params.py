"""A convolution's parameters, canonical: ``ConvParams`` (``lax.conv_general_dilated``'s,
explicit), ``Geometry`` (the kernel's channels-last view) and the one output-size rule."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dfpjax import cpu_ffi

_PADDING_EXPECTED = ("dfp_conv_general_dilated: padding must be 'SAME', 'SAME_LOWER', 'VALID' or one "
                     "(low, high) pair of integers per spatial dimension")


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


def dilated_size(size, dilation) -> int:
  """A length with ``dilation - 1`` zeros between neighbours, as in ``lax``'s shape rule: an
  empty one stays empty (not ``1 - dilation`` long)."""
  return (size - 1) * dilation + 1 if size else 0


def output_size(size, window, stride, padding, lhs_dilation, rhs_dilation) -> int:
  """The output length along one spatial dimension: the windows that fit in the padded,
  dilated input (none when the window is larger). The input or the window may be empty: a
  backward-weights convolution's window is the forward's cotangent."""
  lo, hi = padding
  span = dilated_size(window, rhs_dilation)
  return max(0, (dilated_size(size, lhs_dilation) + lo + hi - span) // stride + 1)


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
  # forward: how the operand b holds the weights w [*window, cin, G*cout], read in place by the
  # kernel's packing (``dfp_weight_view``). weight_taps, per dimension (first, step): tap t is
  # b's tap first + step * t (None: b's taps are the window's). transposed_weights: b is
  # [*b_window, cout, G*cin], the weights of the convolution this one is the backward-data of.
  weight_taps: tuple[tuple[int, int], ...] | None = None
  transposed_weights: bool = False
  # forward and backward_data: the weights lie in memory with their last dimension outermost
  # (cpu_ffi.features_major_layout), as an all-gather along it writes them. Their values, and
  # so the convolution, are the same.
  features_major_weights: bool = False

  def out_spatial(self, in_spatial):
    return tuple(map(output_size, in_spatial, self.window, self.strides, self.padding,
                     self.lhs_dilation, self.rhs_dilation))

  def taps(self) -> tuple[tuple[int, int], ...]:
    """Per dimension (first, step): tap t of the window reads b's tap first + step * t."""
    return self.weight_taps or ((0, 1),) * len(self.window)

  def fits_weights(self, b_shape) -> bool:
    """Whether a forward convolution's b of shape ``b_shape`` holds every tap of the window."""
    nd = len(self.window)
    if len(b_shape) != nd + 2 or (self.weight_taps is None and tuple(b_shape[:nd]) != self.window):
      return False
    return all(k == 0 or (0 <= f < n and 0 <= f + s * (k - 1) < n)
               for n, k, (f, s) in zip(b_shape, self.window, self.taps()))

  def weight_channels(self, b_shape) -> tuple[int, int]:
    """(cin, G*cout) of the weights a forward convolution's b of shape ``b_shape`` holds."""
    if self.transposed_weights:
      return b_shape[-1] // self.groups, self.groups * b_shape[-2]
    return b_shape[-2], b_shape[-1]

  def weights_of(self, b):
    """The weights [*window, cin, G*cout] that a forward convolution's b holds (a copy, for
    the pure-XLA twin; the kernel reads them in place)."""
    for d, (k, (first, step)) in enumerate(zip(self.window, self.weight_taps or ())):
      b = jnp.take(b, first + step * np.arange(k), axis=d)
    if not self.transposed_weights:
      return b
    g, (cout, g_cin) = self.groups, b.shape[-2:]
    b = b.reshape(*b.shape[:-1], g, g_cin // g)  # window, cout, G, cin
    b = jnp.swapaxes(jnp.moveaxis(b, -3, -1), -3, -2)  # window, cin, G, cout
    return b.reshape(*b.shape[:-3], g_cin // g, g * cout)

  def params(self) -> ConvParams:
    """The same convolution as ``lax.conv_general_dilated`` parameters (NHWC, HWIO)."""
    nd = len(self.window)
    spatial = tuple(range(1, nd + 1))
    dnums = lax.ConvDimensionNumbers((0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd)),
                                     (0, nd + 1) + spatial)
    return ConvParams(self.strides, self.padding, self.lhs_dilation, self.rhs_dilation, dnums,
                      self.groups, 1)

  def kernel_attributes(self, batch, in_spatial, cin, cout, mode, b_window=None) -> dict:
    """The kernel's named attributes for this convolution (``cpu_ffi.conv_attributes``);
    ``b_window``: the spatial shape of a forward convolution's b."""
    taps = None
    if mode == "forward" and self.weight_taps is not None:
      taps = [(n, f, s) for n, (f, s) in zip(b_window, self.weight_taps)]
    return cpu_ffi.conv_attributes(
        batch=batch, in_spatial=in_spatial, out_spatial=self.out_spatial(in_spatial),
        window=self.window, strides=self.strides, padding_lo=[lo for lo, _ in self.padding],
        lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation, groups=self.groups,
        in_channels=cin, out_channels=cout, mode=mode, weight_taps=taps,
        transposed_weights=self.transposed_weights,
        features_major_weights=self.features_major_weights)


def float_conv_shape(lhs_shape, rhs_shape, params: ConvParams):
  """The output shape by JAX's own shape rule (which also validates every parameter)."""
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **params.as_kwargs()),
                       jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                       jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  return out.shape


# The kernel's convolution shape (``dfp_conv_shape``) holds 1 to 3 spatial dimensions.
MAX_SPATIAL_DIMS = 3


def unsupported_rank(ndim: int) -> str | None:
  """Why a convolution of rank-``ndim`` operands cannot run in DFP, or None."""
  if 1 <= ndim - 2 <= MAX_SPATIAL_DIMS:
    return None
  return (f"the DFP kernel convolves 1 to {MAX_SPATIAL_DIMS} spatial dimensions (operands of "
          f"rank 3 to {MAX_SPATIAL_DIMS + 2}), this convolution has rank-{ndim} operands")


def _positive_ints(name: str, values, count: int) -> tuple[int, ...]:
  """``values`` as ``count`` integers >= 1, or a ValueError naming argument ``name``."""
  try:
    ints = tuple(int(v) for v in values)
    valid = len(ints) == count and all(i == v and i >= 1 for i, v in zip(ints, values))
  except (TypeError, ValueError):
    valid = False
  if not valid:
    raise ValueError(f"dfp_conv_general_dilated: {name} must be {count} positive integers, one "
                     f"per spatial dimension, got {values!r}")
  return ints


def canonical_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count) -> ConvParams:
  """``lax.conv_general_dilated``'s arguments as ``ConvParams``, validated: strides and
  dilations here (JAX divides by them before checking), the rest by JAX's shape rule."""
  why = unsupported_rank(lhs.ndim)
  if why is not None:
    raise ValueError(f"dfp_conv_general_dilated: lhs has shape {lhs.shape}: {why}")
  nspatial = lhs.ndim - 2
  window_strides = _positive_ints("window_strides", window_strides, nspatial)
  lhs_dilation = _positive_ints("lhs_dilation", (1,) * nspatial if lhs_dilation is None
                                else lhs_dilation, nspatial)
  rhs_dilation = _positive_ints("rhs_dilation", (1,) * nspatial if rhs_dilation is None
                                else rhs_dilation, nspatial)
  for name, count in (("feature_group_count", feature_group_count),
                      ("batch_group_count", batch_group_count)):
    if not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(f"dfp_conv_general_dilated: {name} must be a positive integer, got "
                       f"{count!r}")
  dnums = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  window = tuple(int(rhs.shape[d]) for d in dnums.rhs_spec[2:])
  if 0 in window:  # XLA's verifier refuses it when lowering; an empty sum is no convolution
    raise ValueError(f"dfp_conv_general_dilated: rhs has shape {tuple(rhs.shape)}, a window of "
                     f"{window}: every spatial dimension of the window must be at least 1")
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError(_PADDING_EXPECTED + f", got {padding!r}")
    if any(d != 1 for d in lhs_dilation):
      raise ValueError("dfp_conv_general_dilated: string padding is not defined with lhs_dilation; "
                       "give explicit padding (as lax.conv_general_dilated requires)")
    lhs_perm, rhs_perm, _ = dnums
    effective_rhs = [dilated_size(k, r) for k, r in zip(np.take(rhs.shape, rhs_perm)[2:], rhs_dilation)]
    padding = lax.padtype_to_pads(np.take(lhs.shape, lhs_perm)[2:], effective_rhs, window_strides,
                                  padding)
  try:
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if pairs != tuple((lo, hi) for lo, hi in padding):  # 0.9 is no padding of 0
      raise ValueError
  except (TypeError, ValueError) as err:
    raise ValueError(_PADDING_EXPECTED + f", got {padding!r}") from err
  padding = pairs
  params = ConvParams(window_strides, padding, lhs_dilation, rhs_dilation, dnums,
                      int(feature_group_count), int(batch_group_count))
  float_conv_shape(lhs.shape, rhs.shape, params)  # JAX's checks, with JAX's messages
  return params


def channels_last(spec) -> tuple[int, ...]:
  """Activations ``spec`` (N, C, spatial...) -> the kernel's N, spatial..., C."""
  return (spec[0], *spec[2:], spec[1])


def window_first(spec) -> tuple[int, ...]:
  """Weights ``spec`` (O, I, spatial...) -> the kernel's window..., I, O."""
  return (*spec[2:], spec[1], spec[0])


def canonical(ma, mb, p: ConvParams):
  """Mantissas in the kernel's layout, batch groups folded into feature groups."""
  lhs_spec, rhs_spec, _ = p.dimension_numbers
  x = jnp.transpose(ma, channels_last(lhs_spec))  # N, spatial, C
  w = jnp.transpose(mb, window_first(rhs_spec))  # window, I, O
  groups = p.feature_group_count
  if p.batch_group_count > 1:
    # Batch group j of the input pairs with output-feature group j: as channel groups.
    bg = groups = p.batch_group_count
    x = x.reshape(bg, x.shape[0] // bg, *x.shape[1:])
    x = jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], bg * x.shape[-1])
  geometry = Geometry(tuple(w.shape[:-2]), p.window_strides, p.padding, p.lhs_dilation,
                      p.rhs_dilation, groups)
  return x, w, geometry
