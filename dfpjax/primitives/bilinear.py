"""Differentiation of the bilinear DFP ops (``dot_general``, ``conv_general_dilated``) in
every mode: reverse (spec section 4, bit for bit), forward, and higher order.

Design. A DFP op ``y = op(a, b)`` quantizes its operands, ``qa = Q(a)``, ``qb = Q(b)``
(integers: they carry no tangent, and ``dfp_quantize_p``'s JVP is zero), and calls
``dfp_product(a, b, qa, qb, key, spec)``, a ``jax.custom_jvp`` whose value is the exact
product of ``qa`` and ``qb``. Its JVP is the straight-through product rule: the quantizer
differentiates as the identity, so the tangent of ``y`` is

  ``ty = op(Qg(ta), qb) + op(qa, Qg(tb))``    (``dfp_tangent_p``)

DFP products of the tangents, each quantized with the gradient settings (``Qg``: bits,
rounding, per tensor; keys ``fold_in(key, 3)`` for ``ta`` and ``4`` for ``tb``), with the
*same* quantized partners as the forward. ``dfp_tangent_p`` is linear in ``(ta, tb)`` and
its transpose is ``dfp_cotangent_p``, today's backward pass unchanged: ``g`` quantized
with the gradient settings and key ``fold_in(key, 2)``, then the transposed products with
``qb`` and ``qa`` (``spec.cotangents``). So ``jax.grad`` (JVP, partial evaluation,
transposition) gives the spec's gradients bit for bit, and ``jax.jvp``, ``jax.jacfwd`` and
``jax.linearize`` give ``ty``. The transpose of ``dfp_cotangent_p`` is ``dfp_tangent_p``.

Higher order applies the same rules again. Both primitives are linear in their tangent or
cotangent operand; their derivative with respect to a quantized partner (straight-through,
through the partner's float ``a`` or ``b``, which they take for this purpose only) is the
same primitive with that partner replaced by its quantized tangent ``Qg(da)`` (keys
``fold_in(key, 5)`` for ``a``, ``6`` for ``b``). So ``jax.hessian`` (``jacfwd`` of
``jacrev``) and Hessian-vector products ``jvp(grad(f))`` are DFP products throughout. These
partner-tangent terms quantize a tangent, so they have no transpose: reverse over reverse
(``grad`` of ``grad``) raises ``NotImplementedError`` where it needs them.

The float operands ``a``, ``b`` are residuals of the linearized op that no computation
reads; under ``jit`` XLA drops them, so the backward pass keeps only the INT16 mantissas.

``spec`` is the op's frozen parameters with ``out_shape(lhs_shape, rhs_shape)``,
``product(qa, qb)``, ``cotangents(g, qa, qb, key) -> (da, db)``, ``gradient`` (its
QuantConfig), ``out_dtype``, ``lhs_dtype`` and ``rhs_dtype``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.interpreters import batching, mlir

from dfpjax._jax_compat import (ad, api_util, classic_custom_jvp, pe,
                                prim_requires_devices_during_lowering)
from dfpjax._jax_compat import core as core_lib
from dfpjax.numerics.floatbits import after
from dfpjax.numerics.quantization import DFPTensor
from dfpjax.primitives import reference, registry
from dfpjax.primitives.operands import fold_key
from dfpjax.primitives.quantize import quantize_operand

# Keys of the quantizations the rules add (0, 1: forward operands; 2: cotangent).
TANGENT_KEYS = (3, 4)
PARTNER_TANGENT_KEYS = (5, 6)

dfp_tangent_p = registry.new_primitive("dfp_tangent")
dfp_cotangent_p = registry.new_primitive("dfp_cotangent", multiple_results=True)


# ---------------------------------------------------------------------------------------
# Operands: [tangents...] a, b, qa.mantissa, qa.exponent, qb.mantissa, qb.exponent [key].
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
  spec: object
  channel_axes: tuple  # of qa, qb
  has_key: bool
  reference: bool  # traced in reference_mode: lower with the pure-XLA products
  tie: bool = False  # the cotangent's da waits for db's kernel call (_cotangent_value)


def _pack(a, b, qa: DFPTensor, qb: DFPTensor, key):
  keys = [] if key is None else [key]
  return [a, b, qa.mantissa, qa.exponent, qb.mantissa, qb.exponent, *keys]


def _unpack(operands, layout: _Layout):
  a, b, am, ae, bm, be, *key = operands
  ca, cb = layout.channel_axes
  return a, b, DFPTensor(am, ae, ca), DFPTensor(bm, be, cb), key[0] if layout.has_key else None


def _layout(spec, qa, qb, key, tie=False):
  return _Layout(spec, (qa.channel_axis, qb.channel_axis), key is not None,
                 reference.in_reference_mode(), tie)


def _quantize_tangent(t, spec, key) -> DFPTensor:
  return quantize_operand(t, dataclasses.replace(spec.gradient, granularity="tensor"), key)


def bind_tangent(ta, tb, a, b, qa, qb, key, spec):
  """``op(Qg(ta), qb) + op(qa, Qg(tb))``; ``ta`` or ``tb`` None where it is zero."""
  tangents = [t for t in (ta, tb) if t is not None]
  return dfp_tangent_p.bind(*tangents, *_pack(a, b, qa, qb, key), layout=_layout(spec, qa, qb, key),
                            present=(ta is not None, tb is not None), vmaps=())


def bind_cotangent(g, a, b, qa, qb, key, spec, tie=False):
  """Spec section 4: ``(da, db)`` from the cotangent ``g`` and the forward's ``qa``, ``qb``;
  ``tie`` where both are wanted (``_cotangent_value``)."""
  return dfp_cotangent_p.bind(g, *_pack(a, b, qa, qb, key),
                              layout=_layout(spec, qa, qb, key, tie), vmaps=())


# ---------------------------------------------------------------------------------------
# Values and shapes of the unbatched primitives.
# ---------------------------------------------------------------------------------------


def _mode(layout):
  return reference.reference_mode() if layout.reference else contextlib.nullcontext()


def _tangent_value(*operands, layout, present):
  n = sum(present)
  tangents = iter(operands[:n])
  a, b, qa, qb, key = _unpack(operands[n:], layout)
  spec = layout.spec
  with _mode(layout):
    terms = []
    ka, kb = (fold_key(key, n) for n in TANGENT_KEYS)
    if present[0]:
      terms.append(spec.product(_quantize_tangent(next(tangents), spec, ka), qb))
    if present[1]:
      terms.append(spec.product(qa, _quantize_tangent(next(tangents), spec, kb)))
    return functools.reduce(jnp.add, terms)


def _cotangent_value(g, *operands, layout):
  """``(da, db)``, with ``da`` (where ``layout.tie``) tied to the kernel calls of the rule (``registry.kernel_flags``):
  XLA cannot use ``da`` before the weight gradient's product has run, so it runs each layer's
  weight gradient in the layer, and that layer's INT16 operands die there, instead of keeping
  every layer's for weight gradients scheduled at the end. The flags come before any
  cross-device sum: a sharded step does not wait for it. Scheduling only: the same bits."""
  _, _, qa, qb, key = _unpack(operands, layout)
  if not layout.tie:
    with _mode(layout):
      return list(layout.spec.cotangents(g, qa, qb, key))
  with _mode(layout), registry.kernel_flags() as flags:
    da, db = layout.spec.cotangents(g, qa, qb, key)
  return [after(da, functools.reduce(jnp.logical_or, flags)), db]


def _tangent_abstract_eval(*operands, layout, present):
  """The primal product's type (shape, dtype, sharding, varying manual axes), which a
  custom_jvp's tangent must have: ``spec.product`` of the quantized partners, traced."""
  _, _, qa, qb, _ = _unpack(operands[sum(present):], layout)
  ca, cb = layout.channel_axes

  def product(am, ae, bm, be):
    return [layout.spec.product(DFPTensor(am, ae, ca), DFPTensor(bm, be, cb))]

  avals = (qa.mantissa, qa.exponent, qb.mantissa, qb.exponent)
  with _mode(layout):
    (out,) = pe.abstract_eval_fun(product, *avals,
                                  debug_info=api_util.debug_info("dfp_tangent", product, avals, {}))
  return out


