"""dfp_transform: rewrite a traced JAX function so that its floating dot_generals and
convolutions run in DFP (docs/transform.md).

  api          dfp_transform: tracing, static arguments, the trace cache, dfp_key
  interpreter  the jaxpr interpreter: state, site rewriting, what it refuses
  rules        its rules, one per higher-order primitive (jit, scan, custom_vjp, ...)
  recompute    recompute(fn): a region whose products' outputs the backward pass recomputes
  names        module paths and forward/backward from an equation's name stack
  recording    what report and diagnose collect while the interpreter runs
  report       report(fn, *args): the products fn runs and what DFP does with each
  diagnose     diagnose(fn, *args): each DFP product's error and operand use on a batch
"""

from dfpjax.transform.api import dfp_transform
from dfpjax.transform.diagnose import Diagnosis, SiteDiagnosis, diagnose
from dfpjax.transform.interpreter import SiteRecord
from dfpjax.transform.recompute import RecomputePolicy, recompute
from dfpjax.transform.report import Report, report

__all__ = ["dfp_transform", "recompute", "RecomputePolicy", "report", "Report", "SiteRecord", "diagnose", "Diagnosis",
           "SiteDiagnosis"]
