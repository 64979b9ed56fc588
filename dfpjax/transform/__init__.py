"""dfp_transform: rewrite a traced JAX function so that its floating dot_generals and
convolutions run in DFP (docs/transform.md).

  api          dfp_transform: tracing, static arguments, the trace cache, dfp_key
  interpreter  the jaxpr interpreter: state, site rewriting, what it refuses
  rules        its rules, one per higher-order primitive (jit, scan, custom_vjp, ...)
  names        module paths and forward/backward from an equation's name stack
  report       report(fn, *args): the sites and what dfp_transform does with each
"""

from dfpjax.transform.api import dfp_transform
from dfpjax.transform.interpreter import SiteRecord
from dfpjax.transform.report import Report, report

__all__ = ["dfp_transform", "report", "Report", "SiteRecord"]