def _cotangent_abstract_eval(g, a, b, *rest, layout):
  """The operands' types in the cotangents' dtypes: what transposition expects of them."""
  del g, rest
  return [a.update(dtype=layout.spec.lhs_dtype), b.update(dtype=layout.spec.rhs_dtype)]


# ---------------------------------------------------------------------------------------
# Differentiation: linear in the (co)tangent; a partner's tangent swaps in as the partner.
# ---------------------------------------------------------------------------------------


def _nonzero(t):
  return None if type(t) is ad.Zero else t


def _partner_swaps(operands, dots, layout):
  """For each partner with a tangent: ``(which, operands)`` with that partner (float and
  quantized) replaced by its tangent (and ``Qg`` of it)."""
  a, b, qa, qb, key = _unpack(operands, layout)
  da, db = (_nonzero(t) for t in dots[:2])
  ka, kb = (fold_key(key, n) for n in PARTNER_TANGENT_KEYS)
  swaps = []
  if da is not None:
    swaps.append((0, (da, b, _quantize_tangent(da, layout.spec, ka), qb, key)))
  if db is not None:
    swaps.append((1, (a, db, qa, _quantize_tangent(db, layout.spec, kb), key)))
  return swaps


def _sum_or_zero(terms, primal):
  return functools.reduce(jnp.add, terms) if terms else ad.p2tz(primal)


