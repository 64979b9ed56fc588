import os

import pytest

from dfpjax import cpu_ffi


@pytest.fixture(params=cpu_ffi.ISAS)
def isa(request, monkeypatch):
  """Forces each kernel path in turn (DFPJAX_ISA); paths this CPU lacks are skipped."""
  name = request.param
  if name not in cpu_ffi.supported_isas():
    pytest.skip(f"this CPU cannot run the {name} kernel path (supported: {cpu_ffi.supported_isas()})")
  monkeypatch.setenv("DFPJAX_ISA", name)
  assert cpu_ffi.selected_isa() == name
  return name


def pytest_report_header(config):
  emulated = cpu_ffi.emulated_isas()
  return (f"dfpjax kernel paths on this CPU: {cpu_ffi.supported_isas()}; "
          f"default {cpu_ffi.best_isa()}; DFPJAX_ISA={os.environ.get('DFPJAX_ISA', '')!r}"
          + (f"; emulated (SIMDe, verification build): {emulated}" if emulated else ""))
