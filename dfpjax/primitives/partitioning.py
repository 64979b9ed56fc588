"""The DFP kernels under ``jax.jit`` sharding: each device runs its shard.

XLA cannot see inside an FFI custom call, so left alone it gathers every operand of a DFP
kernel onto every device (each computes the whole batch). The CPU lowering of a DFP
primitive therefore goes through ``jax.experimental.custom_partitioning``, as JAX's own
``cudnn/scaled_matmul_stablehlo.py`` does: a Shardy ``sharding_rule`` built from the
operand shapes, and a ``partition`` callback per primitive that keeps the dimensions it can
split sharded (the batch), replicates the rest (the weights) and returns the function one
device runs on its shard: the kernel, plus the collectives that keep the result the same
bits as on one device (a scalar ``pmax`` for a global exponent, an exact int64 sum for a
product that contracts a sharded dimension: ``sum_and_encode``).

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

from dfpjax._jax_compat import prim_requires_devices_during_lowering
from dfpjax.numerics.floatbits import false_from
from dfpjax.primitives import reference


def register_cpu_lowering(p, kernel, rule, partition, *, flagged=False):
  """Lowers ``p`` on CPU to ``kernel`` (the same primitive, lowered to the FFI call) per shard.

  ``rule(shapes, **params)`` returns the Shardy sharding rule string of ``p``'s operands and
  the factors in it that must stay replicated (Shardy then spreads no split along them).
  ``partition(mesh, specs, shapes, bind, wanted=..., **params)`` gets the operands' partition
  specs (entries ``None``, an axis name or a tuple of them; only dimensions that divide
  evenly) and the specs its consumers want of the results (``wanted``, a list, one per
  result of ``kernel``), and returns ``(per_shard_fn, result_specs, operand_specs)``;
  ``bind`` binds ``kernel``.

  ``flagged`` (a product, ``registry.register``): ``p`` returns ``kernel``'s result and a
  flag, a scalar, and ``per_shard_fn`` returns both (``product_per_shard``).
  """
  def lowering(ctx, *args, **params):
    shapes = tuple(tuple(a.shape) for a in ctx.avals_in)
    f = _partitioned(kernel, rule, partition, shapes, tuple(sorted(params.items())), flagged)
    return mlir.lower_fun(f, multiple_results=p.multiple_results)(ctx, *args)

  mlir.register_lowering(p, lowering, platform="cpu")
  prim_requires_devices_during_lowering.add(p)


def first_false(y):
  """``floatbits.false_from`` of ``y``'s first element, a flag of ``y``'s existence; of the
  largest of a corner where ``y``'s type splits dimensions over devices (a shard's result, or
  one device's, has no such dimension: the corner is its first element). An empty ``y`` has
  no kernel call to wait for: ``False``."""
  if y.size == 0:
    return jnp.zeros((), bool)
  spec = tuple(getattr(jax.typeof(y).sharding, "spec", ())) + (None,) * y.ndim
  corner = lax.slice(y, (0,) * y.ndim,
                     tuple(1 if entry is None else size for entry, size in zip(spec, y.shape)))
  return false_from(jnp.max(corner))


@functools.cache
def _partitioned(kernel, rule, partition, shapes, params, flagged):
  params = dict(params)
  bind = functools.partial(kernel.bind, **params)
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


def product_per_shard(bind, exponents, out_dtype, mesh, axes, scatter_dimension=None):
  """The function one device runs on its shard ``(a, ea, b, eb)`` of a product, returning
  the product and the flag ``first_false`` of the kernel call's output: ``bind`` itself where
  no contracted dimension is split (``axes`` empty); else the kernel's exact int64 partial
  sums (the flag taken of them, before the collectives), added over ``axes`` and encoded once
  (``sum_and_encode``), with ``exponents(ea, eb)`` the two exponents broadcast to the sums."""
  def per_shard(a, ea, b, eb):
    if not axes:
      y = bind(a, ea, b, eb)
      return [y, first_false(y)]
    with jax.enable_x64(True):
      s = bind(a, ea, b, eb, out_dtype=np.dtype(np.int64))
      flag = first_false(s)
    return [sum_and_encode(s, *exponents(ea, eb), out_dtype, mesh, axes, scatter_dimension), flag]

  return per_shard


def sum_and_encode(s, ea, eb, out_dtype, mesh, axes, scatter_dimension=None):
  """``reference.encode_sums(psum(s, axes), ea, eb, out_dtype)`` for each device's exact int64
  partial sums ``s`` of a product that contracts a dimension split over mesh ``axes``;
  ``ea, eb`` broadcast to ``s``.

  Each device encodes only its own block of the sums: a reduce-scatter of the int64 sums
  along their first dimensions whose product the device count divides (a row block, read in
  place), the encoding of that block, and an exchange of the encoded float32 blocks: an
  all-gather, or, where the result is wanted split along ``scatter_dimension`` (the device's
  block of it is then its result), an all-to-all that gives each device all rows of its block
  along that dimension. The encoding is elementwise, so these are the bits of encoding the
  all-reduced sums, but no device repeats another's encoding or receives the full int64 sums
  (twice the bytes of a float32 result), and the int64 sums are never transposed: a
  reduce-scatter along a later dimension would copy them whole into that dimension's blocks
  first, on every device. A weight gradient, the common case, is as large as the weights on
  every device, so the saving is a weight-sized pass per device, not a batch-sized one.
  Where no such rows exist the int64 sums are reduce-scattered along ``scatter_dimension``
  itself, or, unscattered, all-reduced and encoded on every device.
  """
  with jax.enable_x64(True):
    devices = axes_size(mesh, axes)
    d = s.ndim if scatter_dimension is None else scatter_dimension
    leading = next((k for k in range(1, d + 1) if math.prod(s.shape[:k]) % devices == 0), None)
    if leading is None and scatter_dimension is not None:
      block = lax.psum_scatter(s, axes, scatter_dimension=d, tiled=True)
      start = lax.axis_index(axes) * block.shape[d]
      own = lambda e: e if np.ndim(e) == 0 or e.shape[d] == 1 else lax.dynamic_slice_in_dim(
          e, start, block.shape[d], axis=d)
      return reference.encode_sums(block, own(ea), own(eb), out_dtype)
    if leading is None:
      return reference.encode_sums(lax.psum(s, axes), ea, eb, out_dtype)
    rows = math.prod(s.shape[:leading])
    block = lax.psum_scatter(s.reshape(rows, -1), axes, scatter_dimension=0, tiled=True)
    start = lax.axis_index(axes) * block.shape[0]
    own = lambda e: e.reshape(()) if np.size(e) == 1 else lax.dynamic_slice_in_dim(
        jnp.broadcast_to(e, s.shape).reshape(rows, -1), start, block.shape[0])
    y = reference.encode_sums(block, own(ea), own(eb), out_dtype)
    if scatter_dimension is None:
      return lax.all_gather(y, axes, axis=0, tiled=True).reshape(s.shape)
    # Columns: the dimensions from ``leading`` on; device j takes block j of dimension d.
    y = y.reshape(block.shape[0], math.prod(s.shape[leading:d]), devices, -1)
    y = lax.all_to_all(y, axes, split_axis=2, concat_axis=0, tiled=True)
    return y.reshape(*s.shape[:d], s.shape[d] // devices, *s.shape[d + 1:])
