"""``recompute``: a function whose floating products' outputs, and what is computed from them,
the backward pass recomputes from the products' INT16 operands instead of keeping them.

JAX's ``jax.checkpoint`` saves the values its policy names and recomputes the rest in the
backward pass, but XLA:CPU removes the optimization barriers that keep that recomputation
there, and its schedule runs it in the forward pass, next to the values it recomputes, so the
memory stays the same (docs/performance.md, "Memory of the ResNet-50 DFP step"). Under
``dfp_transform`` a ``recompute`` region is differentiated as a ``jax.custom_vjp`` instead:
its forward pass is ``jax.vjp`` of ``jax.checkpoint(region, policy)``, and its backward pass
ties the small saved values (scalars and per-channel values, the DFP operands' exponents among
them) to the incoming cotangent (``numerics.after``) before it runs the recomputation, which
then cannot start before the cotangent exists. The recomputed products are the same DFP
products on the same INT16 operands, so every bit is the one the forward pass computed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dfpjax.numerics.floatbits import after
from dfpjax.primitives.partitioning import first_false
from dfpjax.primitives.quantize import dfp_quantize_given_max_p, dfp_quantize_p


@dataclasses.dataclass(frozen=True)
class RecomputePolicy:
  """A ``jax.checkpoint`` policy: saves the DFP products' quantized operands (the kernel's
  quantizations, and the int16 mantissas of the XLA quantization) and the INT16 reshapes the
  products take of them (views, free to keep), every value computed from operands of at most
  one dimension (per-channel statistics, exponents), and the values named by
  ``jax.ad_checkpoint.checkpoint_name`` in ``saved_names``; recomputes everything else.
  ``dfp_transform`` recognises a ``jax.checkpoint`` with this policy as a ``recompute``
  region."""
  saved_names: tuple[str, ...] = ()

  def __call__(self, prim, *avals, **params) -> bool:
    if prim in (dfp_quantize_p, dfp_quantize_given_max_p):
      return True
    if prim.name == "convert_element_type":
      return np.dtype(params["new_dtype"]) == np.int16 or all(a.ndim <= 1 for a in avals)
    if prim.name == "reshape":  # recomputed, a split weight's would be all-gathered again
      return avals[0].dtype == np.int16
    if prim.name == "name":  # jax.ad_checkpoint.checkpoint_name
      return params["name"] in self.saved_names
    return all(getattr(a, "ndim", 0) <= 1 for a in avals)


def recompute(fn: Callable, saved_names=()) -> Callable:
  """``fn`` whose floating products' outputs, and what is computed from them, the backward
  pass recomputes instead of keeping them (``RecomputePolicy`` says what it saves).

  Under ``dfp_transform``, the region's products are DFP products whose backward passes keep
  their INT16 operands anyway, the recomputation is the same DFP products on those operands
  (the same bits), and it runs in the backward pass (see the module docstring). Outside
  ``dfp_transform`` it is ``jax.checkpoint(fn, policy=RecomputePolicy(saved_names))``: the same
  values, but XLA:CPU may move the recomputation into the forward pass.

  A value the backward pass needs from outside the region (a mask of a later ReLU, say) is
  computed from the region's outputs, which then stay alive: end the region where the
  backward pass needs nothing more than it saves.
  """
  return jax.checkpoint(fn, policy=RecomputePolicy(tuple(saved_names)))


def tied_to_cotangent(fn: Callable, policy: RecomputePolicy) -> Callable:
  """``fn`` (flat arrays in, flat list out) as a ``jax.custom_vjp`` whose forward pass saves
  what ``jax.checkpoint(fn, policy)`` saves and whose backward pass recomputes the rest once
  the cotangent exists (the module docstring).

  No optimization barrier (``prevent_cse=False``): on a split weight the partitioner would
  all-gather the barrier's copy of its INT16 mantissas again for the recomputed product (11
  more all-gathers in the sharded ResNet-18 step), where without it the recomputation takes
  the forward pass's gathered weight. The tie to the cotangent keeps the recomputation apart
  (XLA:CPU removes barriers before its last CSE anyway)."""
  checkpointed = jax.checkpoint(fn, policy=policy, prevent_cse=False)

  @jax.custom_vjp
  def region(*args):
    return fn(*args)

  def region_fwd(*args):
    return jax.vjp(checkpointed, *args)

  def region_bwd(vjp, cotangents):
    # The cotangent of a floating or complex output (JAX calls this only where there is one):
    # its first element's real part; a scalar reduction across devices where the batch is split.
    cotangent = next(c for c in cotangents if jnp.issubdtype(c.dtype, jnp.inexact))
    flag = first_false(jnp.real(cotangent))
    leaves, tree = jax.tree.flatten(vjp)
    leaves = [after(x, flag) if _small_number(x) else x for x in leaves]
    return tuple(jax.tree.unflatten(tree, leaves)(cotangents))

  region.defvjp(region_fwd, region_bwd)
  return region


def _small_number(x) -> bool:
  """A scalar or a vector of numbers (not a key), which ``after`` ties at no cost."""
  return x.ndim <= 1 and any(jnp.issubdtype(x.dtype, t) for t in (jnp.integer, jnp.floating))
