"""The one door to JAX's internals: every private JAX name dfpjax uses, each with why.

``jax.extend`` and the public API do not reach these, and they carry no compatibility
promise, so dfpjax supports the JAX range it pins (in its package metadata, from
pyproject.toml) and checks it here, at import, before touching any of them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import jax
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def supported_jax() -> str:
  """The JAX versions dfpjax supports, as its installed metadata pins them (">=a,<b")."""
  try:
    requirements = importlib.metadata.requires("dfpjax") or []
  except importlib.metadata.PackageNotFoundError as err:
    raise ImportError("dfpjax is not installed (its metadata pins the JAX versions it "
                      "supports): install it, e.g. `pip install -e .` in its checkout") from err
  for line in requirements:
    requirement = Requirement(line)
    if requirement.name == "jax" and requirement.marker is None:  # lower bound first
      return ",".join(sorted(map(str, requirement.specifier), key=lambda s: s.startswith("<")))
  raise ImportError("dfpjax's metadata names no jax requirement: reinstall dfpjax")


def check_jax_version(installed: str, supported: str) -> None:
  """Raises ImportError unless JAX ``installed`` is within ``supported`` (a specifier)."""
  if Version(installed) not in SpecifierSet(supported):
    raise ImportError(f"dfpjax supports jax{supported}, but jax {installed} is installed; "
                      f"install a supported version (pip install 'jax{supported}')")


check_jax_version(jax.__version__, supported_jax())
# The supported range spans three minor versions (0.10-0.12), whose internals differ where
# branched below.
_JAX_0_11 = Version(jax.__version__) >= Version("0.11")
_JAX_0_12 = Version(jax.__version__) >= Version("0.12")

# pylint: disable=g-bad-import-order,wrong-import-position
# Tracing and interpreting jaxprs (transform/): the jaxpr data types, tracing a function
# to a jaxpr and binding equations under their source info, as core.eval_jaxpr does.
from jax._src import api_util  # debug_info and static argnums of the functions we trace
from jax._src import core  # Jaxpr, Var, Literal, typeof, last_used: what eval_jaxpr walks;
# mapped_aval/unmapped_aval for the DFP ops' bilinear primitives' batching
from jax._src import linear_util as lu  # WrappedFun: the subfuns call primitives bind with
from jax._src import source_info_util  # name stacks: module paths, the backward marker
from jax._src.ad_util import SymbolicZero, Zero  # the symbolic zeros custom rules pass
from jax._src.interpreters import ad  # CustomVJPException (as JAX's custom_vjp raises it);
# primitive_jvps/transposes, Zero, instantiate_zeros: the DFP ops' forward-mode rules
from jax._src.interpreters import partial_eval as pe  # separate_consts, close_jaxpr
if _JAX_0_11:
  # FlatTree moved to its own module, its constructors became module functions.
  from jax._src import flattree  # flatten_args: the form tracing takes; scan's operand groups
  flatten, flatten_args = flattree.flatten, flattree.flatten_args
  # trace_to_jaxpr became a cache keyed on the function; ours are fresh closures, so trace
  # uncached, as trace_to_jaxpr did in 0.10.
  from jax._src.interpreters.partial_eval import trace_to_jaxpr_nocache as trace_to_jaxpr
else:
  from jax._src.tree_util import FlatTree  # flatten_args: the form tracing takes
  flatten, flatten_args = FlatTree.flatten, FlatTree.flatten_args
  from jax._src.interpreters.partial_eval import trace_to_jaxpr
# Higher-order primitives the interpreter rewrites inside, absent from jax.extend.
from jax._src import hijax  # CustomVJPTraced: custom_vjp under jax_custom_vjp3
# A vmapped CustomVJPTraced (0.10, 0.11); 0.12 batches one into a CustomVJPTraced of vmapped
# rules instead, and has no VmapOf.
VmapOf = None if _JAX_0_12 else hijax.VmapOf
from jax._src.custom_derivatives import CustomVJPPrimal  # a custom_vjp3 fwd's wrapped inputs
from jax._src.hijax import call_hi_primitive_p  # how jax_custom_vjp3 stages a custom_vjp
# The base class of hijax primitives; the transform stops at one it does not know (tested).
HiPrimitive = hijax.HiPrim if _JAX_0_11 else hijax.VJPHiPrimitive  # renamed in 0.11
# How the opt-in jax_custom_jvp3 stages a custom_jvp (JAX 0.11; None before).
CustomJVPTraced = hijax.CustomJVPTraced if _JAX_0_11 else None
from jax._src.lax.control_flow.common import _merge_common_consts  # cond branches' consts
from jax._src.shard_map import shard_map_p  # shard_map's primitive, to rewrite its body
from jax._src.sharding_impls import UNSPECIFIED  # in_shardings of operands added to a jit
from jax._src.lax.lax import ragged_dot_general_p  # listed by report as a product left in float
from jax._src.config import int_state  # report's trace-context option (no cached traces)
# The DFP primitives (primitives/).
from jax._src.config import custom_vjp3  # custom_vjp3(False): classic custom_vjp staging
if _JAX_0_11:
  from jax._src.config import custom_jvp3  # custom_jvp3(False): classic custom_jvp staging
else:
  custom_jvp3 = lambda value: contextlib.nullcontext()  # the flag is new in 0.11
from jax._src.core import auto_insert_reshard  # pvary operands as lax.dot_general does
from jax._src.core import ShapedArray, get_cur_mesh_sharding  # outputs' varying manual axes
from jax._src.lax import convolution as lax_conv  # JAX's conv transpose-rule helpers
# custom_partitioning needs the devices when a DFP primitive is lowered (as cudnn's ops mark).
from jax._src.dispatch import prim_requires_devices_during_lowering
# Reports (transform/report.py).
from jax._src.dtypes import short_dtype_name  # "f32"-style names, as jaxprs print them


def staged(custom, hijax_form: bool):
  """A decorator like ``custom`` (``jax.custom_jvp`` or ``jax.custom_vjp``) whose functions are
  staged as the opt-in flag (``jax_custom_jvp3``, ``jax_custom_vjp3``) set to ``hijax_form``
  stages them (a hijax ``call_hi_primitive`` equation, or a classic ``custom_jvp_call`` /
  ``custom_vjp_call`` one), whatever the flag says elsewhere: JAX 0.10 and 0.11 read it when
  such a function is defined, 0.12 when it is called, so it is set at both."""
  flag = {jax.custom_jvp: custom_jvp3, jax.custom_vjp: custom_vjp3}[custom]

  class Staged(custom):

    def __call__(self, *args, **kwargs):
      with flag(hijax_form):
        return super().__call__(*args, **kwargs)

  def define(fun, nondiff_argnums=()):
    with flag(hijax_form):
      return Staged(fun, nondiff_argnums=nondiff_argnums)

  return define


def in_forward_mode(values) -> bool:
  """Whether any of ``values`` is a tracer of forward-mode differentiation (``jax.jvp``,
  ``jax.jacfwd``), not of the linearization ``jax.grad``, ``jax.vjp`` and ``jax.linearize`` run:
  a ``jax.custom_vjp`` has no forward-mode rule, so dfpjax's own (a recompute region's
  backward pass, report's site wrapper) step aside there."""
  return any(isinstance(v, ad.JVPTracer) for v in values)


