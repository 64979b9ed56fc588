"""``dfp_transform``: run a function with its floating dot_generals and convolutions in DFP."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr  # public: it outlives JAX 0.12 folding it into Jaxpr

from dfpjax._jax_compat import api_util, core, source_info_util
from dfpjax.numerics.config import DFPConfig
from dfpjax.transform import interpreter, recording
from dfpjax.transform import rules  # noqa: F401  (registers the higher-order primitives' rules)


class _Traced(NamedTuple):
  jaxpr: ClosedJaxpr
  out_tree: Any
  rewrites: dict  # its sub-computations, rewritten (interpreter.Context.rewrites)


class Transform:
  """The state behind one ``dfp_transform(fn, ...)``: what to trace and the trace cache."""

  def __init__(self, fn: Callable, config: DFPConfig, static_argnums, static_argnames):
    self.fn = fn
    self.config = config
    if isinstance(static_argnums, int):
      static_argnums = (static_argnums,)
    if isinstance(static_argnames, str):
      static_argnames = (static_argnames,)
    # Like jax.jit, a static argument may be given by position or by name.
    self.static_argnums, self.static_argnames = api_util.infer_argnums_and_argnames(
        api_util.fun_signature(fn), tuple(static_argnums), tuple(static_argnames))
    self.cache: dict[Any, _Traced] = {}
    self.num_traces = 0

  def __call__(self, key, args, kwargs):
    """fn(*args, **kwargs) with its sites rewritten; ``key`` the stochastic-rounding key.

    While ``report`` or ``diagnose`` records (``recording``), the sites are recorded, with
    the recorder's config if it has one, and none of the cached rewrites is used.
    """
    leaves, traced = self._traced(args, kwargs)
    recorder = recording.active()
    if recorder is None:
      ctx = interpreter.Context(self.config, rewrites=traced.rewrites)
    else:
      recorder.calls += 1
      ctx = interpreter.Context(recorder.config or self.config, recorder=recorder)
    if ctx.config.needs_key and key is None:
      if recorder is None:
        raise ValueError("dfp_transform: this config rounds stochastically; call the "
                         "transformed function with dfp_key=jax.random.key(...)")
      key = jax.random.key(0)  # a recording needs some key, not a particular one
    elif not ctx.config.needs_key:
      key = None
    scope = interpreter.Scope(source_info_util.current_name_stack(), key)
    outs = interpreter.eval_jaxpr(ctx, traced.jaxpr.jaxpr, traced.jaxpr.consts, leaves, scope)
    # A constant output comes back as the jaxpr's literal, a JAX-internal typed number, and an
    # input passed through as it came (a NumPy array): arrays, as jax.jit returns them.
    outs = [o if isinstance(o, jax.Array) else jnp.asarray(o) for o in outs]
    return jax.tree.unflatten(traced.out_tree, outs)

  def _traced(self, args, kwargs):
    nums = {i if i >= 0 else i + len(args) for i in self.static_argnums}
    static_args = tuple((i, args[i]) for i in sorted(nums) if 0 <= i < len(args))
    static_kwargs = tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames))
    dynamic = (tuple(a for i, a in enumerate(args) if i not in nums),
               {k: v for k, v in kwargs.items() if k not in self.static_argnames})
    leaves, in_tree = jax.tree.flatten(dynamic)
    try:
      avals = tuple(core.typeof(x) for x in leaves)
    except TypeError as err:
      raise TypeError(f"dfp_transform: an argument is not a JAX type ({err}); mark it with "
                      "static_argnums or static_argnames") from None
    cache_key = (in_tree, avals, static_args, static_kwargs)
    try:
      traced = self.cache.get(cache_key)
    except TypeError as err:
      raise ValueError(f"dfp_transform: static arguments must be hashable ({err})") from None
    if traced is None:
      traced = self._trace(leaves, in_tree, len(args), dict(static_args), dict(static_kwargs))
      # A jaxpr that closed over an outer tracer is valid in this trace only.
      if not any(isinstance(c, core.Tracer) for c in traced.jaxpr.consts):
        self.cache[cache_key] = traced
    return leaves, traced

  def _trace(self, leaves, in_tree, num_args, static_args, static_kwargs) -> _Traced:
    self.num_traces += 1
    out_tree = []

    def flat_fn(*flat):
      dyn_args, dyn_kwargs = jax.tree.unflatten(in_tree, flat)
      dyn = iter(dyn_args)
      full = [static_args[i] if i in static_args else next(dyn) for i in range(num_args)]
      out = self.fn(*full, **dyn_kwargs, **static_kwargs)
      out_leaves, tree = jax.tree.flatten(out)
      out_tree.append(tree)
      return out_leaves

    jaxpr = jax.make_jaxpr(flat_fn)(*leaves)
    return _Traced(jaxpr, out_tree[0], {})


def dfp_transform(fn: Callable, config: DFPConfig | None = None, *,
                  static_argnums: int | Sequence[int] = (),
                  static_argnames: str | Sequence[str] = ()) -> Callable:
  """Returns ``fn`` with every floating ``dot_general`` and ``conv_general_dilated`` in DFP.

  ``fn`` is traced to a jaxpr (once per abstract signature: shapes, dtypes, pytree
  structure and static arguments), and the jaxpr is evaluated with its floating
  ``dot_general``/``conv_general_dilated`` equations replaced by
  :func:`dfpjax.dfp_dot_general` / :func:`dfpjax.dfp_conv_general_dilated` with the
  same parameters and output dtype, including those inside jit, scan, while, cond,
  remat, custom_jvp/custom_vjp (whose rules are kept and rewritten too) and
  shard_map. Everything else runs unchanged. See docs/transform.md.

  Args:
    fn: the function; any pytrees in and out.
    config: a :class:`dfpjax.DFPConfig` (default: the paper's 16-bit per-tensor DFP).
      ``config.ops`` and ``config.keep_float`` select the sites.
    static_argnums, static_argnames: arguments that are Python values (flags, modules),
      hashed into the trace cache as ``jax.jit`` does.

  Returns:
    A function with ``fn``'s signature. When the config rounds stochastically it takes
    one more keyword argument, ``dfp_key`` (a ``jax.random`` key).
  """
  if not callable(fn):
    raise TypeError(f"dfp_transform: fn must be a function, got {type(fn).__name__}")
  config = DFPConfig() if config is None else config
  if not isinstance(config, DFPConfig):
    raise TypeError(f"config must be a dfpjax.DFPConfig, got {type(config).__name__}")
  transform = Transform(fn, config, static_argnums, static_argnames)

  @functools.wraps(fn)
  def transformed(*args, **kwargs):
    if config.needs_key:
      key = kwargs.pop("dfp_key", None)
    elif "dfp_key" in kwargs:  # else fn would be called with it, and name it as its own
      raise TypeError("dfp_key is given, but the config rounds to nearest: it takes no key")
    else:
      key = None
    return transform(key, args, kwargs)

  transformed.dfp_transform = transform
  return transformed
