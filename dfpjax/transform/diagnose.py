"""``diagnose``: how well each DFP site of a function represents its operands on a batch."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import jaxpr_as_fun

from dfpjax.numerics.config import DFPConfig, QuantConfig
from dfpjax.numerics.quantization import NONFINITE_EXPONENT, quantize_with
from dfpjax.transform.report import sites_of, trace_recorded


@dataclasses.dataclass(frozen=True)
class SiteDiagnosis:
  """The numerics of one DFP product on one batch (docs/transform.md, "diagnose").

  Attributes:
    index, primitive, path, role: the product's ``report`` record (``role`` is its pass).
    calls: how often it ran (once per loop iteration, vmapped example, rematerialization);
      0 when it did not run on this batch (an untaken ``cond`` branch): then ``rel_error``
      is NaN and the per-operand tuples are empty.
    rel_error: ``||y_dfp - y_float|| / ||y_float||`` over all calls, in float64, where
      ``y_float`` is the float64 product (or gradient) of the float operands it was given.
    exponents: per operand, the (smallest, largest) exponent it was quantized with.
    mantissa_use: per operand, ``max|m| / (2**(bits-1) - 1)`` over its mantissas.
    underflow: per operand, the fraction of its nonzero elements that quantized to zero.
  """
  index: int
  primitive: str
  path: str
  role: str
  calls: int
  rel_error: float
  exponents: tuple[tuple[int, int], ...]
  mantissa_use: tuple[float, ...]
  underflow: tuple[float, ...]


class Diagnosis(list):
  """The :class:`SiteDiagnosis` list of one function and batch, printed as a table."""

  def __str__(self):
    header = ("#", "op", "pass", "path", "calls", "rel_error", "exponents", "mantissa_use",
              "underflow")
    rows = [header] + [
        (str(d.index), d.primitive, d.role, d.path or "<top>", str(d.calls),
         "-" if not d.calls else f"{d.rel_error:.2e}",
         " ".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in d.exponents) or "-",
         " ".join(f"{u:.3f}" for u in d.mantissa_use) or "-",
         " ".join(f"{u:.2e}" for u in d.underflow) or "-") for d in self]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def diagnose(fn: Callable, *args, config: DFPConfig | None = None, **kwargs) -> Diagnosis:
  """Runs ``fn(*args, **kwargs)`` and measures each DFP product it runs on that batch.

  ``fn`` is taken as :func:`dfpjax.report` takes it (e.g. ``jax.value_and_grad`` of a
  transformed loss, or a train step that calls one); the products are those of the
  report with mode ``"dfp"`` that a transform rewrote (not the DFP ops ``fn`` calls
  directly), in its order and with its indices, each site's forward
  product and, where ``fn`` differentiates it, its backward-data and backward-weights
  products. Each is measured on the operands it was actually given in this run (sent to
  the host by ``jax.debug.callback``, so this is for diagnosis, not for training):
  relative error against the float64 product of the same operands, and per operand its
  exponent, mantissa use and underflow (:class:`SiteDiagnosis`).

  The operand figures are those of round-to-nearest quantization with the site's
  ``bits`` and ``headroom`` (the exponent does not depend on the rounding), per tensor
  for a convolution and a gradient, per channel along the last free axis for a
  ``dot_general`` operand when ``granularity="channel"``.
  """
  calls = collections.defaultdict(list)

  def probe(number, role, arrays):
    calls[number, role].append([np.asarray(x) for x in arrays])
  closed, leaves, recorder = trace_recorded(fn, args, kwargs, config, probe)
  sites = sites_of(closed.jaxpr, recorder)
  jax.block_until_ready(jax.jit(jaxpr_as_fun(closed))(*leaves))
  jax.effects_barrier()
  out = Diagnosis()
  for record, number in zip(sites, sites.numbers):
    if record.mode != "dfp" or number is None:  # float, or a DFP op called directly
      continue
    params, cfg = recorder.details[number]
    measured = _measure(recorder.records[number], params, cfg, record.gradient,
                        calls[number, "forward" if record.gradient is None else "backward"])
    out.append(SiteDiagnosis(record.index, record.primitive, record.path, record.role,
                             *measured))
  return out


def _measure(site, params, config: DFPConfig, gradient, runs):
  """(calls, rel_error, exponents, mantissa_use, underflow) of one product over its runs."""
  if not runs:
    return 0, float("nan"), (), (), ()
  err2 = ref2 = 0.0
  stats = [_OperandStats(), _OperandStats()]
  for arrays in runs:
    if gradient is None:
      lhs, rhs, y = arrays
      ref = _float64_product(site.primitive, params, lhs, rhs)
      operands = ((lhs, config.forward, _channel_axis(site.primitive, params, lhs.ndim, 0)),
                  (rhs, config.forward, _channel_axis(site.primitive, params, rhs.ndim, 1)))
    else:
      lhs, rhs, g, dlhs, drhs = arrays
      with jax.enable_x64(True):
        _, vjp = jax.vjp(lambda a, b: _float64_product(site.primitive, params, a, b),
                         lhs.astype(np.float64), rhs.astype(np.float64))
        refs = vjp(g.astype(np.float64))
      partner, y, ref = (rhs, dlhs, refs[0]) if gradient == "data" else (lhs, drhs, refs[1])
      side = 1 if gradient == "data" else 0
      partner_axis = _channel_axis(site.primitive, params, partner.ndim, side)
      operands = ((g, config.gradient, None), (partner, config.forward, partner_axis))
    diff = np.asarray(y, np.float64) - np.asarray(ref, np.float64)
    err2 += float(np.sum(diff * diff))
    ref2 += float(np.sum(np.square(np.asarray(ref, np.float64))))
    for s, (x, cfg, axis) in zip(stats, operands):
      s.add(x, cfg, axis)
  rel = np.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else np.inf)
  return (len(runs), float(rel), tuple(s.exponents() for s in stats),
          tuple(s.use for s in stats), tuple(s.underflow() for s in stats))


class _OperandStats:
  """Quantization figures of one operand, accumulated over calls."""

  def __init__(self):
    self.lo, self.hi, self.use, self.zeroed, self.nonzero = None, None, 0.0, 0, 0

  def add(self, x, cfg: QuantConfig, axis):
    cfg = dataclasses.replace(cfg, rounding="nearest",
                              granularity="channel" if axis is not None and
                              cfg.granularity == "channel" else "tensor")
    t = quantize_with(jnp.asarray(x), cfg, axis=axis)
    m, e = np.asarray(t.mantissa).astype(np.int64), np.asarray(t.exponent)
    finite = e[e != NONFINITE_EXPONENT]
    if finite.size:
      self.lo = int(finite.min()) if self.lo is None else min(self.lo, int(finite.min()))
      self.hi = int(finite.max()) if self.hi is None else max(self.hi, int(finite.max()))
    self.use = max(self.use, float(np.abs(m).max(initial=0)) / (2 ** (cfg.bits - 1) - 1))
    nonzero = np.asarray(x) != 0
    self.nonzero += int(nonzero.sum())
    self.zeroed += int((nonzero & (m == 0)).sum())

  def exponents(self):
    """(smallest, largest) finite exponent; ``NONFINITE_EXPONENT`` twice when every call's
    operand held a NaN or an Inf."""
    return (self.lo, self.hi) if self.lo is not None else (NONFINITE_EXPONENT,) * 2

  def underflow(self):
    return self.zeroed / self.nonzero if self.nonzero else 0.0


def _channel_axis(primitive, params, ndim, side):
  """The axis a per-channel exponent of a ``dot_general`` operand runs along (its last
  free axis), as ``dfp_dot_general`` quantizes it; None for a convolution."""
  if primitive != "dot_general":
    return None
  (contract, batch) = (params["dimension_numbers"][0][side], params["dimension_numbers"][1][side])
  free = [d for d in range(ndim) if d not in tuple(contract) + tuple(batch)]
  return free[-1] if free else None


def _float64_product(primitive, params, lhs, rhs):
  """The site's product of ``lhs`` and ``rhs`` in float64."""
  with jax.enable_x64(True):
    lhs, rhs = (jnp.asarray(x, np.float64) for x in (lhs, rhs))
    if primitive == "dot_general":
      return lax.dot_general(lhs, rhs, params["dimension_numbers"],
                             preferred_element_type=np.float64)
    return lax.conv_general_dilated(
        lhs, rhs, params["window_strides"], params["padding"], params["lhs_dilation"],
        params["rhs_dilation"], params["dimension_numbers"], params["feature_group_count"],
        params["batch_group_count"], preferred_element_type=np.float64)


__all__ = ["Diagnosis", "SiteDiagnosis", "diagnose"]
