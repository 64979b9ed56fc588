"""``report``: the products a function runs, and what ``dfp_transform`` does with each."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np
from jax.extend import core

from dfpjax._jax_compat import CustomJVPTraced, hijax, short_dtype_name
from dfpjax.numerics.config import DFPConfig
from dfpjax.transform import recording
from dfpjax.transform.api import Transform, dfp_transform
from dfpjax.transform.interpreter import NOT_FLOATING, SiteRecord, floating_operands
from dfpjax.transform.names import NameStack, is_backward, module_path


class Report(list):
  """The :class:`SiteRecord` list of one function, printed as a table. ``numbers``: each
  record's site number in the recording (``diagnose`` matches its measurements by it)."""

  def __str__(self):
    header = ("#", "op", "pass", "path", "operands", "out", "mode", "reason")
    rows = [header] + [
        ("-" if r.index is None else str(r.index),
         r.primitive,
         r.role,
         r.path or "<top>",
         " x ".join(f"{_short(d)}{list(s)}" for s, d in zip(r.shapes, r.dtypes)),
         f"{_short(r.out_dtype)}{list(r.out_shape)}",
         r.mode,
         r.reason) for r in self]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = {m: sum(r.mode == m for r in self) for m in ("dfp", "float", "unchanged")}
    lines.append(f"{len(self)} sites: {counts['dfp']} dfp, {counts['float']} float, "
                 f"{counts['unchanged']} unchanged")
    return "\n".join(lines)


def _short(dtype) -> str:
  return short_dtype_name(np.dtype(dtype))


def report(fn: Callable, *args, config: DFPConfig | None = None, **kwargs) -> Report:
  """Lists the products that ``fn(*args, **kwargs)`` runs and what DFP does with each.

  ``fn`` is a function that calls ``dfp_transform`` results (one itself, ``jax.grad``,
  ``jax.jit``, ``jax.vmap``... of one, or a train step that calls one), or a plain
  function, reported as ``dfp_transform(fn, config)`` would run it (``config`` defaults
  to ``DFPConfig()``). ``fn`` is traced as it is and, if no transform ran in that trace,
  as ``dfp_transform(fn, config)``; every product in the traced program is listed: the
  sites that the transforms met while it was traced, the backward products that JAX or
  the DFP ops derived from them, the floating products outside any transform, and the DFP
  ops called directly (``dfp_dot_general``, ``dfp_conv_general_dilated``) with their
  gradients. ``config``, if given, replaces the transforms' own configs. The arguments
  may be ``jax.ShapeDtypeStruct``s: nothing is computed.

  One record per product in the traced program, in its order (a product in a loop body
  is listed once): primitive, operand and output shapes and dtypes, module path, pass
  (``role``: ``"forward"``, ``"backward"`` for a product that came from a transpose, or
  ``"backward-data"``/``"backward-weights"`` for the gradients of a site's lhs and rhs
  that differentiating it produced), mode (``"dfp"``, ``"float"`` or ``"unchanged"``)
  and the reason. A DFP op always computes both its gradients; XLA drops one whose result
  is unused. Sites in custom_jvp/custom_vjp rules are listed only when ``fn``
  differentiates them.
  """
  closed, _, recorder = trace_recorded(fn, args, kwargs, config)
  return sites_of(closed.jaxpr, recorder)


def trace_recorded(fn: Callable, args, kwargs, config: DFPConfig | None, probe=None):
  """``fn(*args, **kwargs)`` traced while a new recorder records (see ``report`` for the
  plain-function case): the closed jaxpr, its arguments and the recorder."""
  recorder = recording.Recorder(config, probe=probe)
  with recording.recording(recorder):
    closed, leaves = trace(fn, args, kwargs)
  if not recorder.calls:
    recorder = recording.Recorder(config, probe=probe)
    with recording.recording(recorder):
      closed, leaves = trace(dfp_transform(fn, config or DFPConfig()), args, kwargs)
  return closed, leaves, recorder


