"""What every DFP primitive shares: its creation, an eager ``impl`` through a jitted
bind, the registration of its rules, and the checks and output type of its shape rule; and
``product``, the one binding of a product primitive (or its pure-XLA twin), which hands
``kernel_flags`` the flag of each kernel call's output."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from dfpjax._jax_compat import ShapedArray, get_cur_mesh_sharding
from dfpjax.primitives import partitioning, reference

# The flag lists of the active ``kernel_flags`` blocks, innermost last.
_COLLECTING: list[list] = []
# Each product primitive's kernel call that returns its exact sums in two parts.
_SPLIT_KERNELS: dict = {}


def new_primitive(name: str, *, multiple_results: bool = False) -> core.Primitive:
  """A primitive that runs eagerly by compiling its own bind (its lowering)."""
  p = core.Primitive(name)
  p.multiple_results = multiple_results
  p.def_impl(functools.partial(_impl, p))
  return p


def _impl(p, *args, **params):
  return _jitted_bind(p, **params)(*args)


@functools.cache
def _jitted_bind(p, **params):
  return jax.jit(functools.partial(p.bind, **params))


def register(p: core.Primitive, *, abstract_eval, batch_rule, cpu_lowering, xla_lowering,
             sharding_rule, partition, flagged=False):
  """Defines ``p``'s shape rule and batching rule, its lowering on CPU and on every other
  platform (``xla_lowering``, its pure-XLA twin, which XLA partitions itself).

  On CPU, ``p`` lowers to the C kernel through XLA FFI (``cpu_lowering``) once per shard:
  ``sharding_rule`` and ``partition`` say how (``partitioning.register_cpu_lowering``); a
  product's kernel call may return its exact sums in two parts (``cpu_ffi.SplitSums``).

  ``flagged`` (the products, ``p`` created with ``multiple_results``): the rules define the
  product ``y``, and ``p`` returns ``[y, flag]``, the flag ``partitioning.first_false`` of the
  kernel call's output, on CPU taken on each device before the collectives that finish a
  sharded result (``partitioning.product_per_shard``), elsewhere and under ``vmap`` of ``y``.
  ``product`` hands the flags to ``kernel_flags``; XLA drops those nothing uses.
  """
  kernel = core.Primitive(p.name + "_shard")  # the FFI call on one device's operands
  kernel.multiple_results = p.multiple_results and not flagged
  kernel.def_abstract_eval(abstract_eval)
  mlir.register_lowering(kernel, cpu_lowering, platform="cpu")
  split_kernel = None
  if flagged:  # a product: its exact sums can also come split in two parts
    split_kernel = core.Primitive(p.name + "_split_shard")
    split_kernel.multiple_results = True
    split_kernel.def_abstract_eval(functools.partial(_split_abstract_eval, abstract_eval))
    mlir.register_lowering(split_kernel, cpu_lowering, platform="cpu")
    _SPLIT_KERNELS[p] = split_kernel
    abstract_eval, batch_rule, xla_lowering = _flagged(abstract_eval, batch_rule, xla_lowering)
  p.def_abstract_eval(abstract_eval)
  batching.primitive_batchers[p] = batch_rule
  partitioning.register_cpu_lowering(p, kernel, sharding_rule, partition, flagged=flagged,
                                     split_kernel=split_kernel)
  mlir.register_lowering(p, mlir.lower_fun(xla_lowering, multiple_results=p.multiple_results))


def split_kernel(p: core.Primitive) -> core.Primitive:
  """Product ``p``'s kernel call on one device's operands with a ``cpu_ffi.SplitSums``
  ``out_dtype``: it returns the exact sums' int32 high parts and their low parts (CPU only)."""
  return _SPLIT_KERNELS[p]


def _split_abstract_eval(abstract_eval, *avals, out_dtype, **params):
  """A product's exact sums as ``cpu_ffi.SplitSums`` ``out_dtype`` gives them: int32 high parts
  and the low parts, each shaped as the int64 sums."""
  sums = abstract_eval(*avals, out_dtype=np.dtype(np.int64), **params)
  return [sums.update(dtype=np.dtype(np.int32)), sums.update(dtype=np.dtype(out_dtype.low_dtype))]


def _flagged(abstract_eval, batch_rule, xla_lowering):
  """The rules of a product's ``y`` as rules of ``[y, flag]``."""
  def flagged_abstract_eval(*avals, **params):
    return [abstract_eval(*avals, **params), output_aval((), np.dtype(bool), *avals)]

  def flagged_batch_rule(args, dims, **params):
    y, d = batch_rule(args, dims, **params)
    return [y, partitioning.first_false(y)], [d, None]

  def flagged_xla_lowering(*args, **params):
    y = xla_lowering(*args, **params)
    return [y, partitioning.first_false(y)]

  return flagged_abstract_eval, flagged_batch_rule, flagged_xla_lowering


@contextlib.contextmanager
def kernel_flags():
  """A list that collects, for each product bound through ``product`` inside the block, its
  flag (a scalar ``False``, ``floatbits.false_from``) that exists once that product's kernel
  call has run: where the product contracts a dimension split over devices, before its
  partial sums are added across them. ``floatbits.after`` ties a value to it."""
  flags = []
  _COLLECTING.append(flags)
  try:
    yield flags
  finally:
    _COLLECTING.pop()


def product(p, reference_fn, *args, **params):
  """The product ``y`` of ``p.bind(*args, **params)``, or of ``reference_fn`` (its exact pure-XLA
  twin) in ``reference.reference_mode``; inside ``kernel_flags`` its flag collected."""
  if reference.in_reference_mode():
    y = reference_fn(*args, **params)
    flag = partitioning.first_false(y)
  else:
    y, flag = p.bind(*args, **params)
  if _COLLECTING:
    _COLLECTING[-1].append(flag)
  return y


def check_integer_operands(op: str, x, ex, y, ey) -> None:
  """The shape rule's type check of a product's mantissas ``x, y`` and exponents ``ex, ey``."""
  if x.dtype != jnp.int16 or y.dtype != jnp.int16 or ex.dtype != jnp.int32 or ey.dtype != jnp.int32:
    raise TypeError(f"{op} takes int16 mantissas and int32 exponents, got "
                    f"{x.dtype}, {ex.dtype}, {y.dtype}, {ey.dtype}")


def output_aval(shape, dtype, *operands, spec=()) -> ShapedArray:
  """A DFP primitive's output type: varying over the manual axes its operands vary over, or,
  where the operands' types carry shardings over a mesh with explicit axes (the default of
  ``jax.make_mesh``), sharded as ``spec`` says (partition-spec entries per dimension)."""
  varying = frozenset().union(*(a.mat.varying for a in operands))
  if varying:
    return ShapedArray(shape, dtype, sharding=get_cur_mesh_sharding(),
                       manual_axis_type=operands[0].mat.update(varying=varying))
  mesh = next((a.sharding.mesh for a in operands if not a.sharding.mesh.empty), None)
  if mesh is None:
    return ShapedArray(shape, dtype)
  return ShapedArray(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))


def spec_entry(aval, dim: int):
  """The partition-spec entry of ``aval``'s dimension ``dim`` in its type (None if none)."""
  spec = tuple(aval.sharding.spec)
  return spec[dim] if dim < len(spec) else None
