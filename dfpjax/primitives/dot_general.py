"""DFP ``dot_general``: spec section 3 forward, section 4 gradients.

Two layers, each defined once:

* ``dfp_dot_general_p`` -- the exact product of already-quantized operands in a
  canonical batched-matrix form, with abstract evaluation, a batching rule, a CPU
  lowering to the C kernel through XLA FFI and a pure-XLA lowering elsewhere. Its
  inputs are integers, so it needs no differentiation rule of its own.
* ``dfp_dot_general`` -- the user-facing op with ``lax.dot_general``'s signature:
  quantizes, calls the primitive, and is differentiable in every mode through
  ``bilinear.dfp_product``: its backward ops are again DFP products of the quantized
  cotangent with the *same* quantized operands the forward used, its tangent the DFP
  products of the quantized tangents with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching

from dfpjax import cpu_ffi
from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import DFPTensor
from dfpjax.primitives import bilinear, partitioning, reference, registry
from dfpjax.primitives.operands import (check_dfp_operand, float_operands, fold_key,
                                        matching_manual_axes, output_dtype, partner_folded)
from dfpjax.primitives.quantize import quantize_operand
from dfpjax.primitives.registry import output_aval

# The primitive: exact product of quantized operands, canonical [B, M, K] x [B, K, N].
dfp_dot_general_p = registry.new_primitive("dfp_dot_general", multiple_results=True)

# ---------------------------------------------------------------------------------------
# Shape rule.
# ---------------------------------------------------------------------------------------


def _canonical_sizes(a_shape, b_shape, lhs_kmajor, rhs_nmajor):
  batch, m, k = (a_shape[0], a_shape[2], a_shape[1]) if lhs_kmajor else a_shape
  batch_b, k_b, n = (b_shape[0], b_shape[2], b_shape[1]) if rhs_nmajor else b_shape
  return batch, batch_b, m, k, k_b, n


def _abstract_eval(a, ea, b, eb, *, lhs_kmajor, rhs_nmajor, out_dtype):
  registry.check_integer_operands("dfp_dot_general_p", a, ea, b, eb)
  if a.ndim != 3 or b.ndim != 3 or ea.ndim != 2 or eb.ndim != 2:
    raise ValueError("dfp_dot_general_p takes rank-3 mantissas and rank-2 exponents")
  batch, batch_b, m, k, k_b, n = _canonical_sizes(a.shape, b.shape, lhs_kmajor, rhs_nmajor)
  if batch != batch_b or k != k_b:
    raise ValueError(f"dfp_dot_general_p: incompatible operands {a.shape} and {b.shape}")
  if ea.shape[0] not in (1, batch) or ea.shape[1] not in (1, m) or \
     eb.shape[0] not in (1, batch) or eb.shape[1] not in (1, n):
    raise ValueError(f"dfp_dot_general_p: exponent shapes {ea.shape}, {eb.shape} do not broadcast")
  return output_aval((batch, m, n), out_dtype, a, ea, b, eb,
                     spec=_output_spec(a, b, lhs_kmajor, rhs_nmajor))


def _output_spec(a, b, lhs_kmajor, rhs_nmajor):
  """The product's sharding in types: lhs's B and M, rhs's N unless its axes are taken."""
  a_f, b_f = _operand_axes(lhs_kmajor, rhs_nmajor)
  bs, ms = registry.spec_entry(a, a_f.index("b")), registry.spec_entry(a, a_f.index("m"))
  ns = registry.spec_entry(b, b_f.index("n"))
  taken = partitioning.axes_of(bs, ms, registry.spec_entry(a, a_f.index("k")))
  return bs, ms, None if set(partitioning.axes_of(ns)) & set(taken) else ns


# ---------------------------------------------------------------------------------------
# Batching.
# ---------------------------------------------------------------------------------------


def _to_front(x, bdim, size):
  return batching.bdim_at_front(x, bdim, size)


