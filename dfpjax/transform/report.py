"""``report``: which call sites ``dfp_transform`` rewrites, and why."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from dfpjax._jax_compat import short_dtype_name
from dfpjax.numerics.config import DFPConfig
from dfpjax.transform import interpreter
from dfpjax.transform.api import Transform
from dfpjax.transform.interpreter import SiteRecord


class Report(list):
  """The :class:`SiteRecord` list of one function, printed as a table."""

  def __str__(self):
    header = ("#", "op", "pass", "path", "operands", "out", "mode", "reason")
    rows = [header] + [
        ("-" if r.index is None else str(r.index),
         r.primitive,
         r.direction,
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
  """Lists the ``dot_general``/``conv_general_dilated`` sites of ``fn(*args, **kwargs)``.

  One record per equation in the traced program, in the order ``dfp_transform`` meets
  them (a site in a loop body is listed once): primitive, operand and output shapes and
  dtypes, module path, pass (``"backward"`` when it came from a transpose), mode (``"dfp"``,
  ``"float"`` or ``"unchanged"``) and the reason. Nothing is computed: the arguments
  may be ``jax.ShapeDtypeStruct``s.

  ``fn`` is a plain function (``config`` defaults to ``DFPConfig()``) or the result of
  :func:`dfp_transform` (its config and static arguments are used unless ``config``
  is given). Pass Python flags of a plain function with ``functools.partial``. Sites
  in custom_jvp/custom_vjp rules are listed only when ``fn`` differentiates them.
  """
  transform = getattr(fn, "dfp_transform", None)
  if not isinstance(transform, Transform):
    transform = Transform(fn, config or DFPConfig(), (), ())
  config = config or transform.config
  if config is not transform.config:
    transform = Transform(transform.fn, config, transform.static_argnums,
                          transform.static_argnames)
  kwargs.pop("dfp_key", None)
  key = jax.random.key(0) if config.needs_key else None
  ctx = interpreter.Context(config, records=[])
  static = (set(i if i >= 0 else i + len(args) for i in transform.static_argnums),
            set(transform.static_argnames))

  def split(args, kwargs):
    dyn_args = [a for i, a in enumerate(args) if i not in static[0]]
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in static[1]}
    return dyn_args, dyn_kwargs

  def run(dyn_args, dyn_kwargs):
    it = iter(dyn_args)
    full_args = [a if i in static[0] else next(it) for i, a in enumerate(args)]
    full_kwargs = {k: kwargs[k] if k in static[1] else dyn_kwargs[k] for k in kwargs}
    return transform(ctx, key, full_args, full_kwargs)

  jax.eval_shape(run, *split(args, kwargs))
  return Report(ctx.records)


__all__ = ["Report", "SiteRecord", "report"]
