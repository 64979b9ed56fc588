"""The jaxpr interpreter behind ``dfp_transform``.

``eval_jaxpr`` follows ``jax._src.core.eval_jaxpr``: every equation is bound with
``primitive.get_bind_params(params)`` under its own source info (name stack,
traceback) and context, except

* the DFP sites, floating ``dot_general`` and ``conv_general_dilated``, which become
  ``dfp_dot_general`` / ``dfp_conv_general_dilated`` unless the config keeps them, and
  ``ragged_dot_general``, which runs as it is; while ``report`` or ``diagnose`` records
  (``recording``), each is also recorded and bound under its own named scope;
* higher-order primitives, whose sub-jaxprs are rewritten by this same interpreter and
  bound again, one rule per primitive (``_HIGHER_ORDER_RULES``);
* a ``jax.custom_vjp`` staged as a hijax ``call_hi_primitive`` (under
  ``jax_custom_vjp3``), bound again as a custom_vjp whose primal, fwd and bwd are
  rewritten;
* any other primitive that carries a computation (a jaxpr or a traceable function in
  its params), and any other hijax primitive, which raise ``NotImplementedError``
  rather than run unrewritten.

Stochastic rounding: a ``Scope`` carries a key and a site counter. The i-th floating
``dot_general``/``conv_general_dilated`` it meets (rewritten or kept) uses
``fold_in(key, i)``. A loop body's key is the enclosing one folded with the iteration
counter. A custom_jvp/custom_vjp call takes one number n and its rules count afresh, with
key ``fold_in(fold_in(key, n), 0)`` for the primal function, its fwd and its jvp rule and
``fold_in(fold_in(key, n), 1)`` for bwd, so that a site gets the same key whether JAX
runs the primal function or the rule. Keys enter every sub-computation as explicit
operands, never as closed-over tracers: custom rules are traced lazily, when AD needs
them, possibly after the trace that owned the key has ended.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import api_util, core, source_info_util
from jax._src import linear_util as lu
from jax._src.ad_util import SymbolicZero, Zero
from jax._src import hijax
from jax._src.custom_derivatives import CustomVJPPrimal
from jax._src.hijax import call_hi_primitive_p
from jax._src.interpreters import ad
from jax._src.interpreters import partial_eval as pe
from jax._src.lax.control_flow.common import _merge_common_consts
from jax._src.lax.lax import ragged_dot_general_p
from jax._src.shard_map import shard_map_p
from jax._src.sharding_impls import UNSPECIFIED
from jax._src.tree_util import FlatTree
from jax.extend.core import primitives as prims

import dfpjax
from dfpjax.numerics import floatbits
from dfpjax.numerics.config import DFPConfig
from dfpjax.transform import recording
from dfpjax.transform.names import is_backward, module_path

NameStack = source_info_util.NameStack

# ---------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteRecord:
  """One product (``dot_general``, ``conv_general_dilated``, ``ragged_dot_general``) in
  ``report``'s list: a site the interpreter met, a product derived from one, or one run
  outside any transform.

  Attributes:
    index: the product's position among the floating ones listed, in order; None when
      the operands are not floating point.
    primitive: the primitive's name.
    shapes, dtypes: of the operands.
    out_dtype: the equation's output type (the DFP op's ``preferred_element_type``).
    out_shape: the output's shape. In the backward pass it tells an input gradient (the
      forward input's shape) from a weight gradient (the weight's, up to a transpose).
    path: the module path (see ``names.module_path``).
    direction: ``"backward"`` when the equation came from a transpose or runs in a custom
      rule's backward pass, else ``"forward"``.
    mode: ``"dfp"`` (rewritten), ``"float"`` (kept in floating point) or ``"unchanged"``
      (operands not floating point, nothing to rewrite).
    reason: why.
    gradient: for a product that JAX or a DFP op derived from a site when differentiating
      it, ``"data"`` (the gradient of the site's lhs) or ``"weights"`` (of its rhs);
      None for the site's own product, or when ``report`` cannot tell which.
  """
  index: int | None
  primitive: str
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  out_dtype: np.dtype
  out_shape: tuple[int, ...]
  path: str
  direction: str
  mode: str
  reason: str
  gradient: str | None = None

  @property
  def role(self) -> str:
    """``"forward"``, ``"backward"``, ``"backward-data"`` or ``"backward-weights"``."""
    return self.direction if self.gradient is None else f"backward-{self.gradient}"


@dataclasses.dataclass
class Context:
  """What one interpretation rewrites (``config``), and what it has met so far."""
  config: DFPConfig
  recorder: recording.Recorder | None = None  # set while ``report``/``diagnose`` trace
  rewrites: dict | None = None  # sub-computations rewritten by earlier calls (``_rewrite``)


class _Counter:
  """Numbers the sites of one key namespace (see the module docstring)."""

  def __init__(self):
    self.n = 0

  def next(self) -> int:
    self.n += 1
    return self.n - 1


@dataclasses.dataclass(frozen=True)
class Scope:
  """Where an equation sits: its absolute name stack, the key of its scope and, when
  every site in it must stay in float, why."""
  name_stack: NameStack
  key: Any = None  # None: deterministic rounding
  keep_reason: str | None = None
  sites: _Counter = dataclasses.field(default_factory=_Counter, compare=False)

  def enter(self, eqn) -> Scope:
    return dataclasses.replace(self, name_stack=self.name_stack + eqn.source_info.name_stack)

  def in_rule(self, keys, number: int, part: int) -> Scope:
    """The scope of a sub-computation that may be traced more than once or late (custom
    rules, call bodies): a fresh site namespace with key
    ``fold_in(fold_in(key, number), part)`` (part 0: primal, fwd, jvp, body; 1: bwd).
    ``keys`` is ``[key]`` or ``[]``: how rules pass an optional key operand."""
    key = jax.random.fold_in(jax.random.fold_in(keys[0], number), part) if keys else None
    return dataclasses.replace(self, key=key, sites=_Counter())

  def key_operands(self) -> list:
    return [] if self.key is None else [self.key]

  def in_iteration(self, i) -> Scope:
    return dataclasses.replace(self, key=jax.random.fold_in(self.key, i))

  def keeping(self, reason: str) -> Scope:
    return dataclasses.replace(self, keep_reason=reason)


_TANGENT = "computes a tangent in a custom_jvp rule, which must stay linear"


# ---------------------------------------------------------------------------------------
# The interpreter.
# ---------------------------------------------------------------------------------------


def eval_jaxpr(ctx: Context, jaxpr: core.Jaxpr, consts, args, scope: Scope,
               linear: list[bool] | None = None) -> list:
  """Evaluates ``jaxpr`` with its DFP sites rewritten (see the module docstring).

  ``linear`` marks the invars that are tangents (in a custom_jvp rule): equations that
  depend on them keep their sites in float, as a DFP product is not linear and could
  not be transposed.
  """
  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  def write(v, val):
    env[v] = val

  env: dict[core.Var, Any] = {}
  for v, x in zip(jaxpr.constvars, consts, strict=True):
    write(v, x)
  for v, x in zip(jaxpr.invars, args, strict=True):
    write(v, x)
  tangents = set()
  if linear is not None:
    tangents = {v for v, t in zip(jaxpr.invars, linear, strict=True) if t}
  lu_ = core.last_used(jaxpr)
  for eqn in jaxpr.eqns:
    eqn_scope = scope.enter(eqn)
    if tangents and any(isinstance(v, core.Var) and v in tangents for v in eqn.invars):
      tangents.update(eqn.outvars)
      eqn_scope = eqn_scope.keeping(_TANGENT)
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with (source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
          eqn.ctx.manager):
      ans = _eval_eqn(ctx, eqn, [read(v) for v in eqn.invars], eqn_scope)
    if eqn.primitive.multiple_results:
      for v, x in zip(eqn.outvars, ans, strict=True):
        write(v, x)
    else:
      write(eqn.outvars[0], ans)
    core.clean_up_dead_vars(eqn, env, lu_)
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(ctx, eqn, invals, scope):
  prim = eqn.primitive
  if prim in _SITE_PRIMITIVES:
    return _site(ctx, eqn, invals, scope)
  if prim is ragged_dot_general_p:
    return _unrewritten_product(ctx, eqn, invals, scope)
  rule = _HIGHER_ORDER_RULES.get(prim)
  if rule is not None:
    return rule(ctx, eqn, invals, scope)
  _check_nothing_hidden(eqn)
  return prim.bind(*invals, **prim.get_bind_params(eqn.params))


# ---------------------------------------------------------------------------------------
# DFP sites.
# ---------------------------------------------------------------------------------------

_SITE_PRIMITIVES = {prims.dot_general_p: "dot_general",
                    prims.conv_general_dilated_p: "conv_general_dilated"}


def _site(ctx: Context, eqn, invals, scope: Scope):
  op = _SITE_PRIMITIVES[eqn.primitive]
  avals = [core.typeof(x) for x in invals]
  floating = all(jnp.issubdtype(a.dtype, jnp.floating) for a in avals)
  number = scope.sites.next() if floating else None
  path = module_path(scope.name_stack)
  config = ctx.config
  if not floating:
    mode, reason = "unchanged", "operands are not floating point"
  elif op not in config.ops:
    mode, reason = "float", f"{op} is not in config.ops"
  elif config.keeps_float(path):
    mode, reason = "float", "path matches config.keep_float"
  elif scope.keep_reason is not None:
    mode, reason = "float", scope.keep_reason
  else:
    mode, reason = "dfp", "rewritten"
  if mode == "dfp":
    for a in avals:
      if np.dtype(a.dtype) not in floatbits.FORMATS:
        raise TypeError(f"dfp_transform: {op} at {path or '<top>'!r} has a {a.dtype} operand; "
                        "DFP quantizes float32, bfloat16 and float16 only. Keep the site in "
                        "float with DFPConfig(keep_float=...).")
    key = None if scope.key is None else jax.random.fold_in(scope.key, number)
    product = functools.partial(_dfp_product, op, eqn.params, np.dtype(eqn.outvars[0].aval.dtype),
                                config)
    return _recorded(ctx, eqn, [*invals, key], scope, product, op, mode, reason)
  product = functools.partial(eqn.primitive.bind, **eqn.params)
  return _recorded(ctx, eqn, invals, scope, product, op, mode, reason)


def _dfp_product(op, p, out_dtype, config, lhs, rhs, key):
  if op == "dot_general":
    return dfpjax.dfp_dot_general(lhs, rhs, p["dimension_numbers"], p["precision"], out_dtype,
                                  config=config, key=key)
  return dfpjax.dfp_conv_general_dilated(
      lhs, rhs, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      p["dimension_numbers"], p["feature_group_count"], p["batch_group_count"],
      p["precision"], out_dtype, config=config, key=key)


_RAGGED = ("dfp_transform does not rewrite ragged_dot: the DFP ops have no exact group-wise "
           "(ragged) integer product")


def _unrewritten_product(ctx, eqn, invals, scope: Scope):
  """A floating product that ``dfp_transform`` does not rewrite: runs as it is, listed by
  ``report``."""
  avals = [core.typeof(x) for x in invals]
  floating = all(jnp.issubdtype(a.dtype, jnp.floating) for a in avals[:2])
  if floating:
    scope.sites.next()
  mode, reason = (("float", _RAGGED) if floating
                  else ("unchanged", "operands are not floating point"))
  product = functools.partial(eqn.primitive.bind, **eqn.params)
  return _recorded(ctx, eqn, invals, scope, product, eqn.primitive.name, mode, reason)


def _recorded(ctx, eqn, operands, scope: Scope, product, op, mode, reason):
  """``product(*operands)``; while recording, also the site's record, under its tag (see
  ``recording``). A DFP product's operands end with its key (or None).

  A site in a custom rule that JAX runs in the backward pass (a custom_vjp's bwd) has
  the transpose frame in JAX's name stack, not in ``scope``'s: either makes it backward.
  """
  recorder = ctx.recorder
  if recorder is None:
    return product(*operands)
  avals = [core.typeof(x) for x in operands[:len(eqn.invars)]]
  out_aval = eqn.outvars[0].aval
  backward = is_backward(scope.name_stack) or is_backward(source_info_util.current_name_stack())
  record = SiteRecord(
      len(recorder.records) if mode != "unchanged" else None, op,
      tuple(a.shape for a in avals), tuple(np.dtype(a.dtype) for a in avals),
      np.dtype(out_aval.dtype), tuple(out_aval.shape), module_path(scope.name_stack),
      "backward" if backward else "forward", mode, reason)
  number = recorder.add(record, eqn.params, ctx.config)
  with recording.tag(number):
    if mode == "dfp":
      return recording.wrap(recorder, number, product, *operands)
    return product(*operands)


# ---------------------------------------------------------------------------------------
# Helpers for rules.
# ---------------------------------------------------------------------------------------


def _trace(fun: Callable, in_avals) -> tuple[core.ClosedJaxpr, list]:
  """Traces ``fun`` (flat in, flat list out) to a const-free ClosedJaxpr taking the
  hoisted consts first, and those consts (closed-over values, tracers included)."""
  dbg = api_util.debug_info("dfp_transform", fun, tuple(in_avals), {})
  closed, _ = pe.trace_to_jaxpr(fun, FlatTree.flatten_args(*in_avals), dbg)
  new, consts = pe.separate_consts(closed)
  return new, list(consts)


def _rewrite(ctx, ident, scope: Scope, in_avals, body: Callable):
  """Traces ``body(scope, *args)`` as ``_trace`` does, with the scope's key, if any, as an
  operand after the hoisted consts; returns the jaxpr and its leading operands (the hoisted
  consts, then the key).

  The result does not depend on the key's value, so ``ctx.rewrites`` keeps it for later
  calls, under ``ident`` (the sub-jaxpr rewritten) and where it is met: an eager call then
  binds the same jaxprs as the call before, which JAX has compiled already, instead of new
  ones that it would compile again.
  """
  keys = scope.key_operands()
  cache_key = (ident, scope.name_stack, scope.keep_reason, len(keys), scope.sites.n)
  cached = None if ctx.rewrites is None else ctx.rewrites.get(cache_key)
  if cached is None:
    start = scope.sites.n

    def fun(*args):
      key_args, args = _split(args, [len(keys)])
      return body(dataclasses.replace(scope, key=key_args[0] if keys else None), *args)
    jaxpr, consts = _trace(fun, [core.typeof(k) for k in keys] + list(in_avals))
    cached = jaxpr, consts, scope.sites.n - start
    # A jaxpr that closed over an outer tracer is valid in this trace only.
    if ctx.rewrites is not None and not any(isinstance(c, core.Tracer) for c in consts):
      ctx.rewrites[cache_key] = cached
  else:
    scope.sites.n += cached[2]  # the sites numbered inside, as if traced again
  jaxpr, consts, _ = cached
  return jaxpr, [*consts, *keys]


def _rewrite_closed(ctx, closed: core.ClosedJaxpr, scope: Scope, ident=None):
  """``closed``'s computation with its sites rewritten, as ``_rewrite`` returns it."""
  return _rewrite(ctx, closed if ident is None else ident, scope, closed.in_avals,
                  lambda inner, *args: eval_jaxpr(ctx, closed.jaxpr, closed.consts, args, inner))


def _counter_aval():
  return core.ShapedArray((), np.dtype(np.int32))


def _split(xs, sizes):
  out, start = [], 0
  for n in sizes:
    out.append(list(xs[start:start + n]))
    start += n
  out.append(list(xs[start:]))
  return out


# ---------------------------------------------------------------------------------------
# Rules for higher-order primitives: (ctx, eqn, invals, scope) -> outputs.
# ---------------------------------------------------------------------------------------


def _jit_rule(ctx, eqn, invals, scope):
  p = eqn.params
  new, hoisted = _rewrite_closed(ctx, p["jaxpr"], scope)
  n = len(hoisted)  # prepended operands: unsharded, not donated, default layout
  params = dict(p, jaxpr=new, in_shardings=(UNSPECIFIED,) * n + tuple(p["in_shardings"]),
                in_layouts=(None,) * n + tuple(p["in_layouts"]),
                donated_invars=(False,) * n + tuple(p["donated_invars"]))
  return eqn.primitive.bind(*hoisted, *invals, **params)


def _call_rule(ctx, eqn, invals, scope):
  # CallPrimitive.get_bind_params with our eval_jaxpr in place of core.eval_jaxpr.
  params = dict(eqn.params)
  call_jaxpr = params.pop("call_jaxpr")
  jaxpr, consts = ((call_jaxpr.jaxpr, call_jaxpr.consts)
                   if isinstance(call_jaxpr, core.ClosedJaxpr) else (call_jaxpr, ()))
  # The body is numbered afresh, however often it is traced.
  inner = scope.in_rule(scope.key_operands(), scope.sites.next(), 0)
  fun = lu.wrap_init(lambda *args: eval_jaxpr(ctx, jaxpr, consts, args, inner),
                     debug_info=jaxpr.debug_info)
  return eqn.primitive.bind(*invals, subfuns=(fun,), **params)


def _remat_rule(ctx, eqn, invals, scope):
  p = eqn.params
  new, hoisted = _rewrite_closed(ctx, pe.close_jaxpr(p["jaxpr"]), scope, ident=p["jaxpr"])
  prevent_cse = p["prevent_cse"]
  if isinstance(prevent_cse, tuple):
    prevent_cse = (True,) * len(hoisted) + prevent_cse
  return eqn.primitive.bind(*hoisted, *invals, jaxpr=new.jaxpr, prevent_cse=prevent_cse,
                            differentiated=p["differentiated"], policy=p["policy"])


def _cond_rule(ctx, eqn, invals, scope):
  index, *ops = invals
  rewritten = [_rewrite_closed(ctx, branch, scope) for branch in eqn.params["branches"]]
  # Branches must take the same operands: each gets every branch's hoisted consts.
  branches, consts = _merge_common_consts(*zip(*rewritten))
  return eqn.primitive.bind(index, *consts, *ops,
                            **dict(eqn.params, branches=tuple(branches)))


def _loop_part(ctx, closed: core.ClosedJaxpr, num_consts: int, scope: Scope, *, body: bool):
  """A loop's body or condition rewritten. With a key, it also takes an int32 iteration
  counter after its consts (a body returns the next count first), and its sites' keys fold
  in the iteration."""
  if scope.key is None:
    return _rewrite_closed(ctx, closed, scope)

  def fun(inner, *args):
    consts, (i,), rest = _split(args, [num_consts, 1])
    outs = eval_jaxpr(ctx, closed.jaxpr, closed.consts, consts + rest, inner.in_iteration(i))
    return [i + 1, *outs] if body else outs
  avals = list(closed.in_avals)
  in_avals = avals[:num_consts] + [_counter_aval()] + avals[num_consts:]
  return _rewrite(ctx, closed, scope, in_avals, fun)


def _scan_rule(ctx, eqn, invals, scope):
  p = eqn.params
  nc = p["num_consts"]
  body, hoisted = _loop_part(ctx, p["jaxpr"], nc, scope, body=True)
  consts, rest = _split(invals, [nc])
  counter = [] if scope.key is None else [jnp.zeros((), jnp.int32)]
  outs = eqn.primitive.bind(*hoisted, *consts, *counter, *rest,
                            **dict(p, jaxpr=body, num_consts=len(hoisted) + nc,
                                   num_carry=p["num_carry"] + len(counter)))
  return outs[len(counter):]


def _while_rule(ctx, eqn, invals, scope):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, carry = _split(invals, [cn, bn])
  # With a key, the condition sees (and ignores) the counter that the body carries.
  new_cond, cond_hoisted = _loop_part(ctx, p["cond_jaxpr"], cn, scope, body=False)
  new_body, body_hoisted = _loop_part(ctx, p["body_jaxpr"], bn, scope, body=True)
  counter = [] if scope.key is None else [jnp.zeros((), jnp.int32)]
  outs = eqn.primitive.bind(
      *cond_hoisted, *cond_consts, *body_hoisted, *body_consts, *counter, *carry,
      **dict(p, cond_jaxpr=new_cond, body_jaxpr=new_body,
             cond_nconsts=len(cond_hoisted) + cn, body_nconsts=len(body_hoisted) + bn))
  return outs[len(counter):]


def _shard_map_rule(ctx, eqn, invals, scope):
  # ShardMapPrimitive.get_bind_params with our eval_jaxpr; the key enters replicated
  # and is folded with the device's index along the manual axes.
  params = dict(eqn.params)
  jaxpr = params.pop("jaxpr")
  out_specs = params.pop("out_specs")
  keys = scope.key_operands()
  number = scope.sites.next()  # the body is numbered afresh, however often it is traced
  axes = tuple(a for a in params["mesh"].axis_names if a in params["newly_manual_axes"])

  def body(*args):
    key_args, args = _split(args, [len(keys)])
    inner = scope.in_rule(key_args, number, 0)
    if key_args:
      inner = inner.in_iteration(jax.lax.axis_index(axes))
    result = eval_jaxpr(ctx, jaxpr, (), args, inner)
    return FlatTree.flatten(result).with_aux(out_specs)

  dbg = jaxpr.debug_info
  if keys and dbg.arg_names is not None:
    dbg = dbg._replace(arg_names=("dfp_key",) * len(keys) + tuple(dbg.arg_names))
  params["in_specs"] = (jax.sharding.PartitionSpec(),) * len(keys) + tuple(params["in_specs"])
  params["subfuns"] = (body,)
  params["debug_info"] = dbg
  return eqn.primitive.bind(*keys, *invals, **params)


def _custom_jvp_rule(ctx, eqn, invals, scope):
  # CustomJVPCallPrimitive.get_bind_params and lift_jvp with our eval_jaxpr. The key,
  # if any, is one more leading const: the jvp rule is traced lazily, maybe after the
  # trace that owns the scope's key has ended.
  params = dict(eqn.params)
  call_jaxpr = params.pop("call_jaxpr")
  num_consts = params.pop("num_consts")
  jvp_jaxpr_fun = params.pop("jvp_jaxpr_fun")
  keys = scope.key_operands()
  nk = len(keys)
  number = scope.sites.next()

  def fun(*args):
    key_args, args = _split(args, [nk])
    return eval_jaxpr(ctx, call_jaxpr.jaxpr, call_jaxpr.consts, args,
                      scope.in_rule(key_args, number, 0))

  def jvp(*xs):
    n = len(xs) // 2
    key_args = list(xs[:nk])
    primals, tangents = xs[nk + num_consts:n], xs[n + nk + num_consts:]
    zeros = [type(t) is SymbolicZero for t in tangents]
    jvp_jaxpr, jvp_consts, out_zeros = jvp_jaxpr_fun.call_wrapped(*zeros)
    nonzero_tangents = [t for t in tangents if type(t) is not SymbolicZero]
    out = eval_jaxpr(ctx, jvp_jaxpr, jvp_consts, [*primals, *nonzero_tangents],
                     scope.in_rule(key_args, number, 0),
                     linear=[False] * len(primals) + [True] * len(nonzero_tangents))
    out_primals, nz_out_tangents = _split(out, [len(out_zeros)])
    nz_iter = iter(nz_out_tangents)
    out_tangents = [SymbolicZero(core.typeof(p).to_tangent_aval()) if z else next(nz_iter)
                    for p, z in zip(out_primals, out_zeros)]
    return [*out_primals, *out_tangents]

  subfuns = (lu.wrap_init(fun, debug_info=call_jaxpr.jaxpr.debug_info),
             lu.wrap_init(jvp, debug_info=jvp_jaxpr_fun.debug_info))
  return eqn.primitive.bind(*keys, *invals, subfuns=subfuns, **params)


def _custom_vjp_rule(ctx, eqn, invals, scope):
  # CustomVJPCallPrimitive.get_bind_params and lift_fwd with our eval_jaxpr, and the
  # user's bwd traced and rewritten whenever AD calls it: the user's rule is kept. The
  # key, if any, is one more leading const and travels to bwd as the last residual.
  params = dict(eqn.params)
  call_jaxpr = params.pop("call_jaxpr")
  num_consts = params.pop("num_consts")
  fwd_jaxpr_thunk = params.pop("fwd_jaxpr_thunk")
  bwd = params.pop("bwd")
  out_trees = params.pop("out_trees")
  const_avals = call_jaxpr.in_avals[:num_consts]
  keys = scope.key_operands()
  nk = len(keys)
  number = scope.sites.next()

  def new_out_trees():
    out_tree, res_tree, input_fwds = out_trees()
    if not nk:
      return out_tree, res_tree, input_fwds
    res_tree = jax.tree_util.treedef_tuple((res_tree, jax.tree.structure(0)))
    return out_tree, res_tree, [None if f is None else f + nk for f in input_fwds] + [None]

  def fun(*args):
    key_args, args = _split(args, [nk])
    return eval_jaxpr(ctx, call_jaxpr.jaxpr, call_jaxpr.consts, args,
                      scope.in_rule(key_args, number, 0))

  def fwd(*args):
    vals, nonzeros = args[::2], args[1::2]
    key_args, consts_and_primals = _split(vals, [nk])
    const_nonzeros, in_nonzeros = _split(nonzeros[nk:], [num_consts])
    if any(const_nonzeros):
      raise ad.CustomVJPException()
    fwd_jaxpr, fwd_consts = fwd_jaxpr_thunk.call_wrapped(*in_nonzeros)
    out = eval_jaxpr(ctx, fwd_jaxpr, fwd_consts, consts_and_primals[num_consts:],
                     scope.in_rule(key_args, number, 0))
    if not nk:
      return out
    _, res_tree, input_fwds = out_trees()
    num_res = res_tree.num_leaves - sum(f is not None for f in input_fwds)
    return [*out[:num_res], *key_args, *out[num_res:]]

  def new_bwd(*args):
    if nk:
      _, res_tree, _ = out_trees()
      res, key_args, cts = _split(args, [res_tree.num_leaves, nk])
      args = res + cts
    else:
      key_args = []
    cts_in = _rewrite_call(ctx, bwd.call_wrapped, args, scope.in_rule(key_args, number, 1))
    # No cotangent for the key; zeros for consts, as _handle_consts_in_bwd gives.
    return [Zero(core.typeof(k).to_ct_aval()) for k in key_args] + \
           [Zero(a) for a in const_avals] + list(cts_in)

  subfuns = (lu.wrap_init(fun, debug_info=call_jaxpr.jaxpr.debug_info),
             lu.wrap_init(fwd, debug_info=fwd_jaxpr_thunk.debug_info),
             lu.wrap_init(new_bwd, debug_info=bwd.debug_info))
  return eqn.primitive.bind(*keys, *invals, subfuns=subfuns, out_trees=new_out_trees,
                            **params)


def _rewrite_call(ctx, fn: Callable, args, scope: Scope):
  """``fn(*args)`` (an opaque Python function: a user's custom rule) with its sites
  rewritten: traces it to a jaxpr, every array operand a hoisted const, and interprets
  that. Leaves of the result that are not arrays (None, symbolic zeros) pass around the
  trace as they are."""
  result = []

  def traceable():
    leaves, tree = jax.tree.flatten(fn(*args), is_leaf=_is_zero)
    arrays = [isinstance(x, (core.Tracer, jax.Array)) for x in leaves]
    result[:] = [tree, leaves, arrays]
    return [x for x, a in zip(leaves, arrays) if a]

  closed, consts = _trace(traceable, [])
  outs = iter(eval_jaxpr(ctx, closed.jaxpr, (), consts, scope))
  tree, leaves, arrays = result
  return jax.tree.unflatten(tree, [next(outs) if a else x for x, a in zip(leaves, arrays)])


def _is_zero(x) -> bool:
  return isinstance(x, (Zero, SymbolicZero))


def _call_hi_rule(ctx, eqn, invals, scope):
  # Under jax_custom_vjp3 a custom_vjp is a hijax primitive holding Python objects: the
  # primal traced by jit, the user's fwd and bwd. It is bound again as a new custom_vjp
  # whose primal is the interpreted jaxpr and whose fwd and bwd call the user's rules
  # rewritten; the key, if any, is one more leading argument and, for bwd, a residual.
  # A vmapped custom_vjp (VmapOf) is rebuilt around the rewritten one.
  prim = eqn.params["_prim"]
  inner = prim.prim if isinstance(prim, hijax.VmapOf) else prim
  if not isinstance(inner, hijax.CustomVJPTraced):
    raise NotImplementedError(
        f"dfp_transform cannot rewrite inside the hijax primitive {type(inner).__name__} "
        "(only a jax.custom_vjp's, as jax_custom_vjp3 stages it); rather than run it "
        "unrewritten it stops here.")
  keys = scope.key_operands()
  cache_key = (inner, scope.name_stack, scope.keep_reason, len(keys), scope.sites.n)
  rewritten = None if ctx.rewrites is None else ctx.rewrites.get(cache_key)
  if rewritten is None:
    rewritten = _rewritten_custom_vjp(ctx, inner, scope, scope.sites.next(),
                                      [core.typeof(k) for k in keys])
    if ctx.rewrites is not None:
      ctx.rewrites[cache_key] = rewritten
  else:
    scope.sites.next()
  if inner is not prim:
    rewritten = hijax.VmapOf(rewritten, prim.axis_data, (None,) * len(keys) + prim.in_dims,
                             prim.out_dim)
  return call_hi_primitive_p.bind(*keys, *invals, _prim=rewritten)


def _rewritten_custom_vjp(ctx, prim, scope: Scope, number: int, key_avals):
  """A ``CustomVJPTraced`` like ``prim`` whose primal, fwd and bwd rewrite their sites
  (keys as in the module docstring) and whose first ``len(key_avals)`` arguments are the
  scope's key."""
  nk = len(key_avals)
  static = set(prim.static_argnums)
  traced = prim.traced

  def primal(*args):
    key_args, args = _split(args, [nk])
    dynamic = [a for i, a in enumerate(args) if i not in static]
    leaves = traced.in_tree.flatten_up_to((tuple(dynamic), {}))
    outs = eval_jaxpr(ctx, traced.jaxpr.jaxpr, traced.jaxpr.consts, leaves,
                      scope.in_rule(key_args, number, 0))
    return jax.tree.unflatten(traced.out_tree, outs)

  def fwd(*args):
    key_args, args = _split(args, [nk])
    key_args = [k.value if isinstance(k, CustomVJPPrimal) else k for k in key_args]
    out, res = _rewrite_call(ctx, prim.fwd, args, scope.in_rule(key_args, number, 0))
    return out, (res, key_args) if nk else res

  def bwd(*args):
    *static_args, res, cts = args
    key_args = []
    if nk:
      res, key_args = res
    cts_in = _rewrite_call(ctx, prim.bwd, (*static_args, res, cts),
                           scope.in_rule(key_args, number, 1))
    return (None,) * nk + tuple(cts_in)

  in_avals = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in key_avals) + prim.in_avals
  static_argnums = tuple(i + nk for i in prim.static_argnums)
  trace_args = [a.val if isinstance(a, hijax.Static) else a for a in in_avals]
  new_traced = jax.jit(primal, static_argnums=static_argnums).trace(*trace_args)
  return hijax.CustomVJPTraced(new_traced, fwd, bwd, (*key_avals, *prim.in_avals),
                               prim.symbolic_zeros, static_argnums, prim.opt_remat)