def _fold_into_rows(x, kmajor):
  """[v, B, R, K] -> [B, v*R, K] (or [v, B, K, R] -> [B, K, v*R] when ``kmajor``)."""
  v, batch, d1, d2 = x.shape
  if kmajor:
    return jnp.transpose(x, (1, 2, 0, 3)).reshape(batch, d1, v * d2)
  return jnp.transpose(x, (1, 0, 2, 3)).reshape(batch, v * d1, d2)


def _fold_exponent_into_rows(e, size, rows):
  """[v, Be, Re] -> [Be, v*rows]."""
  e = jnp.broadcast_to(e, (size, e.shape[1], rows))
  return jnp.transpose(e, (1, 0, 2)).reshape(e.shape[1], size * rows)


def _batch_rule(args, dims, *, lhs_kmajor, rhs_nmajor, out_dtype):
  a, ea, b, eb = args
  da, dea, db, deb = dims
  nm = None  # how batching marks an unmapped operand
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not nm)
  params = dict(lhs_kmajor=lhs_kmajor, rhs_nmajor=rhs_nmajor, out_dtype=out_dtype)
  lhs_mapped = da is not nm or dea is not nm
  rhs_mapped = db is not nm or deb is not nm
  batch, _, m, _, _, n = _canonical_sizes(
      a.shape if da is nm else np.delete(a.shape, da), b.shape if db is nm else np.delete(b.shape, db),
      lhs_kmajor, rhs_nmajor)
  if lhs_mapped and rhs_mapped:
    # Both sides vary: the mapped axis becomes part of the batch.
    def merge(x, d, is_exponent):
      x = _to_front(x, d, size)
      if is_exponent:
        x = jnp.broadcast_to(x, (size, batch, x.shape[2]))
      return x.reshape((size * x.shape[1],) + x.shape[2:])
    out, _ = dfp_dot_general_p.bind(merge(a, da, False), merge(ea, dea, True),
                                    merge(b, db, False), merge(eb, deb, True), **params)
    return out.reshape((size, batch, m, n)), 0
  if lhs_mapped:
    # Only the lhs varies: its copies stack along M, sharing the rhs (no copies of it).
    a2 = _fold_into_rows(_to_front(a, da, size), lhs_kmajor)
    ea2 = _fold_exponent_into_rows(_to_front(ea, dea, size), size, m)
    out, _ = dfp_dot_general_p.bind(a2, ea2, b, eb, **params)
    return out.reshape(batch, size, m, n), 1
  b2 = _fold_into_rows(_to_front(b, db, size), not rhs_nmajor)
  eb2 = _fold_exponent_into_rows(_to_front(eb, deb, size), size, n)
  out, _ = dfp_dot_general_p.bind(a, ea, b2, eb2, **params)
  return out.reshape(batch, m, size, n), 2


# ---------------------------------------------------------------------------------------
# Lowerings: the C kernel on CPU, its pure-XLA twin (``reference.dot``) elsewhere.
# ---------------------------------------------------------------------------------------


def _cpu_lowering(ctx, a, ea, b, eb, *, lhs_kmajor, rhs_nmajor, out_dtype):
  cpu_ffi.register()  # the output's types are the results'; a split's low bits an attribute
  return jax.ffi.ffi_lowering(cpu_ffi.DOT_GENERAL_TARGET)(
      ctx, a, ea, b, eb, lhs_kmajor=np.int32(lhs_kmajor), rhs_nmajor=np.int32(rhs_nmajor),
      **cpu_ffi.output_attributes(out_dtype))


# ---------------------------------------------------------------------------------------
# Partitioning: B, M and N stay split; a split K sums exact int64 partial sums.
# ---------------------------------------------------------------------------------------


def _operand_axes(lhs_kmajor, rhs_nmajor):
  """The canonical factors of a, b, ea, eb in their dimension order."""
  return ("b k m" if lhs_kmajor else "b m k").split(), ("b n k" if rhs_nmajor else "b k n").split()


def _exponent_factors(shape, factors, sizes, name):
  """An exponent's factors: the product's where its size matches, its own where it is 1."""
  return [f if size == sizes[f] else f"{name}{i}"
          for i, (f, size) in enumerate(zip(factors, shape))]


