"""The one binding to the C kernel: loads it, registers its XLA FFI targets, states the kernel
contract (the named attributes of each target), exposes ISA facts.

The kernel is chosen per call from the CPU's features; the environment variable
``DFPJAX_ISA`` (``portable``, ``avx2``, ``avx_vnni``, ``avx512_vnni``) forces a path. It is
checked when the targets are registered and again each time the kernel runs (it may change in
between); forcing a path the CPU lacks fails with an error.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import os
import re

import jax
import numpy as np

ISAS = ("portable", "avx2", "avx_vnni", "avx512_vnni")
DOT_GENERAL_TARGET = "dfpjax_dot_general"
CONV_TARGET = "dfpjax_conv"
QUANTIZE_TARGET = "dfpjax_quantize"
# dfpjax_quantize with each group's amax given as its magnitude bit pattern (uint32 [groups]).
QUANTIZE_GIVEN_MAX_TARGET = "dfpjax_quantize_given_max"
# Each group's amax as its magnitude bit pattern (uint32 [groups]): what the one above takes.
MAX_MAGNITUDES_TARGET = "dfpjax_max_magnitudes"
# Per-channel sums of float32 rows in one read (dfp_channel_sums in the kernel).
CHANNEL_SUMS_TARGET = "dfpjax_channel_sums"
CONV_MODES = ("forward", "backward_weights", "backward_data")
KERNEL_SPATIAL_DIMS = 3  # dfp_conv_shape: a convolution of fewer dimensions pads with size 1


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
  lib.dfp_isa_tile.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
  return lib


def _bad_isa_variable() -> ValueError:
  return ValueError(f"DFPJAX_ISA={os.environ.get('DFPJAX_ISA')!r} is not a kernel path; DFPJAX_ISA "
                    f"must be one of {', '.join(ISAS)} (or unset for the best this CPU runs)")


def _check_isa_variable() -> None:
  """Raises ``ValueError`` naming ``DFPJAX_ISA`` and its value if it names no kernel path."""
  if os.environ.get("DFPJAX_ISA", "") not in ("", *ISAS):
    raise _bad_isa_variable()


def register() -> None:
  """Registers the FFI targets with XLA for the CPU platform (once), after checking
  ``DFPJAX_ISA``: a bad value raises here, when the first DFP op is lowered."""
  _check_isa_variable()
  _register()


def kernel_ffi_api() -> tuple[int, int]:
  """The XLA FFI API version (major, minor) of the headers the kernel was built against."""
  major, minor = ctypes.c_int32(), ctypes.c_int32()
  _library().DfpFfiApiVersion(ctypes.byref(major), ctypes.byref(minor))
  return major.value, minor.value


def installed_ffi_api() -> tuple[int, int] | None:
  """The installed jaxlib's XLA FFI API version, as the C API header it ships for handlers
  (under ``jax.ffi.include_dir()``) defines it; None where that header is missing."""
  try:
    with open(os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")) as f:
      header = f.read()
  except OSError:
    return None
  parts = [re.search(rf"^#define XLA_FFI_API_{part} (\d+)$", header, re.MULTILINE)
           for part in ("MAJOR", "MINOR")]
  return None if None in parts else (int(parts[0].group(1)), int(parts[1].group(1)))


def check_ffi_api(built: tuple[int, int], installed: tuple[int, int] | None) -> None:
  """Raises RuntimeError where the kernel was ``built`` against a newer XLA FFI API than the
  ``installed`` jaxlib's, whose XLA would refuse its handlers at their first call."""
  if installed is not None and built > installed:
    raise RuntimeError(
        f"dfpjax's kernel was built against XLA FFI API {built[0]}.{built[1]}, newer than the "
        f"installed jaxlib {importlib.metadata.version('jaxlib')}'s {installed[0]}.{installed[1]}, "
        "which refuses its handlers (a build with --no-build-isolation takes the headers of the "
        "jaxlib installed at the time): reinstall dfpjax (`pip install .`, or `pip install -e .` "
        "in a checkout, builds it against the oldest JAX it supports)")