# The DFP ops' custom_jvp and report's site wrapper stay classic equations (primitives/,
# transform/recording.py).
classic_custom_jvp = staged(jax.custom_jvp, False)
classic_custom_vjp = staged(jax.custom_vjp, False)


def scan_consts_and_carry(params) -> tuple[int, int]:
  """How many of a scan's operands are consts and how many carry (the rest are xs)."""
  if _JAX_0_11:  # flat trees of the (consts, carry, xs) operands
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)
  return params["num_consts"], params["num_carry"]


def scan_params(params, jaxpr, new_consts: int, new_carry: int) -> dict:
  """A scan's ``params`` for ``jaxpr``, which takes ``new_consts`` more leading consts and
  ``new_carry`` more leading carry (and returns those first)."""
  if _JAX_0_11:  # grouped as JAX's own rules prepend operands: a group of nones before each
    consts, carry, xs = params["ft_in"].unpack()
    carry_out, ys = params["ft_out"].unpack()
    carry = flattree.pack((flattree.nones(new_carry), carry))
    carry_out = flattree.pack((flattree.nones(new_carry), carry_out))
    return dict(params, jaxpr=jaxpr,
                ft_in=flattree.pack((flattree.pack((flattree.nones(new_consts), consts)),
                                     carry, xs)),
                ft_out=flattree.pack((carry_out, ys)))
  return dict(params, jaxpr=jaxpr, num_consts=params["num_consts"] + new_consts,
              num_carry=params["num_carry"] + new_carry)


