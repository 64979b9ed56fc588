"""DFP ``conv_general_dilated``: spec section 3 forward, section 4 gradients.

Two layers, as for ``dot_general``:

* ``dfp_conv_p`` -- the exact convolution of quantized operands in the kernel's
  channels-last form (``x [N, *spatial, G*cin]``, ``w [*window, cin, G*cout]``), in three
  modes: ``forward``, ``backward_weights`` (the weight gradient from ``x`` and ``dy``) and
  ``backward_data`` (the input gradient from ``dy`` and ``w``, run as col2im: the route for
  inputs with few channels, such as an RGB stem).
  Abstract evaluation, a batching rule, a CPU lowering to the C kernel's implicit-im2col
  convolution through XLA FFI, and a pure-XLA lowering (``reference.conv``: input patches
  times the exact integer product) on every other platform.
* ``dfp_conv_general_dilated`` -- the user-facing op with ``lax.conv_general_dilated``'s
  signature: quantizes, transposes the mantissas into the canonical layout (a no-op for
  Flax's NHWC/HWIO), calls the primitive and is differentiable in every mode through
  ``bilinear.dfp_product`` (``_Spec.cotangents`` is the DFP gradient rule). Backward-data is
  a forward convolution with the parameters JAX's own transpose rule derives
  (``conv_transpose.transpose_lhs`` follows it line by line) whose kernel reads the forward's
  weights flipped and transposed in place (``Geometry.weight_taps``, ``transposed_weights``:
  no XLA copy of them), split into stride-1 phases
  where the input is dilated, or col2im for inputs with few channels; backward-weights is the primitive's
  second mode, reading the forward's quantized input and the quantized cotangent as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import batching

from dfpjax import cpu_ffi
from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import DFPTensor
from dfpjax.primitives import bilinear, conv_transpose, partitioning, reference, registry
from dfpjax.primitives.conv_params import (ConvParams, Geometry, canonical_params, channels_last,
                                           float_conv_shape, window_first)
from dfpjax.primitives.operands import float_operands, fold_key, matching_manual_axes, output_dtype
from dfpjax.primitives.quantize import quantize_operand
from dfpjax.primitives.registry import output_aval

dfp_conv_p = registry.new_primitive("dfp_conv", multiple_results=True)
MODES = cpu_ffi.CONV_MODES  # the kernel contract names them

# ---------------------------------------------------------------------------------------
# Shape rule.
# ---------------------------------------------------------------------------------------


def _abstract_eval(x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  registry.check_integer_operands("dfp_conv_p", x, ex, b, eb)
  nd, g = len(geometry.window), geometry.groups
  if mode not in MODES or x.ndim != nd + 2 or b.ndim != nd + 2 or x.shape[-1] % g:
    raise ValueError(f"dfp_conv_p: operands {x.shape}, {b.shape} do not fit {mode} {geometry}")
  if ex.shape not in ((1,), (x.shape[0],)) or eb.shape != (1,) or (mode != "forward" and ex.shape != (1,)):
    raise ValueError(f"dfp_conv_p: exponent shapes {ex.shape}, {eb.shape}")
  batch = x.shape[0]
  spec = (registry.spec_entry(x, 0),)  # the batch stays split in types too
  if mode == "backward_data":  # x is dy, b the weights
    cin = b.shape[-2]
    if (x.shape[1:-1] != geometry.out_spatial(geometry.input_spatial) or x.shape[-1] != b.shape[-1]
        or b.shape[:-2] != geometry.window or b.shape[-1] % g):
      raise ValueError(f"dfp_conv_p: output gradient {x.shape} and weights {b.shape} do not fit "
                       f"{geometry}")
    return output_aval((batch, *geometry.input_spatial, g * cin), out_dtype, x, ex, b, eb,
                       spec=spec)
  cin = x.shape[-1] // g
  out_spatial = geometry.out_spatial(x.shape[1:-1])
  if mode == "forward":
    w_cin, w_cout = geometry.weight_channels(b.shape)
    if not geometry.fits_weights(b.shape) or w_cin != cin or b.shape[-1] % g:
      raise ValueError(f"dfp_conv_p: weights {b.shape} do not fit input {x.shape} and {geometry}")
    return output_aval((batch, *out_spatial, w_cout), out_dtype, x, ex, b, eb, spec=spec)
  if b.shape[:-1] != (batch, *out_spatial) or b.shape[-1] % g:
    raise ValueError(f"dfp_conv_p: output gradient {b.shape} does not fit input {x.shape} and "
                     f"{geometry}")
  return output_aval((*geometry.window, cin, b.shape[-1]), out_dtype, x, ex, b, eb)


# ---------------------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------------------


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
    y, _ = dfp_conv_p.bind(x.reshape(size * batch, *x.shape[2:]), ex, b, eb, **params)
    return y.reshape(size, batch, *y.shape[1:]), 0
  # Otherwise one convolution per element (exact, but serial over the mapped axis).
  moved = [batching.bdim_at_front(a, d, size) if d is not None else None for a, d in zip(args, dims)]
  def one(mapped):
    full = [m if m is not None else a for a, m in zip(args, mapped)]
    return dfp_conv_p.bind(*full, **params)[0]
  return lax.map(one, moved), 0


# ---------------------------------------------------------------------------------------
# Lowerings: the C kernel on CPU, its pure-XLA twin (``reference.conv``) elsewhere.
# ---------------------------------------------------------------------------------------


def _cpu_lowering(ctx, x, ex, b, eb, *, geometry: Geometry, mode, out_dtype):
  cpu_ffi.register()  # the output's types are the results'; a split's low bits an attribute
  x_aval, b_aval = ctx.avals_in[0], ctx.avals_in[2]
  cout = b_aval.shape[-1] // geometry.groups
  if mode == "backward_data":
    in_spatial, cin = geometry.input_spatial, b_aval.shape[-2]
  else:
    in_spatial, cin = x_aval.shape[1:-1], x_aval.shape[-1] // geometry.groups
  if mode == "forward":
    cout = geometry.weight_channels(b_aval.shape)[1] // geometry.groups
  attributes = geometry.kernel_attributes(x_aval.shape[0], in_spatial, cin, cout, mode,
                                          b_window=b_aval.shape[:-2])
  b_layout = (cpu_ffi.features_major_layout(b_aval.ndim) if geometry.features_major_weights
              else None)
  return jax.ffi.ffi_lowering(cpu_ffi.CONV_TARGET, operand_layouts=(None, None, b_layout, None))(
      ctx, x, ex, b, eb, **attributes, **cpu_ffi.output_attributes(out_dtype))


# ---------------------------------------------------------------------------------------
# Partitioning: the batch stays split, the rest is replicated; backward-weights, which
# contracts the batch, sums exact int64 partial sums.
# ---------------------------------------------------------------------------------------


def _sharding_rule(shapes, *, geometry, mode, out_dtype):
  del out_dtype
  x_shape, ex_shape, _, _ = shapes
  spatial = lambda name: " ".join(partitioning.fresh_factors(name, len(x_shape) - 2))
  x, w, y = map(spatial, ("x", "w", "y"))
  ex = "n" if ex_shape[0] == x_shape[0] else "ex"
  if mode == "backward_weights":  # b is dy, batch-major like x; dw [*window, x's, dy's channels]
    xc, dyc, wc = ("c", "co", "c co") if geometry.groups == 1 else ("xc", "dyc", "wi wo")
    return f"n {x} {xc}, {ex}, n {spatial('dy')} {dyc}, eb -> {w} {wc}", ()
  if mode == "forward" and geometry.groups == 1:
    # The channels x and w contract: w's cin, its last dimension where it holds the weights
    # of the convolution this one is the backward-data of. A weight split along its output
    # channels (a ZeRO-sharded state's, a tensor-parallel layer's) is gathered, and y's
    # channels are a factor of their own: no split of w's spreads onto the activations.
    wc = "wo c" if geometry.transposed_weights else "c wo"
    return f"n {x} c, {ex}, {w} {wc}, eb -> n {y} yc", ("wo",)
  return f"n {x} xc, {ex}, {w} wi wo, eb -> n {y} yc", ()


def _channel_split(spec, *taken):
  """A channel dimension's split, unless its mesh axes are taken by another dimension."""
  return None if set(partitioning.axes_of(spec)) & set(partitioning.axes_of(*taken)) else spec