@functools.cache
def _register() -> None:
  lib = _library()
  check_ffi_api(kernel_ffi_api(), installed_ffi_api())
  jax.ffi.register_ffi_target(DOT_GENERAL_TARGET, jax.ffi.pycapsule(lib.DfpDotGeneral),
                              platform="cpu")
  jax.ffi.register_ffi_target(CONV_TARGET, jax.ffi.pycapsule(lib.DfpConv), platform="cpu")
  jax.ffi.register_ffi_target(QUANTIZE_TARGET, jax.ffi.pycapsule(lib.DfpQuantize), platform="cpu")
  jax.ffi.register_ffi_target(QUANTIZE_GIVEN_MAX_TARGET, jax.ffi.pycapsule(lib.DfpQuantizeGivenMax),
                              platform="cpu")
  jax.ffi.register_ffi_target(MAX_MAGNITUDES_TARGET, jax.ffi.pycapsule(lib.DfpMaxMagnitudes),
                              platform="cpu")
  jax.ffi.register_ffi_target(CHANNEL_SUMS_TARGET, jax.ffi.pycapsule(lib.DfpChannelSums),
                              platform="cpu")


@dataclasses.dataclass(frozen=True)
class SplitSums:
  """The kernel's output of exact integer sums ``s`` in two parts (``dfp_out_format``
  ``DFP_OUT_SPLIT_U8`` / ``_U16``): int32 high parts ``s >> low_bits`` (floor) and low parts
  ``s - (high << low_bits)`` in ``[0, 2**low_bits)``, of ``low_dtype`` (uint8 or uint16), so
  ``s = high * 2**low_bits + low``. Given as a product's ``out_dtype``; its call returns the
  two parts. The kernel fails where a high part of its own sums could leave int32."""
  low_bits: int
  low_dtype: np.dtype


def output_attributes(out_dtype) -> dict:
  """The named attributes of a product's output (both product targets): ``low_bits`` of
  ``SplitSums``, 0 for any other output."""
  return {"low_bits": np.int32(out_dtype.low_bits if isinstance(out_dtype, SplitSums) else 0)}


