import os
import shutil
import tempfile

import jax
import pytest

from dfpjax import cpu_ffi

_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """One JAX compilation cache for the whole run, new each run (unless JAX_COMPILATION_CACHE_DIR
  names one): the suite compiles many programs more than once, in several tests and in the
  trainer's subprocesses (a DFP train step takes tens of seconds to compile), and a cache made by
  this run's code is the only one it can trust. The directory is set before pytest-xdist starts
  its workers, which inherit it, as do subprocesses."""
  if _CACHE_DIR not in os.environ:
    config.dfpjax_cache_dir = os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="dfpjax-jax-cache-")
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])


def pytest_unconfigure(config):
  if hasattr(config, "dfpjax_cache_dir"):
    shutil.rmtree(config.dfpjax_cache_dir, ignore_errors=True)


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