def _partition(mesh, specs, shapes, bind, *, wanted, geometry, mode, out_dtype):
  """Keeps the batch split, and without groups the channels where they are split over other
  mesh axes: a forward convolution's input channels (contracted; JAX's transpose rule makes
  the weight gradient one that contracts the batch as channels), and both operands' channels
  in backward-weights (the weight gradient's two channel dimensions).
  A contracted split makes each device's kernel write its exact int64 partial sums, which
  one int64 sum adds before the single rounding (``partitioning.sum_and_encode``); a
  weight gradient comes out split as its consumer wants it where that splits one dimension
  over the batch's axes (a sharded weight's). Where the weight outweighs the batch's two
  activations (``partitioning.gathers_the_batch``), each device works on the whole batch
  instead, for its block of the weight's output features: a weight gradient from the gathered
  batch and its block of dy's channels (``partitioning.weight_gradient_of_gathered_batch``);
  and, for a weight split along its output features over the batch's axes (a ZeRO-sharded
  state's), the forward convolution from the gathered input and the device's own block of the
  weight (``partitioning.output_block_of_gathered_batch``), and the input gradient from the
  whole batch of that block's cotangent channels (``partitioning.input_gradient_of_gathered_batch``).
  Other weights split along their last dimension are all-gathered, which XLA:CPU writes with
  that dimension outermost: the kernel reads them so (``Geometry.features_major_weights``),
  not after a copy back to row-major."""
  x_shape, ex_shape = shapes[0], shapes[1]
  rank, batch = len(x_shape), specs[0][0]
  none = (None,) * (rank - 2)
  channel = None
  if geometry.groups == 1 and mode != "backward_data":
    channel = _channel_split(specs[0][-1], batch)
  x_spec = (batch, *none, channel)
  ex_spec = (batch if ex_shape[0] == x_shape[0] else None,)
  if mode == "backward_weights":
    dy_channel = _channel_split(specs[2][-1], batch, channel) if geometry.groups == 1 else None
    contracted, b_spec = batch, (batch, *none, dy_channel)
    y_spec = (*none, channel, dy_channel)
  else:
    b_spec = (*none, None, channel) if geometry.transposed_weights else (*none, channel, None)
    contracted, y_spec = channel, (batch, *(None,) * (rank - 1))
  contracted = partitioning.axes_of(contracted)
  scattered = None
  if mode == "backward_weights":
    scattered, y_spec = partitioning.split_as_wanted(wanted[0], contracted, y_spec)
    dw_size = math.prod(geometry.window) * x_shape[-1] * shapes[2][-1]
    devices = partitioning.axes_size(mesh, contracted)
    # Without groups only: a block of dy's channels would cut across them.
    if (geometry.groups == 1 and channel is None and dy_channel is None
        and scattered in (None, rank - 1) and shapes[2][-1] % devices == 0
        and partitioning.gathers_the_batch(x_shape, shapes[2], dw_size, devices)):
      per_shard = partitioning.weight_gradient_of_gathered_batch(
          bind, contracted, scattered is not None, ex_spec[0] is not None)
      return per_shard, y_spec, (x_spec, ex_spec, b_spec, (None,))
  elif specs[2][-1] is not None and b_spec[-1] is None:  # b split along its last dimension
    if (mode == "forward" and geometry.groups == 1 and channel is None and batch is not None
        and partitioning.axes_of(specs[2][-1]) == partitioning.axes_of(batch)):
      per_shard = _of_gathered_batch(mesh, shapes, bind, geometry, mode, out_dtype,
                                     partitioning.axes_of(batch), ex_spec[0] is not None)
      if per_shard is not None:
        return per_shard, y_spec, (x_spec, ex_spec, (*none, None, specs[2][-1]), (None,))
    # the partitioner gathers b along its last dimension, which XLA:CPU writes outermost
    bind = functools.partial(bind, geometry=dataclasses.replace(geometry,
                                                                features_major_weights=True))

  per_shard = partitioning.product_per_shard(bind, _exponents(rank), out_dtype, mesh, contracted,
                                             scattered, terms=functools.partial(_terms, geometry, mode))
  return per_shard, y_spec, (x_spec, ex_spec, b_spec, (None,))