def trace(fn: Callable, args, kwargs):
  """``fn(*args, **kwargs)`` traced to a jaxpr, with the static arguments of the
  ``dfp_transform`` behind ``fn`` (if any) kept static; and the jaxpr's arguments."""
  transform = getattr(fn, "dfp_transform", None)
  static = isinstance(transform, Transform)
  nums = {i if i >= 0 else i + len(args) for i in transform.static_argnums} if static else set()
  names = set(transform.static_argnames) if static else set()
  dyn_args = [a for i, a in enumerate(args) if i not in nums]
  dyn_kwargs = {k: v for k, v in kwargs.items() if k not in names}

  def run(dyn_args, dyn_kwargs):
    it = iter(dyn_args)
    full_args = [a if i in nums else next(it) for i, a in enumerate(args)]
    return fn(*full_args, **{k: kwargs[k] if k in names else dyn_kwargs[k] for k in kwargs})

  return jax.make_jaxpr(run)(dyn_args, dyn_kwargs), jax.tree.leaves((dyn_args, dyn_kwargs))


# ---------------------------------------------------------------------------------------
# Sites in a traced program.
# ---------------------------------------------------------------------------------------

# A DFP op's derivatives are its own primitives (primitives/bilinear.py): ``dfp_tangent``
# (forward mode) and ``dfp_cotangent`` (the backward pass, both gradient products).
_DFP_PRODUCTS = {"dfp_dot_general", "dfp_conv", "dfp_tangent", "dfp_cotangent"}
_PRODUCTS = {"dot_general", "conv_general_dilated", "ragged_dot_general", *_DFP_PRODUCTS}
_OUTSIDE = "outside dfp_transform"
_DFP_GRADIENT = "gradient of a DFP site (cotangent quantized with config.gradient)"
_EXPLICIT = "a DFP op called directly"
_EXPLICIT_GRADIENT = "gradient of a DFP op called directly"


def sites_of(jaxpr: core.Jaxpr, recorder: recording.Recorder) -> Report:
  """The report of a program traced while ``recorder`` recorded: one record per product,
  found by the site scopes in its name stack (``recording``). A DFP site is listed once,
  with the pass where it first runs (a rematerialized forward runs again in the backward
  pass), and, if its gradient scope occurs, with its two gradients. A float site's own
  product is told from the products JAX's transpose rules derive from it by the pass.
  ``Report.numbers`` holds each record's site number (None outside any transform)."""
  out, numbers, seen = Report(), [], set()

  def add(record, number, key):
    if key in seen:
      return
    seen.add(key)
    index = None if record.mode == "unchanged" else sum(r.mode != "unchanged" for r in out)
    out.append(dataclasses.replace(record, index=index))
    numbers.append(number)

  for eqn, stack, parent in _walk(jaxpr):
    if eqn.primitive.name not in _PRODUCTS:
      continue
    found = recording.site_of(stack)
    if found is None:
      records = (_explicit(eqn, stack, parent) if eqn.primitive.name in _DFP_PRODUCTS
                 else [_outside(eqn, stack)])
      for record in records:
        add(record, None, (eqn, record.gradient))
      continue
    number, in_gradient = found
    site = recorder.records[number]
    if site.mode == "dfp" and in_gradient:
      for record in _dfp_gradients(site):
        add(record, number, (number, record.gradient))
    elif site.mode == "dfp":
      add(dataclasses.replace(site, direction="backward" if is_backward(stack) else site.direction),
          number, (number, None))
    elif is_backward(stack) == (site.direction == "backward"):
      add(site, number, (number, None))
    else:
      record = _float_gradient(site, eqn)
      add(record, number, (number, record.role, record.out_shape))
  out.numbers = numbers
  return out


# A custom_vjp (custom_jvp) as jax_custom_vjp3 (jax_custom_jvp3, JAX 0.11) stages it.
_CUSTOM_RULE_PRIMS = tuple(t for t in (hijax.CustomVJPTraced, CustomJVPTraced) if t is not None)


