"""The one binding to the C kernel: loads it, registers its XLA FFI targets, exposes ISA facts.

The kernel is chosen per call from the CPU's features; the environment variable
``DFPJAX_ISA`` (``portable``, ``avx2``, ``avx_vnni``, ``avx512_vnni``) forces a path,
read each time the kernel runs. Forcing a path the CPU lacks fails with an error.
"""

from __future__ import annotations

import ctypes
import functools

import jax

ISAS = ("portable", "avx2", "avx_vnni", "avx512_vnni")
DOT_GENERAL_TARGET = "dfpjax_dot_general"
CONV_TARGET = "dfpjax_conv"
QUANTIZE_TARGET = "dfpjax_quantize"


@functools.cache
def _library() -> ctypes.CDLL:
  try:
    from dfpjax.cpu_ffi import _kernel
  except ImportError as err:
    raise ImportError(
        "dfpjax's C kernel is not built; install the package with `pip install .` "
        "(it compiles the kernel with CMake)") from err
  lib = ctypes.CDLL(_kernel.__file__)
  lib.dfp_isa_supported.argtypes = [ctypes.c_int]
  lib.dfp_isa_emulated.argtypes = [ctypes.c_int]
  lib.dfp_isa_name.restype = ctypes.c_char_p
  lib.dfp_isa_name.argtypes = [ctypes.c_int]
  return lib


@functools.cache
def register() -> None:
  """Registers the FFI targets with XLA for the CPU platform (idempotent)."""
  lib = _library()
  jax.ffi.register_ffi_target(DOT_GENERAL_TARGET, jax.ffi.pycapsule(lib.DfpDotGeneral),
                              platform="cpu")
  jax.ffi.register_ffi_target(CONV_TARGET, jax.ffi.pycapsule(lib.DfpConv), platform="cpu")
  jax.ffi.register_ffi_target(QUANTIZE_TARGET, jax.ffi.pycapsule(lib.DfpQuantize), platform="cpu")


def supported_isas() -> tuple[str, ...]:
  """The kernel paths this CPU (and build) can run, slowest first."""
  lib = _library()
  return tuple(name for i, name in enumerate(ISAS) if lib.dfp_isa_supported(i))


def emulated_isas() -> tuple[str, ...]:
  """The paths this build runs on emulated intrinsics (a verification build, never the default)."""
  lib = _library()
  return tuple(name for i, name in enumerate(ISAS) if lib.dfp_isa_emulated(i))


def best_isa() -> str:
  """The path a call takes when ``DFPJAX_ISA`` is unset (never an emulated one)."""
  return ISAS[_library().dfp_best_isa()]


def selected_isa() -> str:
  """The path the next call takes, honouring ``DFPJAX_ISA``."""
  index = _library().dfp_selected_isa()
  if index < 0:
    raise ValueError(f"DFPJAX_ISA must be one of {ISAS}")
  return ISAS[index]