def _sharding_rule(shapes, *, lhs_kmajor, rhs_nmajor, out_dtype):
  del out_dtype
  a_f, b_f = _operand_axes(lhs_kmajor, rhs_nmajor)
  sizes = dict(zip(a_f, shapes[0])) | dict(zip(b_f, shapes[2]))
  ea_f = _exponent_factors(shapes[1], ("b", "m"), sizes, "ea")
  eb_f = _exponent_factors(shapes[3], ("b", "n"), sizes, "eb")
  return f"{' '.join(a_f)}, {' '.join(ea_f)}, {' '.join(b_f)}, {' '.join(eb_f)} -> b m n", ()


def _partition(mesh, specs, shapes, bind, *, wanted, lhs_kmajor, rhs_nmajor, out_dtype):
  """Keeps lhs's B, M, K and rhs's N splits (N's unless its axes are taken). A split K
  makes each device's kernel write its exact int64 partial sums, which one int64 sum adds
  before the single rounding, as one device would have summed them
  (``partitioning.sum_and_encode``); a result otherwise replicated comes out split as its
  consumer wants it where that splits one dimension over K's axes (a sharded weight's
  gradient)."""
  a_f, b_f = _operand_axes(lhs_kmajor, rhs_nmajor)
  split = dict(zip(a_f, specs[0]))
  taken = partitioning.axes_of(split["b"], split["m"], split["k"])
  n_spec = dict(zip(b_f, specs[2]))["n"]
  split["n"] = None if set(partitioning.axes_of(n_spec)) & set(taken) else n_spec
  sizes = dict(zip(a_f, shapes[0])) | dict(zip(b_f, shapes[2]))
  exponent_spec = lambda shape, fs: tuple(split[f] if n == sizes[f] else None
                                          for f, n in zip(fs, shape))
  arg_specs = (tuple(split[f] for f in a_f), exponent_spec(shapes[1], ("b", "m")),
               tuple(split[f] for f in b_f), exponent_spec(shapes[3], ("b", "n")))
  contracted = partitioning.axes_of(split["k"])
  scattered, result_spec = partitioning.split_as_wanted(wanted[0], contracted,
                                                        (split["b"], split["m"], split["n"]))

  per_shard = partitioning.product_per_shard(
      bind, lambda ea, eb: (ea[:, :, None], eb[:, None, :]), out_dtype, mesh, contracted,
      scattered, terms=lambda a, b: a.shape[1 if lhs_kmajor else 2])
  return per_shard, result_spec, arg_specs


registry.register(dfp_dot_general_p, abstract_eval=_abstract_eval, batch_rule=_batch_rule,
                  cpu_lowering=_cpu_lowering, xla_lowering=reference.dot,
                  sharding_rule=_sharding_rule, partition=_partition, flagged=True)

