"""What the benchmark scripts share: argument types, machine facts and interleaved median timing."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import dfpjax

WARMUP = 2


# The CPU flags that decide the kernel path (and XLA's FP32 and PyTorch's bf16 code).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # the first processor is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def _integer_at_least(low: int, expected: str):
  """An argparse type: an integer of at least ``low``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = low - 1
    if value < low:
      raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value
  return parse


# A count of zero would time nothing; where 0 turns a step off, at least 0.
positive_int = _integer_at_least(1, "a positive integer")
non_negative_int = _integer_at_least(0, "an integer of at least 0")


def positive_float(text: str) -> float:
  """An argparse type: a finite number above 0."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def positive_ints(text: str) -> list[int]:
  """An argparse type: comma-separated positive integers, e.g. "16,32"."""
  try:
    return [positive_int(item) for item in text.split(",")]
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated positive integers, got {text!r}") from None


def names_of(choices):
  """An argparse type: a comma-separated list of some of ``choices``."""
  def names(text: str) -> list[str]:
    unknown = [name for name in text.split(",") if name not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
    return text.split(",")
  return names


def writable_path(path: str) -> str:
  """An argparse type for ``--json``: the path, once a file there has been opened for writing,
  so that a run cannot measure for minutes and then fail to save. A file that was not there
  is removed again."""
  existed = os.path.exists(path)
  try:
    open(path, "a", encoding="utf-8").close()  # "a": an existing file keeps its contents
  except OSError as err:
    raise argparse.ArgumentTypeError(f"cannot write {path!r}: {err.strerror}") from None
  if not existed:
    os.remove(path)
  return path


def cpu_model() -> str:
  """/proc/cpuinfo's model name, with family and model (VMs often show only "AMD EPYC")."""
  fields = _cpuinfo()
  name = fields.get("model name") or platform.processor() or "unknown"
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def malloc_settings() -> str:
  """The glibc malloc tunables set in the environment. With the defaults, XLA's buffers of 32 MB
  or more are fresh mappings on every call, zero-filled as they are written: part of what a
  kernel's time includes (docs/performance.md, "Two threads")."""
  names = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
  return " ".join(f"{k}={os.environ[k]}" for k in names) or "glibc malloc defaults"


def run_header(isa: str) -> str:
  """The first line of a one-process benchmark's report: the time, the CPU, the versions, the
  kernel path ``isa``, the load and the malloc settings."""
  return (f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {cpu_model()}  "
          f"({os.cpu_count()} CPUs)  jax {jax.__version__}  dfpjax {dfpjax.__version__}  "
          f"kernel path {isa}; load average {os.getloadavg()[0]:.1f}; {malloc_settings()}")


def cpu_flags() -> list[str]:
  """Which of SIMD_FLAGS the CPU reports."""
  flags = set(_cpuinfo().get("flags", "").split())
  return [f for f in SIMD_FLAGS if f in flags]


def kernel_paths() -> dict:
  """``dfpjax.kernel_info()``, or exit with the reason when ``DFPJAX_ISA`` forces a path
  that does not exist or that this CPU cannot run."""
  try:
    info = dfpjax.kernel_info()
  except ValueError as err:
    sys.exit(f"error: {err}")
  if info["selected_isa"] not in info["supported_isas"]:
    sys.exit(f"error: DFPJAX_ISA={info['selected_isa']} but this CPU runs only "
             f"{', '.join(info['supported_isas'])}")
  return info


def check_calls_kernel(lowered_text: str, what: str) -> None:
  """Raises unless the lowered DFP function calls the C kernel (custom calls) and leaves no
  product (``dot_general``, ``convolution``) to XLA: otherwise its timing would be XLA's."""
  xla_products = ("stablehlo.dot_general", "stablehlo.convolution")
  if "stablehlo.custom_call" not in lowered_text or any(p in lowered_text for p in xla_products):
    raise RuntimeError(f"{what} did not lower to the C kernel; the timing would be XLA's")


def product(m: int, k: int, n: int, lhs_kmajor: bool = False, batch: int = 1):
  """The operand shapes and ``dot_general`` dimension numbers of ``a b`` (a ``m x k``, b ``k x
  n``), or with ``lhs_kmajor`` of ``a^T b`` (a stored ``k x m``: a dense layer's weight
  gradient, x^T dy); with ``batch`` > 1 both operands have a leading batch dimension."""
  lead = (batch,) if batch > 1 else ()
  contract = len(lead) + (0 if lhs_kmajor else 1)
  batch_dims = ((0,), (0,)) if lead else ((), ())
  dims = ((contract,), (len(lead),)), batch_dims
  return lead + ((k, m) if lhs_kmajor else (m, k)), lead + (k, n), dims


def operand(key, shape, distribution: str = "normal"):
  """Float32 benchmark data: standard Gaussian, or uniform on [-1, 1] (a uniformly initialised
  layer's weights, Equinox's and PyTorch's default), whose mantissas spread over the whole
  INT16 range and take the kernel's short chunks (docs/numerics.md)."""
  if distribution == "normal":
    return jax.random.normal(key, shape, jnp.float32)
  if distribution == "uniform":
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")


def gemm_kernel(m: int, k: int, n: int, lhs_kmajor: bool = False, batch: int = 1, rhs: str = "normal"):
  """The DFP GEMM kernel alone on operands quantized beforehand (``product``'s; a Gaussian, b
  drawn from ``rhs``, see ``operand``): a zero-argument function, and its operations
  (``2 * batch * m * n * k``)."""
  a_shape, b_shape, dims = product(m, k, n, lhs_kmajor, batch)
  ka, kb = jax.random.split(jax.random.key(0))
  qa = dfpjax.quantize(operand(ka, a_shape))
  qb = dfpjax.quantize(operand(kb, b_shape, rhs))
  kernel = jax.jit(lambda qa, qb: dfpjax.dfp_dot_general(qa, qb, dims))
  return (lambda: kernel(qa, qb)), 2.0 * batch * m * n * k


def time_interleaved(fns, repeats: int, statistic=np.median) -> list[float]:
  """Median seconds (or another ``statistic`` of the runs) of each zero-argument function,
  their runs interleaved.

  The order rotates every round so that no function always runs right after the same one.
  Each timed run follows an untimed run of the same function, so its fresh output buffers
  are made of memory freed moments before, as a training step's are. Timed right after
  another function's seconds-long run, a pass would instead fault in memory that a virtual
  machine's host may have taken back meanwhile (free page reporting), and time the host
  (docs/performance.md, "Fresh pages under glibc's defaults").
  """
  for f in fns:
    for _ in range(WARMUP):
      jax.block_until_ready(f())
  times = [[] for _ in fns]
  for r in range(repeats):
    for i in range(len(fns)):
      j = (i + r) % len(fns)
      jax.block_until_ready(fns[j]())
      start = time.perf_counter()
      jax.block_until_ready(fns[j]())
      times[j].append(time.perf_counter() - start)
  return [float(statistic(ts)) for ts in times]