def _of_gathered_batch(mesh, shapes, bind, geometry, mode, out_dtype, axes, per_example_exponent):
  """For a convolution (forward, or the input gradient's, with transposed weights) whose
  weight is split along its last dimension over the mesh ``axes`` that split the batch, and
  outweighs the batch's input and output (``partitioning.gathers_the_batch``): the per-shard
  function that works on the whole batch for the device's block of the weight, or None."""
  x_shape, w_shape = shapes[0], shapes[2]
  # The weight's last dimension is the forward's output features, the input gradient's
  # contracted ones: its output features are the weight's input features.
  y_channels = w_shape[-2] if geometry.transposed_weights else w_shape[-1]
  y_shape = (x_shape[0], *geometry.out_spatial(x_shape[1:-1]), y_channels)
  if not partitioning.gathers_the_batch(x_shape, y_shape, math.prod(w_shape),
                                        partitioning.axes_size(mesh, axes)):
    return None
  if not geometry.transposed_weights:
    return partitioning.output_block_of_gathered_batch(bind, axes, per_example_exponent)
  if per_example_exponent:  # an input gradient's cotangent has one exponent
    return None
  return partitioning.input_gradient_of_gathered_batch(
      bind, _exponents(len(x_shape)), out_dtype, mesh, axes,
      terms=functools.partial(_terms, geometry, mode))


