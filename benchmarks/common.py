"""What the benchmark scripts share: machine facts and interleaved median timing."""

from __future__ import annotations

import platform
import time

import jax
import numpy as np

WARMUP = 2


def cpu_model() -> str:
  """/proc/cpuinfo's model name, with family and model (VMs often show only "AMD EPYC")."""
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
  name = fields.get("model name") or platform.processor() or "unknown"
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def time_interleaved(fns, repeats: int) -> list[float]:
  """Median seconds of each zero-argument function, their runs interleaved.

  The order rotates every round so that no function always runs right after the same one.
  """
  for f in fns:
    for _ in range(WARMUP):
      jax.block_until_ready(f())
  times = [[] for _ in fns]
  for r in range(repeats):
    for i in range(len(fns)):
      j = (i + r) % len(fns)
      start = time.perf_counter()
      jax.block_until_ready(fns[j]())
      times[j].append(time.perf_counter() - start)
  return [float(np.median(ts)) for ts in times]


