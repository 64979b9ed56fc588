"""DFP matrix products against XLA's FP32 dot, measured in the same process.

    python benchmarks/matmul.py                      # five square and FC shapes, 15 repeats
    python benchmarks/matmul.py --quick              # three small shapes, a smoke run
    python benchmarks/matmul.py --shapes 1024x1024x1024,4096x1024x1024 --json rows.json
    python benchmarks/matmul.py --lhs-kmajor --shapes 64x100352x256  # a^T b, a weight gradient
    python benchmarks/matmul.py --batch 64 --shapes 1024x1024x64     # 64 products a call
    python benchmarks/matmul.py --rhs uniform        # b uniform on [-1, 1]: flat mantissas
    DFPJAX_ISA=portable python benchmarks/matmul.py  # pin the kernel path

For each (M, K, N) it times, interleaved so that machine noise hits all alike (median of
--repeats runs after 2 warm-up calls, each right after an untimed run of its own, both cores
through XLA's intra-op pool):
  fp32    jax.jit(lax.dot_general) on float32 Gaussian operands (M, K) x (K, N) (with
          --lhs-kmajor a (K, M), contracted on its first dimension; with --batch B, a leading
          batch dimension of B on both; with --rhs uniform, b uniform on [-1, 1])
  dfp     jax.jit(dfpjax.dfp_dot_general) on the same operands (quantization included)
  kernel  the exact product of operands quantized beforehand (the C kernel alone)
and prints speed-ups over FP32 (FP32 time / DFP time, > 1 means DFP is faster), GOP/s
(2*B*M*N*K / time) and the kernel's fraction of a reference INT16 peak (see REFERENCE_PEAKS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp

import dfpjax
from common import (WARMUP, check_calls_kernel, cpu_model, gemm_kernel, kernel_paths, operand,
                    positive_float, positive_int, product, time_interleaved, writable_path)

SHAPES = [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 1024, 1024),
          (4096, 1024, 1024)]
QUICK_SHAPES = [(128, 128, 128), (256, 256, 256), (512, 256, 384)]
QUICK_REPEATS = 5
# Reference INT16 multiply-accumulate peaks (GOP/s, 2 cores), measured once on other machines
# with a register-resident microbenchmark of the kernel path's inner instruction; they are
# not measured on the machine running this script. Override with --peak-gops.
REFERENCE_PEAKS = {
    "avx512_vnni": (469.0, "measured 2-core vpdpwssd peak on AMD Zen 4"),
    "avx2": (320.0, "measured 2-core vpmaddwd+vpaddd peak on AMD Zen 3"),
}


def _parse_shapes(text: str) -> list[tuple[int, int, int]]:
  shapes = []
  for item in text.split(","):
    try:
      dims = tuple(int(d) for d in item.lower().split("x"))
    except ValueError:  # "abc": argparse would say only "invalid _parse_shapes value"
      dims = ()
    if len(dims) != 3 or min(dims) < 1:
      raise argparse.ArgumentTypeError(f"shape {item!r} is not MxKxN")
    shapes.append(dims)
  return shapes


def _peak(isa: str, given: float | None) -> tuple[float | None, str]:
  """The INT16 peak for the kernel-fraction column and a line saying where it comes from."""
  if given is not None:
    return given, f"{given:.0f} GOP/s, given by --peak-gops"
  if isa in REFERENCE_PEAKS:
    gops, source = REFERENCE_PEAKS[isa]
    return gops, f"{gops:.0f} GOP/s, a reference figure for {isa} ({source}), not this machine's"
  return None, f"no reference figure for {isa}; pass --peak-gops"


def measure(m: int, k: int, n: int, repeats: int, lhs_kmajor: bool = False, batch: int = 1,
            rhs: str = "normal") -> dict:
  a_shape, b_shape, dims = product(m, k, n, lhs_kmajor, batch)
  ka, kb = jax.random.split(jax.random.key(0))
  a = operand(ka, a_shape)
  b = operand(kb, b_shape, rhs)
  fp32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  dfp = jax.jit(lambda a, b: dfpjax.dfp_dot_general(a, b, dims))
  kernel, ops = gemm_kernel(m, k, n, lhs_kmajor, batch, rhs)  # the same operands, quantized beforehand
  check_calls_kernel(dfp.lower(a, b).as_text(), "dfp_dot_general")
  t_fp32, t_dfp, t_kernel = time_interleaved(
      [lambda: fp32(a, b), lambda: dfp(a, b), kernel], repeats)
  ref = fp32(a, b)
  rel_err = float(jnp.linalg.norm(dfp(a, b) - ref) / jnp.linalg.norm(ref))
  return dict(m=m, k=k, n=n, fp32_ms=t_fp32 * 1e3, dfp_ms=t_dfp * 1e3, kernel_ms=t_kernel * 1e3,
              fp32_gops=ops / t_fp32 / 1e9, dfp_gops=ops / t_dfp / 1e9,
              kernel_gops=ops / t_kernel / 1e9, speedup=t_fp32 / t_dfp,
              kernel_speedup=t_fp32 / t_kernel, rel_err=rel_err)


def _row(r: dict, peak: float | None) -> str:
  share = f"{100 * r['kernel_gops'] / peak:.0f}%" if peak else "n/a"
  return (f"| {r['m']}x{r['k']}x{r['n']} | {r['fp32_ms']:.2f} ({r['fp32_gops']:.0f}) "
          f"| {r['dfp_ms']:.2f} ({r['dfp_gops']:.0f}) | {r['speedup']:.2f}x "
          f"| {r['kernel_ms']:.2f} ({r['kernel_gops']:.0f}) | {r['kernel_speedup']:.2f}x "
          f"| {share} | {r['rel_err']:.1e} |")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", type=_parse_shapes,
                      help="comma-separated MxKxN, e.g. 1024x1024x1024,4096x1024x1024")
  parser.add_argument("--repeats", type=positive_int, help=f"timed runs per shape (default 15, "
                      f"{QUICK_REPEATS} with --quick)")
  parser.add_argument("--quick", action="store_true", help="three small shapes, a smoke run")
  parser.add_argument("--lhs-kmajor", action="store_true",
                      help="a^T b, a stored K x M (a dense layer's weight gradient, x^T dy)")
  parser.add_argument("--batch", type=positive_int, default=1,
                      help="products per call: batched operands [B, M, K] x [B, K, N] "
                           "(an attention's heads)")
  parser.add_argument("--rhs", choices=("normal", "uniform"), default="normal",
                      help="b's distribution: Gaussian, or uniform on [-1, 1] (a uniformly "
                      "initialised layer's weights: flat mantissas, the kernel's short chunks)")
  parser.add_argument("--peak-gops", type=positive_float,
                      help="INT16 MAC peak (GOP/s) for the kernel-fraction column "
                      "(default: the reference figure for the kernel path)")
  parser.add_argument("--json", metavar="PATH", type=writable_path,
                      help="also write the rows to this file")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
  repeats = args.repeats or (QUICK_REPEATS if args.quick else 15)

  kernel = kernel_paths()
  isa, supported = kernel["selected_isa"], kernel["supported_isas"]
  peak, peak_note = _peak(isa, args.peak_gops)
  forced = os.environ.get("DFPJAX_ISA")
  facts = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), cpu=cpu_model(),
               cpus=os.cpu_count(), jax=jax.__version__, dfpjax=dfpjax.__version__,
               supported_isas=list(supported), selected_isa=isa, dfpjax_isa_env=forced,
               peak_gops=peak, peak_source=peak_note, repeats=repeats, lhs_kmajor=args.lhs_kmajor,
               batch=args.batch, rhs=args.rhs)

  print(f"# {facts['date']}  {facts['cpu']}  ({facts['cpus']} CPUs)  "
        f"jax {jax.__version__}  dfpjax {dfpjax.__version__}")
  print(f"# kernel paths supported: {', '.join(supported)}; selected: {isa}"
        + (f" (DFPJAX_ISA={forced})" if forced else ""))
  print(f"# INT16 peak: {peak_note}")
  if args.lhs_kmajor:
    print("# a^T b: a stored K x M, contracted on its first dimension")
  if args.batch > 1:
    print(f"# {args.batch} products per call (batched operands); GOP/s count all of them")
  if args.rhs != "normal":
    print(f"# b drawn {args.rhs} on [-1, 1], a Gaussian")
  print(f"# median of {repeats} interleaved runs after {WARMUP} warm-ups, each "
        "right after an untimed run of its own; "
        "speed-up = FP32 time / DFP time (> 1: DFP faster); rel. error = ||DFP - FP32|| / ||FP32||")
  print()
  print("| M x K x N | XLA FP32 ms (GFLOP/s) | DFP ms (GOP/s) | speed-up | kernel ms (GOP/s) "
        "| kernel speed-up | kernel % of peak | DFP rel. error |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for m, k, n in shapes:
    rows.append(measure(m, k, n, repeats, args.lhs_kmajor, args.batch, args.rhs))
    print(_row(rows[-1], peak), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(facts, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