def _tangent_jvp(primals, dots, *, layout, present):
  n = sum(present)
  out = dfp_tangent_p.bind(*primals, layout=layout, present=present, vmaps=())
  spec, operands = layout.spec, primals[n:]
  terms = []
  lin, ts = iter(dots[:n]), iter(primals[:n])
  lin_ta, lin_tb = (_nonzero(next(lin)) if p else None for p in present)
  if lin_ta is not None or lin_tb is not None:  # linear in the tangents
    terms.append(bind_tangent(lin_ta, lin_tb, *_unpack(operands, layout), spec))
  ta, tb = (next(ts) if p else None for p in present)
  # a meets only tb, in op(qa, Qg(tb)); b only ta, in op(Qg(ta), qb).
  for which, swapped in _partner_swaps(operands, dots[n:], layout):
    if which == 0 and tb is not None:
      terms.append(bind_tangent(None, tb, *swapped, spec))
    if which == 1 and ta is not None:
      terms.append(bind_tangent(ta, None, *swapped, spec))
  return out, _sum_or_zero(terms, out)


def _cotangent_jvp(primals, dots, *, layout):
  g, operands = primals[0], primals[1:]
  out = dfp_cotangent_p.bind(*primals, layout=layout, vmaps=())
  spec = layout.spec
  terms = ([], [])
  if _nonzero(dots[0]) is not None:  # linear in the cotangent
    for ts, t in zip(terms, bind_cotangent(dots[0], *_unpack(operands, layout), spec)):
      ts.append(t)
  # da = opT(Qg(g), qb) meets b; db = opT(Qg(g), qa) meets a.
  for which, swapped in _partner_swaps(operands, dots[1:], layout):
    terms[1 - which].append(bind_cotangent(g, *swapped, spec)[1 - which])
  return out, [_sum_or_zero(ts, o) for ts, o in zip(terms, out)]