# ---------------------------------------------------------------------------------------
# Dimension numbers, handled by name.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DotDims:
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  lhs_ndim: int
  rhs_ndim: int

  @property
  def lhs_free(self):
    return tuple(d for d in range(self.lhs_ndim) if d not in self.lhs_contract + self.lhs_batch)

  @property
  def rhs_free(self):
    return tuple(d for d in range(self.rhs_ndim) if d not in self.rhs_contract + self.rhs_batch)

  @property
  def lax_dims(self):
    return ((self.lhs_contract, self.rhs_contract), (self.lhs_batch, self.rhs_batch))

  @property
  def lhs_channel_axis(self):
    """A per-channel lhs exponent runs along its last free axis (e.g. rows of activations)."""
    return self.lhs_free[-1] if self.lhs_free else None

  @property
  def rhs_channel_axis(self):
    """A per-channel rhs exponent runs along its last free axis (e.g. a Dense layer's outputs)."""
    return self.rhs_free[-1] if self.rhs_free else None

  def transpose_lhs(self):
    """Dims of ``d lhs = dot(g, rhs)``, and the permutation of its result into lhs order."""
    nb, nlf = len(self.lhs_batch), len(self.lhs_free)
    y_rhs_free = tuple(range(nb + nlf, nb + nlf + len(self.rhs_free)))
    dims = DotDims(y_rhs_free, self.rhs_free, tuple(range(nb)), self.rhs_batch,
                   nb + nlf + len(self.rhs_free), self.rhs_ndim)
    # Result axes: batch, lhs free, then rhs's remaining (contracting) axes in ascending order.
    contract = [lc for _, lc in sorted(zip(self.rhs_contract, self.lhs_contract))]
    return dims, _into_operand_order(self.lhs_ndim, self.lhs_batch, self.lhs_free, contract)

  def transpose_rhs(self):
    """Dims of ``d rhs = dot(lhs, g)``, and the permutation of its result into rhs order.

    lhs comes first so that the result's axes are already in rhs order wherever rhs's
    contracting axes precede its free ones (a dense layer's kernel): the kernel then writes the
    weight gradient as it lies, and XLA transposes nothing (``dot(g^T, lhs)`` then a transpose:
    5x slower for a 25088 x 4096 kernel, with its update)."""
    nb, nlf = len(self.lhs_batch), len(self.lhs_free)
    g_lhs_free = tuple(range(nb, nb + nlf))
    dims = DotDims(self.lhs_free, g_lhs_free, self.lhs_batch, tuple(range(nb)), self.lhs_ndim,
                   nb + nlf + len(self.rhs_free))
    # Result axes: batch, lhs's remaining (contracting) axes in ascending order, then rhs free.
    contract = [rc for _, rc in sorted(zip(self.lhs_contract, self.rhs_contract))]
    return dims, _into_operand_order(self.rhs_ndim, self.rhs_batch, contract, self.rhs_free)


def _into_operand_order(ndim, *blocks) -> tuple:
  """The permutation of a gradient product's result into its operand's axis order, the
  result's axes being the operand's axes ``blocks`` (batch first), one block after another."""
  position = {d: i for i, d in enumerate(d for block in blocks for d in block)}
  return tuple(position[d] for d in range(ndim))


def _canonical_dims(dimension_numbers, lhs_shape, rhs_shape) -> DotDims:
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
  except (TypeError, ValueError) as err:
    raise ValueError(
        "dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
        f"got {dimension_numbers!r}") from err
  for name, dims, ndim in (("lhs", lc + lb, len(lhs_shape)), ("rhs", rc + rb, len(rhs_shape))):
    if any(not 0 <= d < ndim for d in dims) or len(set(dims)) != len(dims):
      raise ValueError(f"dfp_dot_general: {name} contracting/batch dimensions {dims} are out of "
                       f"range or repeated for a rank-{ndim} operand")
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError("dfp_dot_general: lhs and rhs need as many contracting (and batch) dimensions, "
                     f"got {dimension_numbers}")
  for kind, ls, rs in (("contracting", lc, rc), ("batch", lb, rb)):
    for l, r in zip(ls, rs):
      if lhs_shape[l] != rhs_shape[r]:
        raise ValueError(f"dfp_dot_general: {kind} dimension sizes differ: lhs axis {l} has "
                         f"{lhs_shape[l]}, rhs axis {r} has {rhs_shape[r]}")
  return DotDims(lc, rc, lb, rb, len(lhs_shape), len(rhs_shape))


# ---------------------------------------------------------------------------------------
# Exact product of two DFP tensors under general dimension numbers.
# ---------------------------------------------------------------------------------------


def _as_matrix(x, batch, free, contract, free_first):
  """Transposes x to (batch, free, contract) or (batch, contract, free) and flattens to rank 3.

  Picks the order that is already x's layout when there is one, so XLA moves no data.
  """
  shape = x.shape
  b, f, c = (math.prod(shape[d] for d in ds) for ds in (batch, free, contract))
  by_free = batch + free + contract
  by_contract = batch + contract + free
  use_free_first = free_first if by_free != by_contract else True
  if by_contract == tuple(range(x.ndim)) and by_free != tuple(range(x.ndim)):
    use_free_first = False
  elif by_free == tuple(range(x.ndim)):
    use_free_first = True
  perm = by_free if use_free_first else by_contract
  x = jnp.transpose(x, perm)
  return x.reshape((b, f, c) if use_free_first else (b, c, f)), use_free_first