_HIGHER_ORDER_RULES: dict[core.Primitive, Callable] = {
    prims.jit_p: _jit_rule,
    prims.closed_call_p: _call_rule,
    prims.call_p: _call_rule,
    prims.remat_p: _remat_rule,
    prims.cond_p: _cond_rule,
    prims.scan_p: _scan_rule,
    prims.while_p: _while_rule,
    prims.custom_jvp_call_p: _custom_jvp_rule,
    prims.custom_vjp_call_p: _custom_vjp_rule,
    shard_map_p: _shard_map_rule,
    call_hi_primitive_p: _call_hi_rule,
}


# ---------------------------------------------------------------------------------------
# Everything else: bound as it is, unless it hides a computation.
# ---------------------------------------------------------------------------------------

# Params that hold a scalar combiner (e.g. scatter-add's ``update_jaxpr``), not a
# computation of the user's that could contain a site.
_COMBINER_PARAMS = {
    prims.scatter_p: {"update_jaxpr"},
    prims.scatter_add_p: {"update_jaxpr"},
    prims.scatter_mul_p: {"update_jaxpr"},
    prims.scatter_min_p: {"update_jaxpr"},
    prims.scatter_max_p: {"update_jaxpr"},
    prims.reduce_p: {"jaxpr"},
    prims.reduce_window_p: {"jaxpr"},
    prims.select_and_scatter_p: {"select_jaxpr", "scatter_jaxpr"},
}


def _holds_computation(value) -> bool:
  if isinstance(value, (core.Jaxpr, core.ClosedJaxpr, lu.WrappedFun)):
    return True
  if isinstance(value, (tuple, list)):
    return any(_holds_computation(v) for v in value)
  if isinstance(value, dict):
    return any(_holds_computation(v) for v in value.values())
  return False


def _check_nothing_hidden(eqn):
  prim = eqn.primitive
  allowed = _COMBINER_PARAMS.get(prim, set())
  hidden = sorted(k for k, v in eqn.params.items() if k not in allowed and _holds_computation(v))
  if hidden:
    raise NotImplementedError(
        f"dfp_transform cannot rewrite inside the higher-order primitive '{prim.name}' "
        f"(params {hidden} hold a computation); rather than run it unrewritten it stops "
        "here. Supported: " + ", ".join(sorted(p.name for p in _HIGHER_ORDER_RULES)) + ".")