_NO_REVERSE_OVER_REVERSE = (
    "reverse mode over a derivative of a DFP op with respect to its quantized operand (e.g. "
    "jax.grad of jax.grad through both operands) is not defined: that term quantizes a tangent, "
    "which has no transpose. Forward over reverse (jax.hessian, jax.jvp of jax.grad) is; "
    "see docs/numerics.md, 'Forward mode and higher order'.")


def _tangent_transpose(ct, *operands, layout, present):
  n = sum(present)
  if any(ad.is_undefined_primal(x) for x in operands[n:]):
    raise NotImplementedError(_NO_REVERSE_OVER_REVERSE)
  nones = [None] * (len(operands) - n)
  if type(ct) is ad.Zero:
    return [None] * n + nones
  # Tied only where both gradients are wanted: with one operand not differentiated (frozen
  # weights), XLA must stay free to drop the other product.
  da, db = bind_cotangent(ct, *_unpack(operands[n:], layout), layout.spec, tie=all(present))
  return [c for c, p in zip((da, db), present) if p] + nones


def _cotangent_transpose(cts, g, *operands, layout):
  if any(ad.is_undefined_primal(x) for x in operands):
    raise NotImplementedError(_NO_REVERSE_OVER_REVERSE)
  ct_a, ct_b = (_nonzero(c) for c in cts)
  nones = [None] * len(operands)
  if ct_a is None and ct_b is None:
    return [None] + nones
  return [bind_tangent(ct_a, ct_b, *_unpack(operands, layout), layout.spec)] + nones


# ---------------------------------------------------------------------------------------
# vmap: a stack of batched-operand flags, outermost first, peeled by every rule.
# ---------------------------------------------------------------------------------------
#
# A batched primitive stays the primitive (with ``vmaps=((batched?...), *inner)``, batch axes
# at 0) rather than becoming its value's operations, so that a JVP or transposition applied
# after ``vmap`` (``jax.hessian``'s ``jacrev``, ``jvp`` of ``vmap``) still meets its rules:
# each rule of the batched primitive is ``jax.vmap`` of the rule one level in.


def _axes(flags):
  return [0 if f else None for f in flags]


def _unbatched(x, batched):
  return core_lib.mapped_aval(x.shape[0], 0, x) if batched else x


