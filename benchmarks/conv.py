"""DFP convolutions against XLA FP32 over the ResNet-50 layer set, measured in the same process.

    python benchmarks/conv.py                  # all layers at batch 32, 5 repeats
    python benchmarks/conv.py --batch 8 --layers conv2_3x3,conv5_3x3 --repeats 3
    python benchmarks/conv.py --no-fp32        # the DFP passes and the GEMM only (the bar)
    DFPJAX_ISA=portable python benchmarks/conv.py --quick

For each layer (NHWC activations, HWIO weights, Gaussian data) and each pass it times,
interleaved (median of --repeats runs after warm-up, or with --min their minimum, each right after
an untimed run of its own, both cores through XLA's intra-op pool):
  forward           y = conv(x, w)
  backward-data     dx = vjp with respect to x, applied to a cotangent dy
  backward-weights  dw = vjp with respect to w, applied to dy
in XLA FP32 (lax.conv_general_dilated) and in DFP (dfpjax.dfp_conv_general_dilated, each pass
including the quantization of the operands it reads), and prints speed-ups over FP32
(FP32 time / DFP time, > 1: DFP faster) per layer and in total over the set (--no-fp32 leaves
the XLA FP32 passes out: they take most of the run, and the bar below needs none). Then each DFP
pass's GOP/s against the DFP GEMM kernel's at 1024^3 (operands quantized beforehand, as
matmul.py's kernel column), which runs in every layer's interleaved rounds: the reference is
timed in the same minutes as the passes, so the host's drift moves both (--min takes every
function's fastest run, the GEMM's too: a share that stays short there is not the noise's
doing), and where each layer gains or loses against the bar: its time less its operations' time
at 85% of the GEMM's rate (BAR_SHARE). The header names the glibc malloc settings in the
environment: with the defaults every output of 32 MB or more
is a fresh mapping, faulted in and zero-filled as it is written, which costs the DFP passes
10-20% on two threads (docs/performance.md, "Two threads"); docs/examples.md names the settings
that spare the faults (huge pages) or keep the buffers.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dfpjax
from common import (WARMUP, check_calls_kernel, gemm_kernel, kernel_paths, names_of, positive_int,
                    run_header, time_interleaved, writable_path)

NHWC = ("NHWC", "HWIO", "NHWC")
# name: (input spatial size, input channels, window, stride, output channels)
LAYERS = {
    "conv1_7x7s2": (224, 3, 7, 2, 64),
    "conv2_1x1_reduce": (56, 256, 1, 1, 64),
    "conv2_1x1": (56, 64, 1, 1, 64),
    "conv2_3x3": (56, 64, 3, 1, 64),
    "conv2_1x1_expand": (56, 64, 1, 1, 256),
    "conv3_3x3": (28, 128, 3, 1, 128),
    "conv3_1x1_expand": (28, 128, 1, 1, 512),
    "conv4_3x3": (14, 256, 3, 1, 256),
    "conv4_1x1_expand": (14, 256, 1, 1, 1024),
    "conv5_3x3": (7, 512, 3, 1, 512),
    "conv5_1x1_expand": (7, 512, 1, 1, 2048),
}
QUICK_LAYERS = ["conv1_7x7s2", "conv2_3x3", "conv5_1x1_expand"]
PASSES = ("forward", "backward-data", "backward-weights")
GEMM = (1024, 1024, 1024)  # the reference: issue 15's bar is each pass at BAR_SHARE of its GOP/s
BAR_SHARE = 0.85


def _passes(conv, x, w, dy):
  """Zero-argument jitted functions computing each pass with ``conv``."""
  fwd = jax.jit(conv)
  bwd_data = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  bwd_weights = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  return [lambda: fwd(x, w), lambda: bwd_data(x, w, dy), lambda: bwd_weights(x, w, dy)]


def measure(name: str, batch: int, repeats: int, gemm, fp32_passes: bool, statistic=np.median) -> dict:
  size, cin, window, stride, cout = LAYERS[name]
  padding = [((window - 1) // 2, window // 2)] * 2
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, size, size, cin), jnp.float32)
  w = jax.random.normal(kw, (window, window, cin, cout), jnp.float32) / np.sqrt(window * window * cin)
  fp32 = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                               dimension_numbers=NHWC)
  dfp = lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, (stride, stride), padding,
                                                     dimension_numbers=NHWC)
  dy = jax.random.normal(kg, jax.eval_shape(fp32, x, w).shape, jnp.float32)
  check_calls_kernel(jax.jit(dfp).lower(x, w).as_text(), "dfp_conv_general_dilated")
  fp32_fns = _passes(fp32, x, w, dy) if fp32_passes else []
  times = time_interleaved(fp32_fns + _passes(dfp, x, w, dy) + [gemm], repeats, statistic)
  fp32_times, dfp_times, gemm_time = times[:len(fp32_fns)], times[len(fp32_fns):-1], times[-1]
  out = dy.shape[1]
  flops = 2.0 * batch * out * out * cout * window * window * cin
  row = dict(layer=name, batch=batch, gflop=flops / 1e9, gemm_ms=gemm_time * 1e3)
  for i, p in enumerate(PASSES):
    row[p] = dict(fp32_ms=fp32_times[i] * 1e3 if fp32_passes else None, dfp_ms=dfp_times[i] * 1e3)
  return row


def _cell(t: dict) -> str:
  if t["fp32_ms"] is None:  # --no-fp32
    return f"n/a / {t['dfp_ms']:.1f}"
  return f"{t['fp32_ms']:.1f} / {t['dfp_ms']:.1f} ({t['fp32_ms'] / t['dfp_ms']:.2f}x)"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  # --quick sets only what is not given: its defaults are None here.
  parser.add_argument("--batch", type=positive_int, help="default 32; --quick 2")
  parser.add_argument("--layers", type=names_of(LAYERS),
                      help=f"comma-separated subset of {', '.join(LAYERS)} (default all; --quick "
                      f"{','.join(QUICK_LAYERS)})")
  parser.add_argument("--repeats", type=positive_int, help="default 5; --quick 3")
  parser.add_argument("--quick", action="store_true",
                      help="batch 2, three layers, 3 repeats, where not given")
  parser.add_argument("--min", action="store_true",
                      help="each function's fastest run instead of the median (the GEMM's too)")
  parser.add_argument("--no-fp32", action="store_true",
                      help="time only the DFP passes and the GEMM, not the XLA FP32 passes")
  parser.add_argument("--json", metavar="PATH", type=writable_path,
                      help="also write the rows to this file")
  args = parser.parse_args(argv)
  args.batch = args.batch or (2 if args.quick else 32)
  args.layers = args.layers or (QUICK_LAYERS if args.quick else list(LAYERS))
  args.repeats = args.repeats or (3 if args.quick else 5)
  return args


def main(argv=None):
  args = parse_args(argv)
  isa = kernel_paths()["selected_isa"]
  gemm, gemm_ops = gemm_kernel(*GEMM)
  print(run_header(isa))
  statistic = np.min if args.min else np.median
  print(f"# batch {args.batch}; {'minimum' if args.min else 'median'} of {args.repeats} interleaved runs "
        f"after {WARMUP} warm-ups, each "
        "right after an untimed run of its own; "
        "cells: XLA FP32 ms / DFP ms (speed-up = FP32 / DFP)")
  print()
  print("| layer | GFLOP | " + " | ".join(PASSES) + " |")
  print("|---|---|---|---|---|")
  rows = []
  for name in args.layers:
    rows.append(measure(name, args.batch, args.repeats, gemm, not args.no_fp32, statistic))
    r = rows[-1]
    print(f"| {name} | {r['gflop']:.1f} | " + " | ".join(_cell(r[p]) for p in PASSES) + " |",
          flush=True)
  totals = {p: dict(fp32_ms=None if args.no_fp32 else sum(r[p]["fp32_ms"] for r in rows),
                    dfp_ms=sum(r[p]["dfp_ms"] for r in rows)) for p in PASSES}
  gflop = sum(r["gflop"] for r in rows)
  print(f"| **total** | {gflop:.1f} | " + " | ".join(_cell(totals[p]) for p in PASSES) + " |")
  # The GEMM's rate over the same rounds: its median (or minimum) per layer, weighted alike.
  gemm_gops = len(rows) * gemm_ops / 1e9 / (sum(r["gemm_ms"] for r in rows) / 1e3)
  print()
  print(f"DFP GOP/s over the set and share of the GEMM kernel at {'x'.join(map(str, GEMM))} "
        f"({gemm_gops:.0f} GOP/s, timed in every layer's rounds; per layer "
        f"{min(gemm_ops / r['gemm_ms'] / 1e6 for r in rows):.0f}-"
        f"{max(gemm_ops / r['gemm_ms'] / 1e6 for r in rows):.0f}):")
  print("| pass | DFP GOP/s | of the GEMM |")
  print("|---|---|---|")
  shares = {}
  for p in PASSES:
    gops = gflop / (totals[p]["dfp_ms"] / 1e3)
    shares[p] = gops / gemm_gops
    print(f"| {p} | {gops:.0f} | {100 * shares[p]:.0f}% |")
  # Where a pass gains or loses against the bar: each layer's time less its share of the time
  # the whole set may take at BAR_SHARE of the GEMM's rate (the layer's operations at that rate).
  print()
  print(f"Each layer's ms over (+) or under (-) its share of the bar ({100 * BAR_SHARE:.0f}% of "
        f"{gemm_gops:.0f} GOP/s):")
  print("| layer | " + " | ".join(PASSES) + " |")
  print("|---|---|---|---|")
  for r in rows + [dict(layer="**total**", gflop=gflop, **totals)]:
    allowed_ms = r["gflop"] / (BAR_SHARE * gemm_gops) * 1e3
    print(f"| {r['layer']} | " + " | ".join(f"{r[p]['dfp_ms'] - allowed_ms:+.1f}" for p in PASSES) + " |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(isa=isa, batch=args.batch, statistic="min" if args.min else "median", rows=rows,
                     totals=totals, gemm=GEMM, gemm_gops=gemm_gops, shares=shares), f, indent=2)


if __name__ == "__main__":
  main()
