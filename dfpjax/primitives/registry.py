"""What every DFP primitive shares: its creation, an eager ``impl`` through a jitted
bind, the registration of its rules, and the checks and output type of its shape rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend import core
from jax.interpreters import batching, mlir

from dfpjax._jax_compat import ShapedArray, get_cur_mesh_sharding


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


def register(p: core.Primitive, *, abstract_eval, batch_rule, cpu_lowering, xla_lowering):
  """Defines ``p``'s shape rule and batching rule, its lowering on CPU (the C kernel through
  XLA FFI) and on every other platform (``xla_lowering``, its pure-XLA twin)."""
  p.def_abstract_eval(abstract_eval)
  batching.primitive_batchers[p] = batch_rule
  mlir.register_lowering(p, cpu_lowering, platform="cpu")
  mlir.register_lowering(p, mlir.lower_fun(xla_lowering, multiple_results=p.multiple_results))


def check_integer_operands(op: str, x, ex, y, ey) -> None:
  """The shape rule's type check of a product's mantissas ``x, y`` and exponents ``ex, ey``."""
  if x.dtype != jnp.int16 or y.dtype != jnp.int16 or ex.dtype != jnp.int32 or ey.dtype != jnp.int32:
    raise TypeError(f"{op} takes int16 mantissas and int32 exponents, got "
                    f"{x.dtype}, {ex.dtype}, {y.dtype}, {ey.dtype}")


def output_aval(shape, dtype, *operands) -> ShapedArray:
  """A DFP primitive's output type: varying over the manual axes its operands vary over."""
  varying = frozenset().union(*(a.mat.varying for a in operands))
  if not varying:
    return ShapedArray(shape, dtype)
  return ShapedArray(shape, dtype, sharding=get_cur_mesh_sharding(),
                     manual_axis_type=operands[0].mat.update(varying=varying))