def _define(prim, value, abstract_eval, jvp_rule, transpose_rule):
  """Registers ``prim``'s lowering, shape, batching, JVP and transpose rules, each the
  unbatched rule wrapped to peel the ``vmaps`` stack (above). One function, longer than
  most, because the five wrappers share that one recursion and must stay in step."""
  multiple = prim.multiple_results

  def full_value(*operands, vmaps, **params):
    if not vmaps:
      return value(*operands, **params)
    inner = functools.partial(full_value, vmaps=vmaps[1:], **params)
    return jax.vmap(inner, in_axes=_axes(vmaps[0]))(*operands)

  def full_abstract_eval(*avals, vmaps, **params):
    if not vmaps:
      return abstract_eval(*avals, **params)
    size = next(a.shape[0] for a, f in zip(avals, vmaps[0]) if f)
    out = full_abstract_eval(*map(_unbatched, avals, vmaps[0]), vmaps=vmaps[1:], **params)
    grow = lambda o: core_lib.unmapped_aval(size, 0, o)
    return [grow(o) for o in out] if multiple else grow(out)

  def batch_rule(args, dims, *, vmaps, **params):
    flags = tuple(d is not None for d in dims)
    args = [batching.bdim_at_front(x, d, x.shape[d]) if f else x
            for x, d, f in zip(args, dims, flags)]
    out = prim.bind(*args, vmaps=(flags, *vmaps), **params)
    return out, ([0] * len(out) if multiple else 0)

  def full_jvp(primals, tangents, *, vmaps, **params):
    if not vmaps:
      return jvp_rule(primals, tangents, **params)
    flags, nonzero = vmaps[0], [type(t) is not ad.Zero for t in tangents]

    def inner(primals, some_tangents):
      it = iter(some_tangents)
      ts = [next(it) if n else ad.Zero(_unbatched(t.aval, f))
            for t, n, f in zip(tangents, nonzero, flags)]
      out, t_out = full_jvp(primals, ts, vmaps=vmaps[1:], **params)
      t_out = [ad.instantiate_zeros(t) for t in t_out] if multiple else ad.instantiate_zeros(t_out)
      return out, t_out

    some = [t for t, n in zip(tangents, nonzero) if n]
    return jax.vmap(inner, in_axes=(_axes(flags), [a for a, n in zip(_axes(flags), nonzero) if n]))(
        list(primals), some)

  def full_transpose(cts, *operands, vmaps, **params):
    if not vmaps:
      return transpose_rule(cts, *operands, **params)
    flags = vmaps[0]
    linear = [ad.is_undefined_primal(x) for x in operands]
    if all(type(c) is ad.Zero for c in (cts if multiple else [cts])):
      return [None] * len(operands)
    cts = [ad.instantiate_zeros(c) for c in cts] if multiple else ad.instantiate_zeros(cts)

    def inner(cts, known):
      it = iter(known)
      ops = [ad.UndefinedPrimal(_unbatched(x.aval, f)) if u else next(it)
             for x, u, f in zip(operands, linear, flags)]
      res = full_transpose(cts, *ops, vmaps=vmaps[1:], **params)
      return [ad.zeros_like_aval(x.aval) if r is None else ad.instantiate_zeros(r)
              for r, x, u in zip(res, ops, linear) if u]

    known = [x for x, u in zip(operands, linear) if not u]
    known_axes = [a for a, u in zip(_axes(flags), linear) if not u]
    res = iter(jax.vmap(inner, in_axes=(0, known_axes))(cts, known))
    # A linear operand without a batch axis gets the sum over the batch (as vmap's transpose).
    return [(r if f else r.sum(0)) if u else None
            for u, f, r in zip(linear, flags, (next(res) if u else None for u in linear))]

  prim.def_abstract_eval(full_abstract_eval)
  mlir.register_lowering(prim, mlir.lower_fun(full_value, multiple_results=multiple))
  # Its lowering lowers the product primitives, whose per-shard partitioning needs devices.
  prim_requires_devices_during_lowering.add(prim)
  batching.primitive_batchers[prim] = batch_rule
  ad.primitive_jvps[prim] = full_jvp
  ad.primitive_transposes[prim] = full_transpose


_define(dfp_tangent_p, _tangent_value, _tangent_abstract_eval, _tangent_jvp, _tangent_transpose)
_define(dfp_cotangent_p, _cotangent_value, _cotangent_abstract_eval, _cotangent_jvp,
        _cotangent_transpose)


# ---------------------------------------------------------------------------------------
# The differentiable product.
# ---------------------------------------------------------------------------------------


# A custom_jvp_call equation whatever the opt-in jax_custom_jvp3 says (it would stage a hijax
# one): the transform, report and the partitioner find the DFP ops by it.
@functools.partial(classic_custom_jvp, nondiff_argnums=(5,))
def dfp_product(a, b, qa: DFPTensor, qb: DFPTensor, key, spec):
  """``spec.product(qa, qb)``, differentiable in the floats ``a``, ``b`` that ``qa``, ``qb``
  quantize (straight-through, module docstring)."""
  del a, b, key
  return spec.product(qa, qb)


@functools.partial(dfp_product.defjvp, symbolic_zeros=True)
def _dfp_product_jvp(spec, primals, tangents):
  a, b, qa, qb, key = primals
  ta, tb = (None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents[:2])
  y = dfp_product(a, b, qa, qb, key, spec)  # again a custom_jvp call: higher order sees the rule
  if ta is None and tb is None:
    return y, jax.custom_derivatives.SymbolicZero(jax.typeof(y).to_tangent_aval())
  return y, bind_tangent(ta, tb, a, b, qa, qb, key, spec)
