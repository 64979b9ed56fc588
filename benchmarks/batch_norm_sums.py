"""BatchNorm's per-channel sums in dfpjax.channel_sums against XLA FP32, over ResNet-50's 53
BatchNorm inputs, measured in the same process.

    python benchmarks/batch_norm_sums.py               # batch 16, 7 repeats
    python benchmarks/batch_norm_sums.py --batch 32 --repeats 11

The ResNet-50 train step's BatchNorms (examples/imagenet, the DFP runs' ``kernel_batch_sums``)
take both their pairs of sums from ``channel_sums``: the forward pass ``(sum(x), sum(x * x))``
and the backward pass ``(sum(dy), sum(dy * (x - mean)))``, each in one read of the operands,
added in double (the same bits on every kernel path and thread count). Per distinct input shape
(NHWC, Gaussian data; the count is how many of the 53 have it) this times both forms against
the float32 sums XLA computes from the same operands (``jnp.sum``), interleaved (median of
--repeats runs after warm-up, each right after an untimed run of its own, both cores), and
prints the times, the totals over the 53 inputs (each shape's time times its count) and the
speed-ups (XLA ms / channel_sums ms, > 1: channel_sums faster).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import dfpjax
from common import kernel_paths, positive_int, run_header, time_interleaved

# (height, width, channels) of ResNet-50's BatchNorm inputs (v1.5: the stride in the 3x3
# convolutions), and how many of the 53 have that shape.
SHAPES = {
    (112, 112, 64): 1,   # the stem
    (56, 56, 64): 6, (56, 56, 256): 4, (56, 56, 128): 1,
    (28, 28, 128): 7, (28, 28, 512): 5, (28, 28, 256): 1,
    (14, 14, 256): 11, (14, 14, 1024): 7, (14, 14, 512): 1,
    (7, 7, 512): 5, (7, 7, 2048): 4,
}
FORMS = ("forward", "backward")


def _functions(shape):
  """Zero-argument functions: channel_sums' two forms, then XLA's float32 sums of the same."""
  kx, kg = jax.random.split(jax.random.key(sum(shape)))
  x = jax.random.normal(kx, shape, jnp.float32)
  dy = jax.random.normal(kg, shape, jnp.float32)
  mean = jnp.mean(x, axis=(0, 1, 2))
  axes = (0, 1, 2)
  sums = jax.jit(dfpjax.channel_sums)  # with x alone, x twice: the sums of squares' form
  xla_forward = jax.jit(lambda x: (jnp.sum(x, axes), jnp.sum(x * x, axes)))
  xla_backward = jax.jit(lambda dy, x, mean: (jnp.sum(dy, axes), jnp.sum(dy * (x - mean), axes)))
  return [lambda: sums(x), lambda: sums(dy, x, mean),
          lambda: xla_forward(x), lambda: xla_backward(dy, x, mean)]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=positive_int, default=16)
  parser.add_argument("--repeats", type=positive_int, default=7)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  print(run_header(kernel_paths()["selected_isa"]))
  print(f"# batch {args.batch}; median of {args.repeats} interleaved runs; cells: XLA FP32 ms / "
        "channel_sums ms (speed-up)")
  print()
  print("| input | count | " + " | ".join(FORMS) + " |")
  print("|---|---|---|---|")
  totals = {f: [0.0, 0.0] for f in FORMS}  # XLA, channel_sums
  for (h, w, c), count in SHAPES.items():
    dfp_fwd, dfp_bwd, xla_fwd, xla_bwd = (t * 1e3 for t in time_interleaved(
        _functions((args.batch, h, w, c)), args.repeats))
    cells = []
    for form, xla, dfp in (("forward", xla_fwd, dfp_fwd), ("backward", xla_bwd, dfp_bwd)):
      totals[form][0] += count * xla
      totals[form][1] += count * dfp
      cells.append(f"{xla:.2f} / {dfp:.2f} ({xla / dfp:.2f}x)")
    print(f"| [{args.batch}, {h}, {w}, {c}] | {count} | " + " | ".join(cells) + " |", flush=True)
  cells = [f"{xla:.1f} / {dfp:.1f} ({xla / dfp:.2f}x)" for xla, dfp in totals.values()]
  print(f"| **all {sum(SHAPES.values())}** | | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
