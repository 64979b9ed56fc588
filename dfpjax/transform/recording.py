"""What ``report`` and ``diagnose`` need from the interpreter while they trace a function.

While a :class:`Recorder` is active (``recording``), every ``dfp_transform`` call that
runs records each site it meets and binds the site inside a ``jax.named_scope`` that
names the record (``tag``). The scope is part of the name stack of every equation the
site produces, forward and, when JAX differentiates it, backward, so the traced program
tells which of its products came from which site (``report.sites_of``). A DFP site is
also wrapped (``wrap``) so that its backward products carry a scope of their own and,
for ``diagnose``, its operands and results are passed to the host.

Recording changes the trace context, so that no trace cached by ``jax.jit`` outside
the recording is reused (it would hold no records) and none made inside is reused
outside (it would hold scopes and probes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from typing import Callable

import jax

from dfpjax._jax_compat import classic_custom_vjp, in_forward_mode, int_state
from dfpjax.numerics.config import DFPConfig
from dfpjax.transform.names import Scope

_TAG = "dfpjax_site{}"
_GRADIENT_TAG = "dfpjax_site{}_gradient"
_TAG_PATTERN = re.compile(r"dfpjax_site(\d+)(_gradient)?$")

# Part of JAX's trace context: one fresh value per recording, so that jit's trace caches
# neither answer a recording with a trace made outside it nor keep its traces for later.
_recording_generation = int_state(
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
    probe: when set, called on the host as ``probe(number, role, arrays)`` with the
      operands and results of each DFP product that runs (``wrap``).
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


def site_of(name_stack) -> tuple[int, bool] | None:
  """The innermost site scope in ``name_stack``: the site's number, and whether the
  stack also holds that site's gradient scope (``wrap``; JAX may repeat the outer scopes
  after it, as it does in a transposed stack); None outside any site."""
  found = [(int(m.group(1)), m.group(2) is not None) for m in
           (_TAG_PATTERN.match(f.name) for f in name_stack.stack if isinstance(f, Scope)) if m]
  if not found:
    return None
  number = found[-1][0]
  return number, (number, True) in found


def wrap(recorder: Recorder, number: int, product: Callable, lhs, rhs, key):
  """``product(lhs, rhs, key)`` (a DFP op) in a custom_vjp whose backward pass runs the
  op's own under the scope of the site's gradient: ``report`` finds the backward
  products by that scope, wherever JAX runs them (a transpose frame does not tell them
  from a rematerialized forward). With ``recorder.probe``, the operands and results are
  sent to it: ``(lhs, rhs, y)`` when the op runs forward, ``(lhs, rhs, g, dlhs, drhs)``
  when its gradient runs; the float operands are then kept as residuals. The key (or
  None) is an operand, as a rule that JAX traces late must not close over it. In forward
  mode (``jax.jvp``, ``jax.jacfwd``), which a custom_vjp cannot take, the op as it is."""
  def send(role, *arrays):
    if recorder.probe is not None:
      jax.debug.callback(lambda *xs: recorder.probe(number, role, xs), *arrays)

  def forward(lhs, rhs, key):
    y = product(lhs, rhs, key)
    send("forward", lhs, rhs, y)
    return y

  if in_forward_mode((lhs, rhs)):  # no backward pass; the tangent products count as the op's
    return forward(lhs, rhs, key)

  # Classic whatever jax_custom_vjp3 says: a custom_vjp_call equation whose jaxpr shows the DFP
  # primitives (to report and jaxpr walkers); JAX 0.10 cannot differentiate a hijax custom_vjp
  # inside jax.checkpoint.
  wrapped = classic_custom_vjp(forward)

  def fwd(lhs, rhs, key):
    y, vjp = jax.vjp(lambda a, b: product(a, b, key), lhs, rhs)
    send("forward", lhs, rhs, y)
    return y, ((lhs, rhs) if recorder.probe is not None else None, vjp)

  def bwd(residuals, g):
    operands, vjp = residuals
    with jax.named_scope(_GRADIENT_TAG.format(number)):
      dlhs, drhs = vjp(g)
      if operands is not None:
        send("backward", *operands, g, dlhs, drhs)
    return dlhs, drhs, None

  wrapped.defvjp(fwd, bwd)
  return wrapped(lhs, rhs, key)