if _JAX_0_11:
  # A jax_custom_vjp3 custom_vjp is applied to (consts, fwd_consts, *args): the primal's
  # closed-over values, then extra inputs of the fwd rule; its primal takes (consts, *args).
  CUSTOM_VJP3_LEADING_ARGS, CUSTOM_VJP3_PRIMAL_LEADING_ARGS = 2, 1
else:
  CUSTOM_VJP3_LEADING_ARGS, CUSTOM_VJP3_PRIMAL_LEADING_ARGS = 0, 0  # applied to (*args)
# A jax_custom_jvp3 custom_jvp is applied to (consts, *args) in 0.12, to (*args) in 0.11; its
# primal takes the same leading arguments.
CUSTOM_JVP3_LEADING_ARGS = 1 if _JAX_0_12 else 0


def hijax_static_positions(in_avals) -> frozenset[int]:
  """The positions of a hijax custom_vjp's or custom_jvp's nondiff (static) arguments among
  its application's, given its ``in_avals``: each a ``hijax.Static`` (where 0.11's
  ``static_argnums`` point, which its constructors take; 0.12 has only these)."""
  return frozenset(i for i, a in enumerate(in_avals) if isinstance(a, hijax.Static))


def _without(xs, lead: int, n: int):
  """(``xs[lead:lead + n]``, ``xs`` without them)."""
  return tuple(xs[lead:lead + n]), (*xs[:lead], *xs[lead + n:])


def custom_vjp3_like(prim, traced, fwd, bwd, in_avals):
  """A jax_custom_vjp3 custom_vjp (``hijax.CustomVJPTraced``) with these parts, its options
  (symbolic zeros, remat, logs, batching) those of ``prim``."""
  if _JAX_0_12:
    if prim.remat_rules is not None or prim.bwd_accums is not None:
      raise NotImplementedError(
          f"dfp_transform cannot rewrite the custom_vjp {prim.traced.fun_name!r}: its rules were "
          "given by defremat or defvjp_with_accums, which it does not rewrite (defvjp's and "
          "defvjp_with_logs' it does)")
    return hijax.CustomVJPTraced(traced, fwd, bwd, in_avals, prim.symbolic_zeros,
                                 prim.opt_remat, prim.with_logs,
                                 generic_batching=prim.generic_batching)
  static_argnums = hijax_static_positions(in_avals)
  if _JAX_0_11:  # a bwd rule may return logs (defvjp_with_logs)
    return hijax.CustomVJPTraced(traced, fwd, bwd, in_avals, prim.symbolic_zeros,
                                 static_argnums, prim.opt_remat, prim.with_logs)
  return hijax.CustomVJPTraced(traced, fwd, bwd, in_avals, prim.symbolic_zeros,
                               static_argnums, prim.opt_remat)


