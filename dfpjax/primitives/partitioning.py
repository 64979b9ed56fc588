"""The DFP kernels under ``jax.jit`` sharding: each device runs its shard.

XLA cannot see inside an FFI custom call, so left alone it gathers every operand of a DFP
kernel onto every device (each computes the whole batch). The CPU lowering of a DFP
primitive therefore goes through ``jax.experimental.custom_partitioning``, as JAX's own
``cudnn/scaled_matmul_stablehlo.py`` does: a Shardy ``sharding_rule`` built from the
operand shapes, and a ``partition`` callback per primitive that keeps the dimensions it can
split sharded (the batch), replicates the rest (the weights) and returns the function one
device runs on its shard: the kernel, plus the collectives that keep the result the same
bits as on one device (a scalar ``pmax`` for a global exponent, an exact integer sum for a
product that contracts a sharded dimension: ``sum_and_encode``, of int64 partial sums or of
their two narrower parts, ``split_sums``). Where a convolution's weight outweighs the batch's
activations (``gathers_the_batch``), each device works on the whole batch for its block of the
weight's output features instead: ``weight_gradient_of_gathered_batch``, and for a weight split
so (a ZeRO-sharded state's) ``output_block_of_gathered_batch`` and
``input_gradient_of_gathered_batch``, which never gather it.

With one device, or inside ``shard_map`` (all axes manual), ``custom_partitioning`` inlines
the kernel call: the program lowers to exactly the custom calls it had before.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from dfpjax import cpu_ffi
from dfpjax._jax_compat import prim_requires_devices_during_lowering
from dfpjax.numerics.floatbits import false_from
from dfpjax.primitives import reference


def register_cpu_lowering(p, kernel, rule, partition, *, flagged=False, split_kernel=None):
  """Lowers ``p`` on CPU to ``kernel`` (the same primitive, lowered to the FFI call) per shard.

  ``rule(shapes, **params)`` returns the Shardy sharding rule string of ``p``'s operands and
  the factors in it that must stay replicated (Shardy then spreads no split along them).
  ``partition(mesh, specs, shapes, bind, wanted=..., **params)`` gets the operands' partition
  specs (entries ``None``, an axis name or a tuple of them; only dimensions that divide
  evenly) and the specs its consumers want of the results (``wanted``, a list, one per
  result of ``kernel``), and returns ``(per_shard_fn, result_specs, operand_specs)``;
  ``bind`` binds ``kernel`` (``split_kernel``, the same call returning its exact sums in two
  parts, where its ``out_dtype`` is a ``cpu_ffi.SplitSums``).

  ``flagged`` (a product, ``registry.register``): ``p`` returns ``kernel``'s result and a
  flag, a scalar, and ``per_shard_fn`` returns both (``product_per_shard``).
  """
  def lowering(ctx, *args, **params):
    shapes = tuple(tuple(a.shape) for a in ctx.avals_in)
    f = _partitioned(kernel, split_kernel, rule, partition, shapes, tuple(sorted(params.items())),
                     flagged)
    return mlir.lower_fun(f, multiple_results=p.multiple_results)(ctx, *args)

  mlir.register_lowering(p, lowering, platform="cpu")
  prim_requires_devices_during_lowering.add(p)


def first_false(y):
  """``floatbits.false_from`` of the largest element of a corner of ``y``, a flag of ``y``'s
  existence: its first two elements along the last dimension, and all of each dimension that
  ``y``'s type splits over devices (a shard's result, or one device's, has no such dimension).
  Two elements where the last dimension has them and is not split: XLA folds the max of one
  element into a slice and fuses that, with ``y``'s buffer, into every user of the flag, late
  ones too, where the max of two stays a reduction of its own (a BatchNorm whose scale
  gradient used its recompute region's flag kept 487 MiB of the ResNet-50 DFP step's arrays
  alive until the optimizer's update, docs/performance.md). An empty ``y`` has no kernel call
  to wait for: ``False``."""
  if y.size == 0:
    return jnp.zeros((), bool)
  spec = tuple(getattr(jax.typeof(y).sharding, "spec", ())) + (None,) * y.ndim
  limits = [1 if entry is None else size for entry, size in zip(spec, y.shape)]
  if y.ndim and spec[y.ndim - 1] is None:
    limits[-1] = min(2, y.shape[-1])
  corner = lax.slice(y, (0,) * y.ndim, tuple(limits))
  return false_from(jnp.max(corner))


@functools.cache
def _partitioned(kernel, split_kernel, rule, partition, shapes, params, flagged):
  params = dict(params)

  def bind(*args, **changed):
    call = {**params, **changed}
    split = isinstance(call.get("out_dtype"), cpu_ffi.SplitSums)
    return (split_kernel if split else kernel).bind(*args, **call)

  f = custom_partitioning(
      (lambda *args: [y := bind(*args), first_false(y)]) if flagged else bind)
  multiple = kernel.multiple_results or flagged

  def partition_callback(mesh, arg_shapes, result_shape):
    specs = [even_spec(mesh, a.sharding, a.shape) for a in arg_shapes]
    results = result_shape if multiple else [result_shape]
    wanted = [even_spec(mesh, r.sharding, r.shape) for r in results]
    per_shard, result_specs, arg_specs = partition(
        mesh, specs, shapes, bind, wanted=wanted[:1] if flagged else wanted, **params)
    if flagged:
      result_specs = [result_specs, ()]  # the flag: False on every device
    named = lambda spec: NamedSharding(mesh, PartitionSpec(*spec))
    results = list(map(named, result_specs)) if multiple else named(result_specs)
    return mesh, per_shard, results, tuple(map(named, arg_specs))

  rule_string, replicated_factors = rule(shapes, **params)
  if flagged:
    rule_string += ", "  # the flag, a scalar
  f.def_partition(partition=partition_callback, sharding_rule=rule_string,
                  need_replication_factors=replicated_factors)
  return f


def even_spec(mesh, sharding, shape) -> tuple:
  """The operand's partition spec, one entry per dimension, with ``None`` where the mesh
  axes do not divide the dimension (a padded shard would feed padding into an amax)."""
  spec = tuple(getattr(sharding, "spec", ())) + (None,) * len(shape)
  return tuple(entry if size % axes_size(mesh, entry) == 0 else None
               for entry, size in zip(spec, shape))


def axes_of(*entries) -> tuple[str, ...]:
  """The mesh axis names in partition-spec entries (``None``, a name, or a tuple of names)."""
  names = []
  for entry in entries:
    names += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
  return tuple(names)


def axes_size(mesh, entry) -> int:
  return math.prod(mesh.shape[name] for name in axes_of(entry))


def fresh_factors(prefix: str, count: int) -> list[str]:
  """Names of ``count`` sharding-rule factors of one operand that match no other's."""
  return [f"{prefix}{i}" for i in range(count)]


def split_as_wanted(wanted, axes, spec) -> tuple[int | None, tuple]:
  """``(scatter_dimension, result_spec)`` of a product whose result ``spec`` is replicated and
  whose contracted dimension is split over mesh ``axes``: where ``wanted``, the spec its
  consumer asks of the result, splits one dimension over exactly ``axes`` (the gradient of a
  weight sharded over the batch's axes), that dimension and ``wanted`` (``sum_and_encode``
  then returns each device's block of it); else ``(None, spec)``."""
  if not axes or any(entry is not None for entry in spec):
    return None, spec
  split = [d for d, entry in enumerate(wanted) if entry is not None]
  if len(split) == 1 and axes_of(wanted[split[0]]) == tuple(axes):
    return split[0], tuple(wanted)
  return None, spec


# The largest magnitude of one product of two mantissas (|m| <= 32767).
_LARGEST_PRODUCT = 32767 * 32767
_INT32_MAX = 2**31 - 1


def split_sums(terms: int, devices: int) -> cpu_ffi.SplitSums | None:
  """The narrowest exact two-part form (``cpu_ffi.SplitSums``) of sums of ``terms`` products
  that ``devices`` devices each form and then add part by part: the fewest low bits ``k`` for
  which the devices' high parts add within int32 (each high part lies in
  ``[-ceil(B / 2**k), floor(B / 2**k)]`` for ``B = terms * 32767**2``), with the low parts,
  in ``[0, 2**k)``, adding within uint8 or else uint16. ``None`` where no ``k`` works (more
  low bits only widen the low parts' sum): the sums stay int64. 5 or 6 bytes instead of 8."""
  largest = terms * _LARGEST_PRODUCT
  for low_bits in range(1, 17):
    if devices * -(-largest >> low_bits) > _INT32_MAX:
      continue
    for low_dtype in (np.dtype(np.uint8), np.dtype(np.uint16)):
      if low_bits <= 8 * low_dtype.itemsize and devices * (2**low_bits - 1) <= np.iinfo(low_dtype).max:
        return cpu_ffi.SplitSums(low_bits, low_dtype)
    return None
  return None


def product_per_shard(bind, exponents, out_dtype, mesh, axes, scatter_dimension=None, *, terms):
  """The function one device runs on its shard ``(a, ea, b, eb)`` of a product, returning
  the product and the flag ``first_false`` of the kernel call's output: ``bind`` itself where
  no contracted dimension is split (``axes`` empty); else the kernel's exact partial sums (the
  flag taken of them, before the collectives), added over ``axes`` and encoded once
  (``sum_and_encode``), with ``exponents(ea, eb)`` the two exponents broadcast to the sums.
  The partial sums come in the narrower two parts of ``split_sums`` for ``terms(a, b)`` (the
  kernel's reduction length on the shard) where one exists, else as int64."""
  def per_shard(a, ea, b, eb):
    if not axes:
      y = bind(a, ea, b, eb)
      return [y, first_false(y)]
    split = split_sums(terms(a, b), axes_size(mesh, axes))
    with jax.enable_x64(True):
      if split is None:
        parts = [bind(a, ea, b, eb, out_dtype=np.dtype(np.int64))]
        join = lambda parts: parts[0]
      else:
        parts = bind(a, ea, b, eb, out_dtype=split)
        join = lambda parts: ((parts[0].astype(jnp.int64) << split.low_bits)
                              + parts[1].astype(jnp.int64))
      flag = first_false(parts[0])
    y = sum_and_encode(parts, join, *exponents(ea, eb), out_dtype, mesh, axes, scatter_dimension)
    return [y, flag]

  return per_shard


def gathers_the_batch(x_shape, y_shape, weight_size: int, devices: int) -> bool:
  """Whether a convolution over a batch split over ``devices`` devices is cheaper with each
  device working on the whole batch, for its block of the weight's output features, than on
  its share of the batch with the whole weight: where the two batch-sized tensors it reads or
  writes, ``x`` and ``y`` (its input and output, or input and cotangent), hold fewer elements
  than the weight. Each device then gathers or exchanges a few hundred KiB of INT16 activations
  instead of gathering and packing the whole weight, or writing weight-sized partial sums of
  its gradient (5 to 8 bytes an element, then a reduce-scatter, an encoding and an exchange).
  The short products at the network's end (ResNet's last stages: a few pixels an example,
  hundreds of channels) are so; the early layers' long ones are not."""
  return devices > 1 and math.prod(x_shape) + math.prod(y_shape) <= weight_size


def weight_gradient_of_gathered_batch(bind, axes, scattered: bool, per_example_exponent: bool):
  """The function one device runs on its shard ``(x, ex, dy, eb)`` of a weight gradient that
  contracts the batch split over mesh ``axes`` (``dw [..., cin, cout]``), returning ``[dw,
  flag]`` as ``product_per_shard``'s do: the device gathers all of ``x`` (and ``ex`` where it
  is per example) and the whole batch of its block of ``dy``'s channels (an all-to-all), and
  its kernel sums the whole batch for its block of ``dw``'s last dimension. Every element is
  one kernel's exact sum over the whole batch rounded once: one device's bits, with no partial
  sums, and each device does a ``1/devices`` share of the multiply-adds. ``scattered``: the
  result stays split along its last dimension over ``axes`` (the gradient of a weight so
  sharded); else its blocks are all-gathered."""
  def per_shard(x, ex, dy, eb):
    x = lax.all_gather(x, axes, axis=0, tiled=True)
    if per_example_exponent:
      ex = lax.all_gather(ex, axes, axis=0, tiled=True)
    dy = lax.all_to_all(dy, axes, split_axis=dy.ndim - 1, concat_axis=0, tiled=True)
    dw = bind(x, ex, dy, eb)
    flag = first_false(dw)
    if not scattered:
      dw = lax.all_gather(dw, axes, axis=dw.ndim - 1, tiled=True)
    return [dw, flag]

  return per_shard


def output_block_of_gathered_batch(bind, axes, per_example_exponent: bool):
  """The function one device runs on its shard ``(x, ex, w, eb)`` of a forward convolution
  whose weight ``w [..., cin, cout]`` is split along its output features over the mesh ``axes``
  that split the batch (a ZeRO-sharded state's), returning ``[y, flag]`` as
  ``product_per_shard``'s do: the device gathers all of ``x`` (and ``ex`` where it is per
  example), its kernel computes the whole batch's output for its block of the output features
  from its own block of the weight, as it lies, and an all-to-all returns each device its
  share of the batch, all features. Every element is one kernel's exact sum rounded once: one
  device's bits, each device does a ``1/devices`` share of the multiply-adds, and none gathers
  or packs the whole weight (the forward products of the last stages, where the weight
  outweighs the batch's input and output: ``gathers_the_batch``)."""
  def per_shard(x, ex, w, eb):
    x = lax.all_gather(x, axes, axis=0, tiled=True)
    if per_example_exponent:
      ex = lax.all_gather(ex, axes, axis=0, tiled=True)
    y = bind(x, ex, w, eb)
    flag = first_false(y)
    return [lax.all_to_all(y, axes, split_axis=0, concat_axis=y.ndim - 1, tiled=True), flag]

  return per_shard


def input_gradient_of_gathered_batch(bind, exponents, out_dtype, mesh, axes, *, terms):
  """The function one device runs on its shard ``(dy, ex, w, eb)`` of an input gradient, a
  convolution of ``dy`` with the transposed weights ``w [..., cin, cout]`` that contracts
  ``cout``, where ``w`` is split along ``cout`` over the mesh ``axes`` that split the batch:
  an all-to-all gives the device the whole batch of its block of ``dy``'s channels, its kernel
  sums them against its own block of the weight, as it lies, into exact partial sums of the
  whole batch's input gradient, and ``product_per_shard`` adds those over the devices and
  encodes once each device's share of the batch: one device's bits, a ``1/devices`` share of
  the multiply-adds, and no device gathers or packs the whole weight (with
  ``output_block_of_gathered_batch``, the last stages' products under a ZeRO-sharded state)."""
  partial_sums = product_per_shard(bind, exponents, out_dtype, mesh, axes, 0, terms=terms)

  def per_shard(dy, ex, w, eb):
    dy = lax.all_to_all(dy, axes, split_axis=dy.ndim - 1, concat_axis=0, tiled=True)
    return partial_sums(dy, ex, w, eb)

  return per_shard


def sum_and_encode(parts, join, ea, eb, out_dtype, mesh, axes, scatter_dimension=None):
  """``reference.encode_sums(psum(s, axes), ea, eb, out_dtype)`` for each device's exact
  partial sums ``s = join(parts)`` of a product that contracts a dimension split over mesh
  ``axes``: ``parts`` are arrays shaped as ``s`` (``[s]`` in int64, or the two parts of
  ``split_sums``), each added over the devices on its own, ``join`` the int64 sums of the
  added parts; ``ea, eb`` broadcast to ``s``.

  Each device encodes only its own block of the sums: a reduce-scatter of each part along
  their first dimensions whose product the device count divides (a row block, read in
  place), the encoding of that block, and an exchange of the encoded float32 blocks: an
  all-gather, or, where the result is wanted split along ``scatter_dimension`` (the device's
  block of it is then its result), an all-to-all that gives each device all rows of its block
  along that dimension. The encoding is elementwise, so these are the bits of encoding the
  all-reduced sums, but no device repeats another's encoding or receives the full sums
  (int64: twice the bytes of a float32 result), and the sums are never transposed: a
  reduce-scatter along a later dimension would copy them whole into that dimension's blocks
  first, on every device. A weight gradient, the common case, is as large as the weights on
  every device, so the saving is a weight-sized pass per device, not a batch-sized one.
  Where no such rows exist the parts are reduce-scattered along ``scatter_dimension``
  itself, or, unscattered, all-reduced and encoded on every device.
  """
  with jax.enable_x64(True):
    shape = parts[0].shape
    devices = axes_size(mesh, axes)
    d = len(shape) if scatter_dimension is None else scatter_dimension
    leading = next((k for k in range(1, d + 1) if math.prod(shape[:k]) % devices == 0), None)
    if leading is None and scatter_dimension is not None:
      block = join([lax.psum_scatter(p, axes, scatter_dimension=d, tiled=True) for p in parts])
      start = lax.axis_index(axes) * block.shape[d]
      own = lambda e: e if np.ndim(e) == 0 or e.shape[d] == 1 else lax.dynamic_slice_in_dim(
          e, start, block.shape[d], axis=d)
      return reference.encode_sums(block, own(ea), own(eb), out_dtype)
    if leading is None:
      return reference.encode_sums(join([lax.psum(p, axes) for p in parts]), ea, eb, out_dtype)
    rows = math.prod(shape[:leading])
    block = join([add_scattered_rows(p.reshape(rows, -1), axes) for p in parts])
    start = lax.axis_index(axes) * block.shape[0]
    own = lambda e: e.reshape(()) if np.size(e) == 1 else lax.dynamic_slice_in_dim(
        jnp.broadcast_to(e, shape).reshape(rows, -1), start, block.shape[0])
    y = reference.encode_sums(block, own(ea), own(eb), out_dtype)
    if scatter_dimension is None:
      return lax.all_gather(y, axes, axis=0, tiled=True).reshape(shape)
    # Columns: the dimensions from ``leading`` on; device j takes block j of dimension d.
    y = y.reshape(block.shape[0], math.prod(shape[leading:d]), devices, -1)
    y = lax.all_to_all(y, axes, split_axis=2, concat_axis=0, tiled=True)
    return y.reshape(*shape[:d], shape[d] // devices, *shape[d + 1:])


def add_scattered_rows(part, axes):
  """Each device's block of rows of ``part`` (rows x columns) added over mesh ``axes``: a
  reduce-scatter along the rows. A uint8 low part of ``split_sums`` travels as uint32 words of
  4 lanes where its columns fill whole words: each lane's sum over the devices fits in the lane
  (``split_sums`` picks the low bits so), so the words add without carries between lanes.
  XLA:CPU reduce-scatters uint8 about four times slower per byte than 16- or 32-bit types; the
  word form, with its two bitcast passes, takes half the time. uint16 parts gain nothing so
  (their reduce-scatter is already fast, the bitcasts are not free) and travel as they are."""
  if part.dtype != np.uint8 or part.shape[1] % 4:
    return lax.psum_scatter(part, axes, scatter_dimension=0, tiled=True)
  words = lax.bitcast_convert_type(part.reshape(part.shape[0], -1, 4), jnp.uint32)
  block = lax.psum_scatter(words, axes, scatter_dimension=0, tiled=True)
  return lax.bitcast_convert_type(block, part.dtype).reshape(block.shape[0], -1)