def _exponent_row(t: DFPTensor, free, shape):
  """The exponent as [1, prod(free)] (channel) or [1, 1] (tensor)."""
  if t.channel_axis is None:
    return jnp.reshape(t.exponent, (1, 1))
  free_shape = tuple(shape[d] for d in free)
  return jnp.broadcast_to(t.exponent, free_shape).reshape(1, -1)


def exact_dot(qa: DFPTensor, qb: DFPTensor, dims: DotDims, out_dtype):
  """``fl(dot_general(ma, mb)) * 2**(ea + eb)`` (spec section 3) for quantized operands."""
  lf, rf = dims.lhs_free, dims.rhs_free
  a3, a_free_first = _as_matrix(qa.mantissa, dims.lhs_batch, lf, dims.lhs_contract, True)
  b3, b_free_first = _as_matrix(qb.mantissa, dims.rhs_batch, rf, dims.rhs_contract, False)
  y = registry.product(dfp_dot_general_p, reference.dot, a3, _exponent_row(qa, lf, qa.shape), b3,
                       _exponent_row(qb, rf, qb.shape), lhs_kmajor=not a_free_first,
                       rhs_nmajor=b_free_first, out_dtype=np.dtype(out_dtype))
  out_shape = (tuple(qa.shape[d] for d in dims.lhs_batch) + tuple(qa.shape[d] for d in lf)
               + tuple(qb.shape[d] for d in rf))
  return y.reshape(out_shape)


# ---------------------------------------------------------------------------------------
# Differentiation: spec section 4 and the tangent rules, through ``bilinear``.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A ``dfp_dot_general`` call's static parameters and its products (``bilinear``)."""
  primitive: ClassVar[str] = "dot_general"  # the float product it stands for (report)
  dims: DotDims
  forward: QuantConfig
  gradient: QuantConfig
  out_dtype: np.dtype
  lhs_dtype: np.dtype  # the cotangents' types
  rhs_dtype: np.dtype

  def out_shape(self, lhs_shape, rhs_shape):
    d = self.dims
    return (tuple(lhs_shape[i] for i in d.lhs_batch) + tuple(lhs_shape[i] for i in d.lhs_free)
            + tuple(rhs_shape[i] for i in d.rhs_free))

  def product(self, qa: DFPTensor, qb: DFPTensor):
    return exact_dot(qa, qb, self.dims, self.out_dtype)

  def cotangents(self, g, qa: DFPTensor, qb: DFPTensor, key):
    """Spec section 4: ``(d lhs, d rhs)`` from cotangent ``g`` and the forward's ``qa``, ``qb``."""
    dims = self.dims
    nb, nlf = len(dims.lhs_batch), len(dims.lhs_free)
    key_g = fold_key(key, 2)

    # d lhs = dot(g, rhs): all of rhs's free axes (its channel axis among them) are
    # contracted, so rhs's exponent is folded into g before g is quantized.
    da_dims, da_perm = dims.transpose_lhs()
    g_q, rhs_m = partner_folded(g, qb, g.ndim - 1, self.gradient, key_g)
    da = exact_dot(g_q, rhs_m, da_dims, self.lhs_dtype)

    # d rhs = dot(lhs, g): lhs's free axes are contracted, so lhs's exponent is folded into g.
    db_dims, db_perm = dims.transpose_rhs()
    g_q2, lhs_m = partner_folded(g, qa, nb + nlf - 1, self.gradient, key_g)
    db = exact_dot(lhs_m, g_q2, db_dims, self.rhs_dtype)
    return jnp.transpose(da, da_perm), jnp.transpose(db, db_perm)


def _quantize_operand(x, cfg, key, axis):
  if axis is None and cfg.granularity == "channel":
    cfg = dataclasses.replace(cfg, granularity="tensor")  # no free axis to carry a channel
  return quantize_operand(x, cfg, key, axis)