def custom_vjp3_fwd_keys(args, nk: int):
  """The arguments of a jax_custom_vjp3 fwd rule whose application takes ``nk`` keys after
  JAX's leading arguments, as (the keys, the arguments without them): 0.12's rule takes
  ``(nzs_in, *args)``, ``nzs_in`` an entry for each argument; 0.10's and 0.11's ``(*args)``."""
  lead = CUSTOM_VJP3_LEADING_ARGS
  if _JAX_0_12:
    nonzeros, *args = args
    keys, args = _without(args, lead, nk)
    return keys, (_without(nonzeros, lead, nk)[1], *args)
  return _without(args, lead, nk)


def _map_cotangents(result, f, with_logs: bool):
  """A bwd ``result``, ``(cotangents, logs)`` where ``with_logs`` else the cotangents, with
  the cotangents mapped by ``f``."""
  if with_logs:
    cotangents, logs = result
    return f(cotangents), logs
  return f(result)


def custom_vjp3_bwd_with_keys(prim, result, keys):
  """``result`` of the bwd rule of ``prim`` (a ``CustomVJPTraced``) with no cotangents for
  ``keys``, arguments ahead of its own, put first: 0.12's rule gives ``(cotangents, logs)``,
  each cotangent a value or a symbolic zero; 0.10's and 0.11's are the user's (None for no
  cotangent), with logs where a defvjp_with_logs rule gave them."""
  if _JAX_0_12:
    cotangents, logs = result
    return (*(Zero(core.typeof(k).to_ct_aval()) for k in keys), *cotangents), logs
  return _map_cotangents(result, lambda cts: (None,) * len(keys) + tuple(cts),
                         _JAX_0_11 and prim.with_logs)


def custom_jvp3_rule(prim):
  """The jvp rule of ``prim`` (a ``CustomJVPTraced``): in 0.12 ``rule(primals, tangents)``
  over the application's arguments, in 0.11 the user's ``rule(*static_args, primals,
  tangents)`` over the others."""
  return prim.jvp_rule if _JAX_0_12 else prim.jvp_fun


def custom_jvp3_like(prim, traced, rule, in_avals):
  """A jax_custom_jvp3 custom_jvp (``CustomJVPTraced``) with these parts, its symbolic zeros
  those of ``prim``."""
  if _JAX_0_12:
    return CustomJVPTraced(traced, rule, in_avals, prim.symbolic_zeros)
  return CustomJVPTraced(traced, rule, in_avals, prim.symbolic_zeros,
                         hijax_static_positions(in_avals))


def custom_vjp_call_bwd_cotangents(result, f):
  """``result`` of a ``custom_vjp_call``'s flat bwd with its input cotangents mapped by
  ``f``: on 0.11 always with logs (None unless a defvjp_with_logs rule's)."""
  return _map_cotangents(result, f, _JAX_0_11)


__all__ = ["api_util", "core", "lu", "source_info_util", "SymbolicZero", "Zero", "ad", "pe",
           "flatten", "flatten_args", "trace_to_jaxpr", "hijax", "CustomVJPPrimal",
           "call_hi_primitive_p", "HiPrimitive", "VmapOf", "staged", "classic_custom_jvp",
           "classic_custom_vjp", "_merge_common_consts", "shard_map_p",
           "UNSPECIFIED", "custom_vjp3", "custom_jvp3", "auto_insert_reshard", "ShapedArray",
           "get_cur_mesh_sharding", "lax_conv", "prim_requires_devices_during_lowering",
           "short_dtype_name", "ragged_dot_general_p", "int_state", "check_jax_version",
           "supported_jax", "scan_consts_and_carry", "scan_params", "CUSTOM_VJP3_LEADING_ARGS",
           "CUSTOM_VJP3_PRIMAL_LEADING_ARGS", "CUSTOM_JVP3_LEADING_ARGS", "hijax_static_positions",
           "custom_vjp3_like", "custom_vjp3_fwd_keys", "custom_vjp3_bwd_with_keys",
           "custom_jvp3_rule", "custom_jvp3_like", "custom_vjp_call_bwd_cotangents",
           "CustomJVPTraced", "in_forward_mode"]
