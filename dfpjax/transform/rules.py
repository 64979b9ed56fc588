"""The rules of ``dfp_transform``'s interpreter for higher-order primitives: each binds its
primitive again with its sub-computations rewritten by ``interpreter.eval_jaxpr`` (keys
and site numbering as the interpreter's module docstring says)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr  # public: it outlives JAX 0.12 folding it into Jaxpr
from jax.extend.core import primitives as prims

from dfpjax._jax_compat import (CUSTOM_JVP3_LEADING_ARGS, CUSTOM_VJP3_LEADING_ARGS,
                                CUSTOM_VJP3_PRIMAL_LEADING_ARGS, UNSPECIFIED, CustomJVPTraced,
                                CustomVJPPrimal, SymbolicZero, VmapOf, Zero,
                                _merge_common_consts, ad, api_util, call_hi_primitive_p, core,
                                custom_jvp3_like, custom_jvp3_rule, custom_vjp3_bwd_with_keys,
                                custom_vjp3_fwd_keys, custom_vjp3_like,
                                custom_vjp_call_bwd_cotangents, flatten, flatten_args, hijax,
                                hijax_static_positions, in_forward_mode, lu, pe,
                                scan_consts_and_carry, scan_params, shard_map_p, trace_to_jaxpr)
from dfpjax.transform.interpreter import HIGHER_ORDER_RULES, Scope, eval_jaxpr
from dfpjax.transform.recompute import RecomputePolicy, tied_to_cotangent


# ---------------------------------------------------------------------------------------
# Helpers for rules.
# ---------------------------------------------------------------------------------------


def _trace(fun: Callable, in_avals) -> tuple[ClosedJaxpr, list]:
  """Traces ``fun`` (flat in, flat list out) to a const-free ClosedJaxpr taking the
  hoisted consts first, and those consts (closed-over values, tracers included)."""
  dbg = api_util.debug_info("dfp_transform", fun, tuple(in_avals), {})
  closed, _ = trace_to_jaxpr(fun, flatten_args(*in_avals), dbg)
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


def _rewrite_closed(ctx, closed: ClosedJaxpr, scope: Scope, ident=None):
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
                   if isinstance(call_jaxpr, ClosedJaxpr) else (call_jaxpr, ()))
  # The body is numbered afresh, however often it is traced.
  inner = scope.in_rule(scope.key_operands(), scope.sites.next(), 0)
  fun = lu.wrap_init(lambda *args: eval_jaxpr(ctx, jaxpr, consts, args, inner),
                     debug_info=jaxpr.debug_info)
  return eqn.primitive.bind(*invals, subfuns=(fun,), **params)


def _remat_rule(ctx, eqn, invals, scope):
  p = eqn.params
  new, hoisted = _rewrite_closed(ctx, pe.close_jaxpr(p["jaxpr"]), scope, ident=p["jaxpr"])
  # In forward mode there is no backward pass to tie: the region is the checkpoint it is.
  if (isinstance(p["policy"], RecomputePolicy) and not p["differentiated"]
      and not in_forward_mode(invals)):
    return tied_to_cotangent(core.jaxpr_as_fun(new), p["policy"])(*hoisted, *invals)
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


def _loop_part(ctx, closed: ClosedJaxpr, num_consts: int, scope: Scope, *, body: bool):
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
  nc, _ = scan_consts_and_carry(p)
  body, hoisted = _loop_part(ctx, p["jaxpr"], nc, scope, body=True)
  consts, rest = _split(invals, [nc])
  counter = [] if scope.key is None else [jnp.zeros((), jnp.int32)]
  outs = eqn.primitive.bind(*hoisted, *consts, *counter, *rest,
                            **scan_params(p, body, len(hoisted), len(counter)))
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
    return flatten(result).with_aux(out_specs)

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
    result = _rewrite_call(ctx, bwd.call_wrapped, args, scope.in_rule(key_args, number, 1))
    # No cotangent for the key; zeros for consts, as _handle_consts_in_bwd gives.
    return custom_vjp_call_bwd_cotangents(
        result, lambda cts_in: [Zero(core.typeof(k).to_ct_aval()) for k in key_args] +
                               [Zero(a) for a in const_avals] + list(cts_in))

  subfuns = (lu.wrap_init(fun, debug_info=call_jaxpr.jaxpr.debug_info),
             lu.wrap_init(fwd, debug_info=fwd_jaxpr_thunk.debug_info),
             lu.wrap_init(new_bwd, debug_info=bwd.debug_info))
  return eqn.primitive.bind(*keys, *invals, subfuns=subfuns, out_trees=new_out_trees,
                            **params)


def _rewrite_call(ctx, fn: Callable, args, scope: Scope, tangents=None):
  """``fn(*args)`` (an opaque Python function: a user's custom rule), or ``fn(*args,
  tangents)`` (a jvp rule), with its sites rewritten: traces it to a jaxpr, every array
  operand of ``args`` a hoisted const and the array leaves of ``tangents`` linear arguments
  (so products of a tangent stay float), and interprets that. Leaves of ``tangents`` and of
  the result that are not arrays (None, symbolic zeros) pass around the trace as they are."""
  result = []
  tangent_leaves, tangent_tree = jax.tree.flatten(tangents, is_leaf=_is_zero)
  linear = [isinstance(t, (core.Tracer, jax.Array)) for t in tangent_leaves]
  operands = [t for t, a in zip(tangent_leaves, linear) if a]

  def traceable(*ts):
    ts = iter(ts)
    extra = () if tangents is None else (jax.tree.unflatten(
        tangent_tree, [next(ts) if a else t for t, a in zip(tangent_leaves, linear)]),)
    leaves, tree = jax.tree.flatten(fn(*args, *extra), is_leaf=_is_zero)
    arrays = [isinstance(x, (core.Tracer, jax.Array)) for x in leaves]
    result[:] = [tree, leaves, arrays]
    return [x for x, a in zip(leaves, arrays) if a]

  closed, consts = _trace(traceable, [core.typeof(t) for t in operands])
  outs = iter(eval_jaxpr(ctx, closed.jaxpr, (), [*consts, *operands], scope,
                         linear=[False] * len(consts) + [True] * len(operands)))
  tree, leaves, arrays = result
  return jax.tree.unflatten(tree, [next(outs) if a else x for x, a in zip(leaves, arrays)])


def _is_zero(x) -> bool:
  return isinstance(x, (Zero, SymbolicZero))


def _call_hi_rule(ctx, eqn, invals, scope):
  # Under jax_custom_vjp3 (jax_custom_jvp3) a custom_vjp (custom_jvp) is a hijax primitive
  # holding Python objects: the primal traced by jit and the user's rules. It is bound again
  # as a new one whose primal is the interpreted jaxpr and whose rules call the user's
  # rewritten; the key, if any, is one more argument after JAX's leading ones (a custom_vjp3
  # has two, a custom_jvp3 one from JAX 0.12 on, none before) and, for bwd, a residual. A
  # vmapped one (VmapOf, before JAX 0.12) is rebuilt around the rewritten one.
  prim = eqn.params["_prim"]
  inner = prim.prim if VmapOf is not None and isinstance(prim, VmapOf) else prim
  if isinstance(inner, hijax.CustomVJPTraced):
    rewrite, lead = _rewritten_custom_vjp, CUSTOM_VJP3_LEADING_ARGS
  elif CustomJVPTraced is not None and isinstance(inner, CustomJVPTraced):
    rewrite, lead = _rewritten_custom_jvp, CUSTOM_JVP3_LEADING_ARGS
  else:
    raise NotImplementedError(
        f"dfp_transform cannot rewrite inside the hijax primitive {type(inner).__name__} "
        "(only a jax.custom_vjp's or jax.custom_jvp's, as jax_custom_vjp3 and "
        "jax_custom_jvp3 stage them); rather than run it unrewritten it stops here.")
  keys = scope.key_operands()
  cache_key = (inner, scope.name_stack, scope.keep_reason, len(keys), scope.sites.n)
  rewritten = None if ctx.rewrites is None else ctx.rewrites.get(cache_key)
  if rewritten is None:
    rewritten = rewrite(ctx, inner, scope, scope.sites.next(), [core.typeof(k) for k in keys])
    if ctx.rewrites is not None:
      ctx.rewrites[cache_key] = rewritten
  else:
    scope.sites.next()
  if inner is not prim:
    rewritten = VmapOf(rewritten, prim.axis_data,
                       (*prim.in_dims[:lead], *(None,) * len(keys), *prim.in_dims[lead:]),
                       prim.out_dim)
  args = prim.in_tree.unflatten(invals)
  operands = rewritten.in_tree.flatten_up_to((*args[:lead], *keys, *args[lead:]))
  return call_hi_primitive_p.bind(*operands, _prim=rewritten)


def _rewritten_primal(ctx, prim, scope: Scope, number: int, key_avals, lead: int,
                      primal_lead: int):
  """The primal of ``prim`` (a ``CustomVJPTraced`` or ``CustomJVPTraced``) traced by jit
  with its sites rewritten, taking the scope's key after JAX's ``primal_lead`` leading
  arguments (``lead`` of them in the application's arguments)."""
  nk = len(key_avals)
  static = hijax_static_positions(prim.in_avals)
  traced = prim.traced

  def primal(*args):
    leading, key_args, args = _split(args, [primal_lead, nk])
    dynamic = [a for i, a in enumerate(args, lead) if i not in static]
    leaves = traced.in_tree.flatten_up_to(((*leading, *dynamic), {}))
    outs = eval_jaxpr(ctx, traced.jaxpr.jaxpr, traced.jaxpr.consts, leaves,
                      scope.in_rule(key_args, number, 0))
    return jax.tree.unflatten(traced.out_tree, outs)

  key_structs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in key_avals)
  primal_args = (*prim.in_avals[:primal_lead], *key_structs, *prim.in_avals[lead:])
  trace_args = [a.val if isinstance(a, hijax.Static) else a for a in primal_args]
  primal_static = tuple(i - lead + primal_lead + nk for i in sorted(static))
  return jax.jit(primal, static_argnums=primal_static).trace(*trace_args)