def _dfp_dot(lhs, rhs, key, spec: _Spec):
  qa = _quantize_operand(lhs, spec.forward, fold_key(key, 0), spec.dims.lhs_channel_axis)
  qb = _quantize_operand(rhs, spec.forward, fold_key(key, 1), spec.dims.rhs_channel_axis)
  return bilinear.dfp_product(lhs, rhs, qa, qb, key, spec)

# ---------------------------------------------------------------------------------------
# The op.
# ---------------------------------------------------------------------------------------


def _dot_of_quantized(lhs, rhs, dimension_numbers, preferred_element_type, config, key):
  """Spec section 3 from its second step, for operands quantized beforehand."""
  if not (isinstance(lhs, DFPTensor) and isinstance(rhs, DFPTensor)):
    raise TypeError("dfp_dot_general: pass both operands as float arrays or both as DFPTensors, "
                    f"got {type(lhs).__name__} and {type(rhs).__name__}")
  if config is not None or key is not None:
    raise ValueError("dfp_dot_general: config and key choose how float operands are quantized; "
                     "DFPTensor operands are used as they are")
  check_dfp_operand(lhs, "lhs", "dfp_dot_general")
  check_dfp_operand(rhs, "rhs", "dfp_dot_general")
  dims = _canonical_dims(dimension_numbers, lhs.shape, rhs.shape)
  for name, t, free in (("lhs", lhs, dims.lhs_free), ("rhs", rhs, dims.rhs_free)):
    if t.channel_axis is not None and (not free or t.channel_axis != free[-1]):
      raise ValueError(f"dfp_dot_general: a per-channel {name} DFPTensor needs its channel axis "
                       f"to be its last free axis ({free[-1] if free else 'it has none'}), got "
                       f"{t.channel_axis}")
  return exact_dot(lhs, rhs, dims, output_dtype(preferred_element_type, "dfp_dot_general"))


def dfp_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                    config: DFPConfig | None = None, key=None):
  """``jax.lax.dot_general`` computed in DFP (spec sections 3 and 4).

  Both operands are quantized to DFP with ``config.forward`` (per tensor by default;
  with channel granularity, along each operand's last free axis), multiplied exactly
  over the integers and scaled once into the output type. Gradients are DFP products
  of the cotangent, quantized with ``config.gradient``, and the forward's quantized
  operands; tangents (``jax.jvp``, ``jax.hessian``) are DFP products of the tangents,
  quantized likewise, and those operands (docs/numerics.md, "Forward mode and higher order").

  Operands quantized beforehand (both :class:`dfpjax.DFPTensor`, e.g. from
  :func:`dfpjax.quantize`; a per-channel one along its last free axis) are multiplied as
  they are: the exact product of their mantissas, scaled once. That product has no
  gradient (its inputs are integers), and ``config`` and ``key`` must be left unset.

  Args:
    lhs, rhs: float32, bfloat16 or float16 arrays, or two DFPTensors.
    dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
    precision: accepted for signature compatibility; DFP fixes its own precision.
    preferred_element_type: a floating output dtype (default float32).
    config: a :class:`dfpjax.DFPConfig` (default: the paper's 16-bit per-tensor DFP).
    key: a ``jax.random`` key, required when a rounding is stochastic.
  """
  del precision
  if isinstance(lhs, DFPTensor) or isinstance(rhs, DFPTensor):
    return _dot_of_quantized(lhs, rhs, dimension_numbers, preferred_element_type, config, key)
  lhs, rhs, config = float_operands("dfp_dot_general", lhs, rhs, config, key)
  dims = _canonical_dims(dimension_numbers, lhs.shape, rhs.shape)
  spec = _Spec(dims, config.forward, config.gradient,
               output_dtype(preferred_element_type, "dfp_dot_general"), np.dtype(lhs.dtype),
               np.dtype(rhs.dtype))
  lhs, rhs = matching_manual_axes(lhs, rhs)
  return _dfp_dot(lhs, rhs, key if config.needs_key else None, spec)
