"""DFP matrix products against XLA's FP32 dot, measured in the same process.

    python benchmarks/matmul.py                # the table recorded in docs/performance.md
    python benchmarks/matmul.py --quick        # three small shapes, a smoke run

For each (M, K, N) it times, interleaved so that machine noise hits all alike (median of
--repeats runs after warm-up, both cores through XLA's intra-op pool):
  fp32    jax.jit(jnp.dot) on float32 operands
  dfp     jax.jit(dfpjax.dfp_dot_general) on the same operands (quantization included)
  kernel  the exact product of operands quantized beforehand (the C kernel alone)
and prints the speed-ups over FP32 and the kernel's fraction of a reference INT16 peak.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import dfpjax
from dfpjax import cpu_ffi
# Kernel-only timing needs the exact product of pre-quantized operands, below the public op.
from dfpjax.primitives.dot_general import _canonical_dims, exact_dot

DENSE = (((1,), (0,)), ((), ()))
SHAPES = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 1024, 1024),
          (4096, 1024, 1024)]
QUICK_SHAPES = [(128, 128, 128), (256, 256, 256), (512, 256, 384)]
# Measured 2-core INT16 multiply-accumulate peaks (GOP/s): vpdpwssd on AMD Zen 4, and
# vpmaddwd + vpaddd in our 6x16 register block on AMD Zen 3 (L1-resident, long chunks).
REFERENCE_PEAKS = {"avx512_vnni": 469.0, "avx_vnni": 469.0, "avx2": 320.0}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _time_interleaved(fns, repeats):
  """Median seconds of each zero-argument function, their runs interleaved."""
  for f in fns:
    for _ in range(2):
      jax.block_until_ready(f())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for f, ts in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(f())
      ts.append(time.perf_counter() - start)
  return [float(np.median(ts)) for ts in times]


def measure(m, k, n, repeats):
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (m, k), jnp.float32)
  b = jax.random.normal(kb, (k, n), jnp.float32)
  qa, qb = dfpjax.quantize(a), dfpjax.quantize(b)
  dims = _canonical_dims(DENSE, a.shape, b.shape)
  fp32 = jax.jit(jnp.dot)
  dfp = jax.jit(lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE))
  kernel = jax.jit(lambda qa, qb: exact_dot(qa, qb, dims, jnp.float32))
  t_fp32, t_dfp, t_kernel = _time_interleaved(
      [lambda: fp32(a, b), lambda: dfp(a, b), lambda: kernel(qa, qb)], repeats)
  ops = 2.0 * m * n * k
  return dict(m=m, k=k, n=n, fp32_ms=t_fp32 * 1e3, dfp_ms=t_dfp * 1e3, kernel_ms=t_kernel * 1e3,
              fp32_gops=ops / t_fp32 / 1e9, dfp_gops=ops / t_dfp / 1e9,
              kernel_gops=ops / t_kernel / 1e9, speedup=t_fp32 / t_dfp,
              kernel_speedup=t_fp32 / t_kernel)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", help="comma-separated MxKxN, e.g. 1024x1024x1024,4096x1024x1024")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--quick", action="store_true", help="three small shapes, 5 repeats")
  parser.add_argument("--peak-gops", type=float, help="INT16 MAC peak of this machine (GOP/s)")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()
  shapes = QUICK_SHAPES if args.quick else SHAPES
  if args.shapes:
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
  repeats = 5 if args.quick else args.repeats

  isa = cpu_ffi.selected_isa()
  peak = args.peak_gops or REFERENCE_PEAKS.get(isa)
  print(f"# {datetime.date.today()}  {_cpu_model()}  ({os.cpu_count()} CPUs)")
  print(f"# jax {jax.__version__}; kernel paths {cpu_ffi.supported_isas()}, running {isa}")
  print(f"# INT16 peak for the kernel-fraction column: {peak} GOP/s "
        f"({'given' if args.peak_gops else 'reference figure for ' + isa})")
  print(f"# median of {repeats} interleaved runs; speed-up = FP32 time / DFP time\n")
  print("| M x K x N | XLA FP32 ms (GFLOP/s) | DFP ms (GOP/s) | speed-up | kernel ms (GOP/s) "
        "| kernel speed-up | kernel % of peak |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for m, k, n in shapes:
    r = measure(m, k, n, repeats)
    rows.append(r)
    peak_share = f"{100 * r['kernel_gops'] / peak:.0f}%" if peak else "n/a"
    print(f"| {m}x{k}x{n} | {r['fp32_ms']:.2f} ({r['fp32_gops']:.0f}) | {r['dfp_ms']:.2f} "
          f"({r['dfp_gops']:.0f}) | {r['speedup']:.2f}x | {r['kernel_ms']:.2f} ({r['kernel_gops']:.0f}) "
          f"| {r['kernel_speedup']:.2f}x | {peak_share} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(isa=isa, cpu=_cpu_model(), jax=jax.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
