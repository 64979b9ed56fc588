"""What ``report`` and ``diagnose`` need from the interpreter while they trace a function.

While a :class:`Recorder` is active (``recording``), every ``dfp_transform`` call that
runs records each site it meets and binds the site inside a ``jax.named_scope`` that
names the record (``tag``). The scope is part of the name stack of every equation the
site produces, forward and, when JAX differentiates it, backward, so the traced program
tells which of its products came from which site (``report.sites_of``). For
``diagnose`` a DFP site is also wrapped in ``probe``, which passes the operands and
results of its forward and backward products to the host.

Recording changes the trace context, so that no trace cached by ``jax.jit`` outside
the recording is reused (it would hold no records) and none made inside is reused
outside (it would hold scopes and probes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import re
from typing import Any, Callable

import jax
from jax._src import config as jax_config

from dfpjax.numerics.config import DFPConfig
from dfpjax.primitives.operands import classic_custom_vjp
from dfpjax.transform.names import Scope

_TAG = "dfpjax_site{}"
_TAG_PATTERN = re.compile(r"dfpjax_site(\d+)$")

# Part of JAX's trace context: one fresh value per recording, so that jit's trace caches
# neither answer a recording with a trace made outside it nor keep its traces for later.
_recording_generation = jax_config.int_state(
    "dfpjax_recording_generation", 0,
    "Set by dfpjax.report and dfpjax.diagnose while they trace (internal).",
    include_in_trace_context=True)
_generations = itertools.count(1)


@dataclasses.dataclass
class Recorder:
  """The sites met while recording, in order; a site's number is its place here.

  Attributes:
    config: replaces every transform's own config when given.
    records: the ``SiteRecord`` of each site met (``interpreter.SiteRecord``).
    details: each site's equation params and the config it ran with (for ``diagnose``).
    probe: when set, DFP sites are wrapped by ``probe`` and call it with
      ``(number, role, arrays)`` on the host (``role``: "forward" or "backward").
  """
  config: DFPConfig | None = None
  records: list = dataclasses.field(default_factory=list)
  details: list = dataclasses.field(default_factory=list)
  probe: Callable[[int, str, tuple], None] | None = None
  calls: int = 0  # how many dfp_transform calls ran

  def add(self, record, params, config: DFPConfig) -> int:
    self.records.append(record)
    self.details.append((params, config))
    return len(self.records) - 1


_active: list[Recorder] = []


def active() -> Recorder | None:
  return _active[-1] if _active else None


@contextlib.contextmanager
def recording(recorder: Recorder):
  _active.append(recorder)
  try:
    with _recording_generation(next(_generations)):
      yield recorder
  finally:
    _active.pop()


def tag(number: int):
  """The named scope of site ``number``."""
  return jax.named_scope(_TAG.format(number))


def site_number(name_stack) -> int | None:
  """The number of the innermost site scope in ``name_stack``, or None."""
  for frame in reversed(name_stack.stack):
    match = isinstance(frame, Scope) and _TAG_PATTERN.match(frame.name)
    if match:
      return int(match.group(1))
  return None


def probe(recorder: Recorder, number: int, product: Callable[[Any, Any], Any], lhs, rhs):
  """``product(lhs, rhs)`` (a DFP op), with its operands and results sent to
  ``recorder.probe``: ``(lhs, rhs, y)`` when it runs forward, and ``(lhs, rhs, g, dlhs,
  drhs)`` when its gradient runs (JAX then traces ``bwd``). The float operands are kept
  as residuals for that."""
  send = functools.partial(_send, recorder, number)

  @classic_custom_vjp
  def probed(lhs, rhs):
    y = product(lhs, rhs)
    send("forward", lhs, rhs, y)
    return y

  def fwd(lhs, rhs):
    y, vjp = jax.vjp(product, lhs, rhs)
    send("forward", lhs, rhs, y)
    return y, (lhs, rhs, vjp)

  def bwd(residuals, g):
    lhs, rhs, vjp = residuals
    dlhs, drhs = vjp(g)
    send("backward", lhs, rhs, g, dlhs, drhs)
    return dlhs, drhs

  probed.defvjp(fwd, bwd)
  return probed(lhs, rhs)


def _send(recorder: Recorder, number: int, role: str, *arrays):
  jax.debug.callback(lambda *xs: recorder.probe(number, role, xs), *arrays)