def _exponents(rank: int):
  """``ex`` is per example (forward) or one exponent: it scales the result's leading dimension
  (the result, y or dw, has x's rank)."""
  return lambda ex, eb: (ex.reshape(-1, *(1,) * (rank - 1)), eb.reshape(()))


def _terms(geometry: Geometry, mode, x, b) -> int:
  """How many products of one shard's operands ``x, b`` an output element sums at most (the
  kernel's reduction length): backward-weights over the batch and output pixels of ``b`` (dy),
  the forward convolution over its taps and input channels, backward-data over the taps and
  output channels (of ``b``, the weights)."""
  if mode == "backward_weights":
    return math.prod(b.shape[:-1])
  channels = b.shape[-1] if mode == "backward_data" else x.shape[-1]
  return math.prod(geometry.window) * (channels // geometry.groups)


registry.register(dfp_conv_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=reference.conv,
                  sharding_rule=_sharding_rule, partition=_partition, flagged=True)

# ---------------------------------------------------------------------------------------
# Exact convolutions of DFP tensors under general parameters.
# ---------------------------------------------------------------------------------------

# Input channels (per group) below which backward-data runs as col2im: with fewer than one
# microkernel column panel, im2col packing of dy would dominate the forward-style route.
_COL2IM_MAX_CHANNELS = 16


def _bind(*args, **params):
  return registry.product(dfp_conv_p, reference.conv, *args, **params)


def exact_conv(qa: DFPTensor, qb: DFPTensor, params: ConvParams, out_dtype):
  """``fl(conv(ma, mb)) * 2**(ea + eb)`` (spec section 3) for per-tensor quantized operands."""
  return conv_transpose.forward_conv(_bind, qa, qb, params, out_dtype)


def _exact_backward_data(qg: DFPTensor, qw: DFPTensor, lhs_shape, p: ConvParams, out_dtype):
  """The input gradient of the convolution ``p`` from its quantized cotangent and weights."""
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  in_per_group = lhs_shape[lhs_spec[1]] // p.feature_group_count
  if p.batch_group_count > 1:
    dy, w, params = conv_transpose.transpose_lhs(qg.mantissa, qw.mantissa, lhs_shape, p)
    dx = exact_conv(DFPTensor(dy, qg.exponent), DFPTensor(w, qw.exponent), params, out_dtype)
    return conv_transpose.finish_transpose_lhs(dx, p)
  if in_per_group >= _COL2IM_MAX_CHANNELS:
    return conv_transpose.backward_data_conv(_bind, qg, qw, lhs_shape, p, out_dtype)
  dy = jnp.transpose(qg.mantissa, channels_last(out_spec))
  w = jnp.transpose(qw.mantissa, window_first(rhs_spec))
  geometry = Geometry(tuple(w.shape[:-2]), p.window_strides, p.padding, p.lhs_dilation,
                      p.rhs_dilation, p.feature_group_count,
                      tuple(lhs_shape[d] for d in lhs_spec[2:]))
  dx = _bind(dy, jnp.reshape(qg.exponent, (1,)), w, jnp.reshape(qw.exponent, (1,)),
             geometry=geometry, mode="backward_data", out_dtype=np.dtype(out_dtype))
  return jnp.transpose(dx, np.argsort(channels_last(lhs_spec)))


def _exact_backward_weights(qx: DFPTensor, qg: DFPTensor, rhs_shape, p: ConvParams, out_dtype):
  """The weight gradient of the convolution ``p`` from its quantized input and cotangent."""
  if p.batch_group_count > 1:  # JAX's transposed convolution, through the forward kernel
    x, g, params = conv_transpose.transpose_rhs(qg.mantissa, qx.mantissa, rhs_shape, p)
    return exact_conv(DFPTensor(x, qx.exponent), DFPTensor(g, qg.exponent), params, out_dtype)
  lhs_spec, rhs_spec, out_spec = p.dimension_numbers
  x = jnp.transpose(qx.mantissa, channels_last(lhs_spec))
  dy = jnp.transpose(qg.mantissa, channels_last(out_spec))
  window = tuple(rhs_shape[d] for d in rhs_spec[2:])
  geometry = Geometry(window, p.window_strides, p.padding, p.lhs_dilation, p.rhs_dilation,
                      p.feature_group_count)
  dw = _bind(x, jnp.reshape(qx.exponent, (1,)), dy, jnp.reshape(qg.exponent, (1,)),
             geometry=geometry, mode="backward_weights", out_dtype=np.dtype(out_dtype))
  return jnp.transpose(dw, np.argsort(window_first(rhs_spec)))


# ---------------------------------------------------------------------------------------
# Differentiation: spec section 4 and the tangent rules, through ``bilinear``.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A ``dfp_conv_general_dilated`` call's static parameters and its products (``bilinear``)."""
  primitive: ClassVar[str] = "conv_general_dilated"  # the float product it stands for (report)
  params: ConvParams
  forward: QuantConfig
  gradient: QuantConfig
  out_dtype: np.dtype
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  lhs_dtype: np.dtype
  rhs_dtype: np.dtype

  def out_shape(self, lhs_shape, rhs_shape):
    return float_conv_shape(lhs_shape, rhs_shape, self.params)

  def product(self, qa: DFPTensor, qb: DFPTensor):
    return exact_conv(qa, qb, self.params, self.out_dtype)

  def cotangents(self, g, qa: DFPTensor, qb: DFPTensor, key):
    """Spec section 4: backward-data and backward-weights from cotangent ``g``."""
    qg = quantize_operand(g, self.gradient, fold_key(key, 2))
    da = _exact_backward_data(qg, qb, self.lhs_shape, self.params, self.lhs_dtype)
    db = _exact_backward_weights(qa, qg, self.rhs_shape, self.params, self.rhs_dtype)
    return da, db


def _dfp_conv(lhs, rhs, key, spec: _Spec):
  qa = quantize_operand(lhs, spec.forward, fold_key(key, 0))
  qb = quantize_operand(rhs, spec.forward, fold_key(key, 1))
  return bilinear.dfp_product(lhs, rhs, qa, qb, key, spec)

# ---------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------


def dfp_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None, *,
                             config: DFPConfig | None = None, key=None):
  """``jax.lax.conv_general_dilated`` computed in DFP (spec sections 3 and 4).

  One to three spatial dimensions (the kernel's), any dimension numbers, padding, strides,
  lhs/rhs dilation, feature groups (depthwise included) and batch groups. Both operands are quantized per
  tensor with ``config.forward``, convolved exactly over the integers and scaled once into
  the output type; backward-data and backward-weights are exact convolutions of the
  cotangent (quantized with ``config.gradient``) with the forward's quantized operands;
  tangents (``jax.jvp``, ``jax.hessian``) are DFP convolutions of the tangents, quantized
  likewise, and those operands (docs/numerics.md, "Forward mode and higher order").
  ``precision`` is accepted for compatibility and ignored.
  """
  del precision
  lhs, rhs, config = float_operands("dfp_conv_general_dilated", lhs, rhs, config, key)
  if config.forward.granularity != "tensor":
    raise NotImplementedError("dfp_conv_general_dilated supports granularity='tensor' only so far")
  params = canonical_params(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                            dimension_numbers, feature_group_count, batch_group_count)
  spec = _Spec(params, config.forward, config.gradient,
               output_dtype(preferred_element_type, "dfp_conv_general_dilated"), lhs.shape,
               rhs.shape, np.dtype(lhs.dtype), np.dtype(rhs.dtype))
  lhs, rhs = matching_manual_axes(lhs, rhs)
  return _dfp_conv(lhs, rhs, key if config.needs_key else None, spec)
