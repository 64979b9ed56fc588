"""The jaxpr interpreter behind ``dfp_transform``.

``eval_jaxpr`` follows JAX's own ``core.eval_jaxpr``: every equation is bound with
``primitive.get_bind_params(params)`` under its own source info (name stack,
traceback) and context, except

* the DFP sites, floating ``dot_general`` and ``conv_general_dilated``, which become
  ``dfp_dot_general`` / ``dfp_conv_general_dilated`` unless the config keeps them, and
  ``ragged_dot_general``, which runs as it is; while ``report`` or ``diagnose`` records
  (``recording``), each is also recorded and bound under its own named scope;
* higher-order primitives, whose sub-jaxprs are rewritten by this same interpreter and
  bound again, one rule per primitive (``HIGHER_ORDER_RULES``, filled by ``rules.py``);
* a ``jax.custom_vjp`` (``jax.custom_jvp``) staged as a hijax ``call_hi_primitive`` (under
  ``jax_custom_vjp3``, ``jax_custom_jvp3``), bound again as one whose primal and rules are
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
from jax.extend.core import ClosedJaxpr  # public: it outlives JAX 0.12 folding it into Jaxpr
from jax.extend.core import primitives as prims

from dfpjax._jax_compat import core, lu, ragged_dot_general_p, source_info_util
from dfpjax.numerics import floatbits
from dfpjax.numerics.config import DFPConfig
from dfpjax.primitives import dfp_conv_general_dilated, dfp_dot_general
from dfpjax.primitives.conv_params import unsupported_rank
from dfpjax.transform import recording
from dfpjax.transform.names import NameStack, is_backward, module_path

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
      an operand is not floating point.
    primitive: the primitive's name.
    shapes, dtypes: of the operands.
    out_dtype: the equation's output type (the DFP op's ``preferred_element_type``).
    out_shape: the output's shape. In the backward pass it tells an input gradient (the
      forward input's shape) from a weight gradient (the weight's, up to a transpose).
    path: the module path (see ``names.module_path``).
    direction: ``"backward"`` when the equation came from a transpose or runs in a custom
      rule's backward pass, else ``"forward"``.
    mode: ``"dfp"`` (rewritten), ``"float"`` (kept in floating point) or ``"unchanged"``
      (an operand not floating point, nothing to rewrite).
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
  # The consts bind the leading inputs, constvars or not, as core.eval_jaxpr binds them: a
  # jaxpr whose consts are detached takes them as its first invars.
  inputs = [*jaxpr.constvars, *jaxpr.invars]
  for v, x in zip(inputs, [*consts, *args], strict=True):
    write(v, x)
  tangents = set()
  if linear is not None:
    tangents = {v for v, t in zip(inputs[len(consts):], linear, strict=True) if t}
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


# The rules of higher-order primitives, (ctx, eqn, invals, scope) -> outputs, each of which
# rewrites its sub-computations with ``eval_jaxpr``: ``rules.py`` registers them here.
HIGHER_ORDER_RULES: dict[core.Primitive, Callable] = {}


def _eval_eqn(ctx, eqn, invals, scope):
  prim = eqn.primitive
  if prim in _SITE_PRIMITIVES:
    return _site(ctx, eqn, invals, scope)
  if prim is ragged_dot_general_p:
    return _unrewritten_product(ctx, eqn, invals, scope)
  rule = HIGHER_ORDER_RULES.get(prim)
  if rule is not None:
    return rule(ctx, eqn, invals, scope)
  _check_nothing_hidden(eqn)
  return prim.bind(*invals, **prim.get_bind_params(eqn.params))


# ---------------------------------------------------------------------------------------
# DFP sites.
# ---------------------------------------------------------------------------------------

_SITE_PRIMITIVES = {prims.dot_general_p: "dot_general",
                    prims.conv_general_dilated_p: "conv_general_dilated"}


# A product with an integer, boolean or complex operand (int8 x float32 among them) is left as
# it is: DFP quantizes floating-point operands.
NOT_FLOATING = "an operand is not floating point"


def floating_operands(avals) -> bool:
  """Whether a product's operands (their avals) are all floating point (else NOT_FLOATING)."""
  return all(jnp.issubdtype(a.dtype, jnp.floating) for a in avals)


def _site(ctx: Context, eqn, invals, scope: Scope):
  op = _SITE_PRIMITIVES[eqn.primitive]
  avals = [core.typeof(x) for x in invals]
  floating = floating_operands(avals)
  number = scope.sites.next() if floating else None
  path = module_path(scope.name_stack)
  config = ctx.config
  if not floating:
    mode, reason = "unchanged", NOT_FLOATING
  elif op not in config.ops:
    mode, reason = "float", f"{op} is not in config.ops"
  elif op == "conv_general_dilated" and (why := unsupported_rank(avals[0].ndim)) is not None:
    mode, reason = "float", why
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
    return dfp_dot_general(lhs, rhs, p["dimension_numbers"], p["precision"], out_dtype,
                           config=config, key=key)
  return dfp_conv_general_dilated(
      lhs, rhs, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      p["dimension_numbers"], p["feature_group_count"], p["batch_group_count"],
      p["precision"], out_dtype, config=config, key=key)


_RAGGED = ("dfp_transform does not rewrite ragged_dot: the DFP ops have no exact group-wise "
           "(ragged) integer product")


def _unrewritten_product(ctx, eqn, invals, scope: Scope):
  """A floating product that ``dfp_transform`` does not rewrite: runs as it is, listed by
  ``report``."""
  avals = [core.typeof(x) for x in invals]
  floating = floating_operands(avals[:2])
  if floating:
    scope.sites.next()
  mode, reason = (("float", _RAGGED) if floating
                  else ("unchanged", NOT_FLOATING))
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
  if isinstance(value, (core.Jaxpr, ClosedJaxpr, lu.WrappedFun)):
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
        "here. Supported: " + ", ".join(sorted(p.name for p in HIGHER_ORDER_RULES)) + ".")