def _rewritten_custom_jvp(ctx, prim, scope: Scope, number: int, key_avals):
  """A ``CustomJVPTraced`` like ``prim`` whose primal and jvp rule rewrite their sites (keys
  as in the module docstring; the rule's tangent products stay float, as
  ``_custom_jvp_rule``'s) and whose arguments after JAX's leading ones start with the
  scope's key."""
  nk, lead = len(key_avals), CUSTOM_JVP3_LEADING_ARGS
  rule = custom_jvp3_rule(prim)

  def jvp(*args):
    *static_args, primals, tangents = args
    primals, tangents = tuple(primals), tuple(tangents)
    key_args, primals = primals[lead:lead + nk], (*primals[:lead], *primals[lead + nk:])
    return _rewrite_call(ctx, rule, (*static_args, primals), scope.in_rule(key_args, number, 0),
                         tangents=(*tangents[:lead], *tangents[lead + nk:]))

  new_traced = _rewritten_primal(ctx, prim, scope, number, key_avals, lead, lead)
  in_avals = (*prim.in_avals[:lead], *key_avals, *prim.in_avals[lead:])
  return custom_jvp3_like(prim, new_traced, jvp, in_avals)


def _rewritten_custom_vjp(ctx, prim, scope: Scope, number: int, key_avals):
  """A ``CustomVJPTraced`` like ``prim`` whose primal, fwd and bwd rewrite their sites
  (keys as in the module docstring) and whose arguments after JAX's leading ones start
  with the scope's key."""
  nk = len(key_avals)
  lead = CUSTOM_VJP3_LEADING_ARGS

  def fwd(*args):
    key_args, args = custom_vjp3_fwd_keys(args, nk)
    key_args = [k.value if isinstance(k, CustomVJPPrimal) else k for k in key_args]
    out, res = _rewrite_call(ctx, prim.fwd, args, scope.in_rule(key_args, number, 0))
    return out, (res, key_args) if nk else res

  def bwd(*args):
    *static_args, res, cts = args
    key_args = []
    if nk:
      res, key_args = res
    result = _rewrite_call(ctx, prim.bwd, (*static_args, res, cts),
                           scope.in_rule(key_args, number, 1))
    return custom_vjp3_bwd_with_keys(prim, result, key_args)

  new_traced = _rewritten_primal(ctx, prim, scope, number, key_avals, lead,
                                 CUSTOM_VJP3_PRIMAL_LEADING_ARGS)
  in_avals = (*prim.in_avals[:lead], *key_avals, *prim.in_avals[lead:])
  return custom_vjp3_like(prim, new_traced, fwd, bwd, in_avals)


HIGHER_ORDER_RULES.update({
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
})