def _walk(jaxpr, name_stack=NameStack(), parent=None):
  """Yields (eqn, absolute name stack, the equation whose sub-jaxpr holds it or None) for
  every equation, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    stack = name_stack + eqn.source_info.name_stack
    yield eqn, stack, parent
    for value in eqn.params.values():
      if isinstance(value, _CUSTOM_RULE_PRIMS):
        value = value.traced.jaxpr
      for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, core.ClosedJaxpr):
          yield from _walk(v.jaxpr, stack, eqn)
        elif isinstance(v, core.Jaxpr):
          yield from _walk(v, stack, eqn)


def _record(primitive, operands, out, stack, mode, reason, direction=None,
            gradient=None) -> SiteRecord:
  """The record of a product of ``operands`` giving ``out`` (jaxpr variables) outside any
  site; its pass from ``stack`` unless ``direction`` is given."""
  avals = [v.aval for v in operands]
  return SiteRecord(None, primitive, tuple(tuple(a.shape) for a in avals),
                    tuple(np.dtype(a.dtype) for a in avals), np.dtype(out.aval.dtype),
                    tuple(out.aval.shape), module_path(stack),
                    direction or ("backward" if is_backward(stack) else "forward"), mode, reason,
                    gradient)


def _outside(eqn, stack) -> SiteRecord:
  floating = floating_operands([v.aval for v in eqn.invars[:2]])
  return _record(eqn.primitive.name, eqn.invars[:2], eqn.outvars[0], stack,
                 "float" if floating else "unchanged", _OUTSIDE if floating else NOT_FLOATING)


def _explicit(eqn, stack, parent) -> list[SiteRecord]:
  """The products of a DFP op called directly, not by a transform (bilinear.py's
  primitives), listed as a transform's DFP site is: its forward product, with the float
  operands and result of the custom_jvp call around the kernel's (``parent``, whose operands
  begin with the two floats), and its two gradients (``dfp_cotangent``: the cotangent, then
  the two floats); its tangent products (forward mode) count as the op's."""
  name = eqn.primitive.name
  if name == "dfp_cotangent":
    primitive = eqn.params["layout"].spec.primitive
    g, lhs, rhs = eqn.invars[:3]
    gradient = lambda operands, out, which: _record(primitive, operands, out, stack, "dfp",
                                                    _EXPLICIT_GRADIENT, "backward", which)
    return [gradient((g, rhs), eqn.outvars[0], "data"),
            gradient((g, lhs), eqn.outvars[1], "weights")]
  if name == "dfp_tangent":
    return []
  primitive = {"dfp_dot_general": "dot_general", "dfp_conv": "conv_general_dilated"}[name]
  operands, out = eqn.invars[:2], eqn.outvars[0]  # the kernel's view, where no call wraps it
  if (parent is not None and len(parent.invars) >= 2 and len(parent.outvars) == 1
      and floating_operands([v.aval for v in parent.invars[:2]])
      and math.prod(parent.outvars[0].aval.shape) == math.prod(out.aval.shape)):
    operands, out = parent.invars[:2], parent.outvars[0]
  return [_record(primitive, operands, out, stack, "dfp", _EXPLICIT)]


def _dfp_gradients(site: SiteRecord) -> list[SiteRecord]:
  """The two products of a DFP op's backward pass (spec section 4): the cotangent times
  the rhs gives the lhs's gradient, the cotangent times the lhs the rhs's."""
  (lhs, rhs), (lhs_dtype, rhs_dtype) = site.shapes, site.dtypes
  common = dict(direction="backward", reason=_DFP_GRADIENT)
  return [
      dataclasses.replace(site, shapes=(site.out_shape, rhs), dtypes=(site.out_dtype, rhs_dtype),
                          out_shape=lhs, out_dtype=lhs_dtype, gradient="data", **common),
      dataclasses.replace(site, shapes=(site.out_shape, lhs), dtypes=(site.out_dtype, lhs_dtype),
                          out_shape=rhs, out_dtype=rhs_dtype, gradient="weights", **common)]


def _float_gradient(site: SiteRecord, eqn) -> SiteRecord:
  """A product JAX's transpose rules derived from a site kept in float: the gradient of
  the operand that is not among its own operands, when that tells."""
  avals = [v.aval for v in eqn.invars[:2]]
  shapes = tuple(a.shape for a in avals)
  out = eqn.outvars[0].aval
  lhs, rhs = site.shapes[:2]
  gradient = None
  if shapes == site.shapes[:2] and tuple(out.shape) == site.out_shape:
    gradient = None  # the site itself, recomputed in the backward pass (remat)
  elif (rhs in shapes) != (lhs in shapes):
    gradient = "data" if rhs in shapes else "weights"
  elif math.prod(lhs) != math.prod(rhs) and math.prod(out.shape) in (math.prod(lhs),
                                                                      math.prod(rhs)):
    gradient = "data" if math.prod(out.shape) == math.prod(lhs) else "weights"
  return dataclasses.replace(site, shapes=shapes, dtypes=tuple(np.dtype(a.dtype) for a in avals),
                             out_shape=tuple(out.shape), out_dtype=np.dtype(out.dtype),
                             direction="backward", gradient=gradient)


__all__ = ["Report", "SiteRecord", "report"]