def conv_attributes(*, batch, in_spatial, out_spatial, window, strides, padding_lo, lhs_dilation,
                    rhs_dilation, groups, in_channels, out_channels, mode, weight_taps=None,
                    transposed_weights=False, features_major_weights=False) -> dict:
  """The named attributes of ``CONV_TARGET``: the kernel contract for one convolution.

  Describes the forward convolution (``dfp_conv_shape`` in the kernel's ``dfp_kernel.h``),
  channels-last, of at most 3 spatial dimensions: ``x`` [batch, *in_spatial, groups *
  in_channels], ``w`` [*window, in_channels, groups * out_channels], ``y`` [batch,
  *out_spatial, groups * out_channels]; ``mode`` (one of ``CONV_MODES``) says which of them
  the call computes. In mode ``forward`` the operand ``b`` may hold ``w`` through a view
  (``dfp_weight_view``): ``weight_taps``, per spatial dimension ``(b_window, first, step)``,
  says that tap ``t`` is ``b``'s tap ``first + step * t`` of its window of ``b_window`` (None:
  ``b``'s taps are the window's), and ``transposed_weights`` that ``b`` is ``[*b_window,
  out_channels, groups * in_channels]``, the weights of the convolution this one is the
  backward-data of; ``features_major_weights`` (also in mode ``backward_data``) that the
  weights' last dimension is their outermost in memory (the operand's XLA layout must say so:
  ``features_major_layout``). The spatial sequences are padded in front to the kernel's 3 dimensions
  (size 1, stride and dilations 1, padding 0). Returns keyword arguments for
  ``jax.ffi.ffi_lowering(CONV_TARGET)``, typed as the handler decodes them: int64 scalars,
  int64 arrays and the mode's name. Raises ``ValueError`` naming a bad argument.
  """
  spatial = dict(in_spatial=in_spatial, out_spatial=out_spatial, window=window, strides=strides,
                 padding_lo=padding_lo, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation)
  nd = len(window)
  if nd > KERNEL_SPATIAL_DIMS:
    raise ValueError(f"conv_attributes: window {tuple(window)} has more than "
                     f"{KERNEL_SPATIAL_DIMS} spatial dimensions")
  least = dict(in_spatial=0, out_spatial=0, window=0, padding_lo=None)  # the rest: at least 1
  attributes = {}
  for name, values in spatial.items():
    values = tuple(int(v) for v in values)
    if len(values) != nd:
      raise ValueError(f"conv_attributes: {name} {values} has {len(values)} entries where window "
                       f"{tuple(window)} has {nd}")
    low = least.get(name, 1)
    if low is not None and any(v < low for v in values):
      raise ValueError(f"conv_attributes: {name} {values} must be >= {low}")
    fill = 0 if name == "padding_lo" else 1
    attributes[name] = np.asarray((fill,) * (KERNEL_SPATIAL_DIMS - nd) + values, np.int64)
  for name, value, low in (("batch", batch, 0), ("groups", groups, 1),
                           ("in_channels", in_channels, 0), ("out_channels", out_channels, 0)):
    if int(value) < low:
      raise ValueError(f"conv_attributes: {name} = {value} must be >= {low}")
    attributes[name] = np.int64(value)
  if mode not in CONV_MODES:
    raise ValueError(f"conv_attributes: mode {mode!r} must be one of {CONV_MODES}")
  attributes["mode"] = mode
  taps = [(k, 0, 1) for k in window] if weight_taps is None else [tuple(map(int, t)) for t in weight_taps]
  if len(taps) != nd or any(len(t) != 3 for t in taps):
    raise ValueError(f"conv_attributes: weight_taps {weight_taps} needs one (b_window, first, step) per "
                     f"dimension of window {tuple(window)}")
  for i, name in enumerate(("weight_window", "weight_tap_first", "weight_tap_step")):
    fill = (1, 0, 1)[i]
    attributes[name] = np.asarray((fill,) * (KERNEL_SPATIAL_DIMS - nd) + tuple(t[i] for t in taps), np.int64)
  attributes["transposed_weights"] = np.int64(bool(transposed_weights))
  attributes["features_major_weights"] = np.int64(bool(features_major_weights))
  return attributes


def features_major_layout(rank: int) -> tuple[int, ...]:
  """The XLA layout (minor to major) of an operand of ``rank`` dimensions whose last dimension is
  outermost and the others row-major: how XLA:CPU lays out an all-gather along the last
  dimension (each device's block contiguous)."""
  return (*range(rank - 2, -1, -1), rank - 1)


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
    raise _bad_isa_variable()
  return ISAS[index]


def kernel_info() -> dict:
  """Facts about the C kernel on this machine, for logs and bug reports.

  Keys: ``supported_isas``, ``emulated_isas``, ``best_isa`` and ``selected_isa`` (as the
  functions of those names; ``selected_isa`` raises ``ValueError`` for a bad ``DFPJAX_ISA``),
  and ``microkernel``: for each supported path its register tile as a string ``"MRxNR"``
  (rows of the left operand by columns of the right one per microkernel call), read from the
  kernel's per-ISA table; ``ffi_api``: the XLA FFI API version of the headers it was built
  against, ``"major.minor"``.
  """
  lib = _library()
  tiles = {}
  for name in supported_isas():
    mr, nr = ctypes.c_int(), ctypes.c_int()
    if lib.dfp_isa_tile(ISAS.index(name), ctypes.byref(mr), ctypes.byref(nr)) != 0:
      raise RuntimeError(f"dfpjax: the kernel reports {name} as supported but has no tile for it")
    tiles[name] = f"{mr.value}x{nr.value}"
  return dict(supported_isas=supported_isas(), emulated_isas=emulated_isas(), best_isa=best_isa(),
              selected_isa=selected_isa(), microkernel=tiles,
              ffi_api="{}.{}".format(*kernel_ffi_api()))
