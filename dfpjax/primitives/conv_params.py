"""A convolution's parameters, canonical: ``ConvParams`` (``lax.conv_general_dilated``'s,
explicit), ``Geometry`` (the kernel's channels-last view) and the one output-size rule."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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


def output_size(size, window, stride, padding, lhs_dilation, rhs_dilation) -> int:
  """The output length along one spatial dimension: the windows that fit in the padded,
  dilated input (none when the window is larger)."""
  lo, hi = padding
  return max(0, ((size - 1) * lhs_dilation + 1 + lo + hi - ((window - 1) * rhs_dilation + 1))
             // stride + 1)


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
    return tuple(map(output_size, in_spatial, self.window, self.strides, self.padding,
                     self.lhs_dilation, self.rhs_dilation))

  def params(self) -> ConvParams:
    """The same convolution as ``lax.conv_general_dilated`` parameters (NHWC, HWIO)."""
    nd = len(self.window)
    spatial = tuple(range(1, nd + 1))
    dnums = lax.ConvDimensionNumbers((0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd)),
                                     (0, nd + 1) + spatial)
    return ConvParams(self.strides, self.padding, self.lhs_dilation, self.rhs_dilation, dnums,
                      self.groups, 1)

  def kernel_attribute(self, batch, in_spatial, cin, cout) -> np.ndarray:
    """``dfp_conv_shape`` (dfp_kernel.h) as 25 int64s, unused leading dimensions of size 1."""
    pad = lambda values, fill: (fill,) * (3 - len(values)) + tuple(values)
    fields = (batch, *pad(in_spatial, 1), *pad(self.out_spatial(in_spatial), 1),
              *pad(self.window, 1), *pad(self.strides, 1), *pad([lo for lo, _ in self.padding], 0),
              *pad(self.lhs_dilation, 1), *pad(self.rhs_dilation, 1), self.groups, cin, cout)
    return np.asarray(fields, np.int64)


def float_conv_shape(lhs_shape, rhs_shape, params: ConvParams):
  """The output shape by JAX's own shape rule (which also validates every parameter)."""
  out = jax.eval_shape(functools.partial(lax.conv_general_dilated, **params.as_kwargs()),
                       jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                       jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  return out.shape


def canonical_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count) -> ConvParams:
  """``lax.conv_general_dilated``'s arguments as ``ConvParams``, validated by JAX's rule."""
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
