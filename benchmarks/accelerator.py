"""The DFP ops on an accelerator against the C kernel on its host: the same bits, and the time.

On a GPU (or any platform but the CPU) the DFP primitives lower to their pure-XLA twins: exact
int64 sums of the INT16 products, then the kernels' output stage in XLA ops. This script runs
each case (dot_general and convolutions in all three passes, per-channel exponents, other bit
widths and dtypes, stochastic rounding, non-finite operands, sums past 2**31, a whole gradient
through ``dfp_transform``) once on the default accelerator and once on the host CPU through the
C kernel, and compares every output bit for bit. Then it times the forward product and its
gradients on the accelerator against its own float32 and bfloat16 products (interleaved, as
the other benchmarks time), and against the C kernel on the host.

    python benchmarks/accelerator.py            # needs a non-CPU JAX device
    python benchmarks/accelerator.py --no-timing --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import dfpjax
from common import (cpu_model, kernel_paths, positive_int, positive_ints, time_interleaved,
                    writable_path)

NHWC = ("NHWC", "HWIO", "NHWC")
DENSE = (((1,), (0,)), ((), ()))


def with_grads(f, *args):
  """``f(*args)`` and the gradients of every argument for a cotangent of small multiples of
  1/4 (exact in every float type and on every platform, unlike a function of the output): the
  forward, backward-data and backward-weights passes of a product."""
  y, vjp = jax.vjp(f, *args)
  cotangent = ((jnp.arange(y.size) % 13 - 6) * 0.25).reshape(y.shape).astype(y.dtype)
  return (y,) + vjp(cotangent)


def _normal(rng, shape, dtype=np.float32, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(dtype)


def dot_passes(dims=DENSE, **kwargs):
  """The three passes of ``dfp_dot_general`` with these dimension numbers and options."""
  return lambda a, b: with_grads(lambda a, b: dfpjax.dfp_dot_general(a, b, dims, **kwargs), a, b)


def conv_passes(strides, padding, dimension_numbers=NHWC, **kwargs):
  """The three passes of ``dfp_conv_general_dilated`` with these parameters."""
  conv = lambda x, w: dfpjax.dfp_conv_general_dilated(
      x, w, strides, padding, dimension_numbers=dimension_numbers, **kwargs)
  return lambda x, w: with_grads(conv, x, w)


def cases(rng):
  """(name, function of the arrays, arrays): each function returns a pytree of arrays."""
  yield ("dot f32 64x96x80, 3 passes", dot_passes(),
         (_normal(rng, (64, 96)), _normal(rng, (96, 80))))
  yield ("dot bf16 -> f32, batched 3x19x40x23, 3 passes",
         dot_passes((((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32),
         (jnp.asarray(_normal(rng, (3, 19, 40)), jnp.bfloat16),
          jnp.asarray(_normal(rng, (3, 40, 23)), jnp.bfloat16)))
  channel = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(granularity="channel"))
  yield ("dot per-channel exponents, 3 passes", dot_passes(config=channel),
         ((_normal(rng, (6, 20)) * np.logspace(-3, 3, 6)[:, None]).astype(np.float32),
          (_normal(rng, (20, 5)) * np.logspace(2, -2, 5)[None, :]).astype(np.float32)))
  eight = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(bits=8), gradient=dfpjax.QuantConfig(bits=12))
  yield ("dot 8-bit forward, 12-bit gradient", dot_passes(config=eight),
         (_normal(rng, (33, 47)), _normal(rng, (47, 29))))
  # All-equal operands make every INT16 mantissa +-2**14: sums of 2**15 products reach 2**43.
  yield ("dot K=32768, sums past 2**31", lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE),
         (np.ones((4, 32768), np.float32), np.ones((32768, 3), np.float32)))
  stochastic = dfpjax.DFPConfig(forward=dfpjax.QuantConfig(rounding="stochastic"))
  yield ("dot stochastic rounding", lambda a, b, key: dfpjax.dfp_dot_general(
      a, b, DENSE, config=stochastic, key=key),
         (_normal(rng, (16, 64)), _normal(rng, (64, 16)), jax.random.key(7)))
  a = _normal(rng, (8, 8))
  a[3, 5] = np.nan
  yield ("dot NaN operand", lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE),
         (a, _normal(rng, (8, 4))))
  yield ("conv 3x3 SAME 4x14x14x32 -> 48, 3 passes", conv_passes((1, 1), "SAME"),
         (_normal(rng, (4, 14, 14, 32)), _normal(rng, (3, 3, 32, 48), scale=0.1)))
  yield ("conv 7x7 stride 2 pad 3, 3 -> 16 (a stem), 3 passes",
         conv_passes((2, 2), [(3, 3), (3, 3)]),
         (_normal(rng, (2, 32, 32, 3)), _normal(rng, (7, 7, 3, 16), scale=0.1)))
  yield ("conv 1x1 stride 2, 3 passes", conv_passes((2, 2), "VALID"),
         (_normal(rng, (2, 15, 15, 24)), _normal(rng, (1, 1, 24, 40), scale=0.1)))
  yield ("conv depthwise 3x3, rhs dilation 2, 3 passes",
         conv_passes((1, 1), "SAME", rhs_dilation=(2, 2), feature_group_count=16),
         (_normal(rng, (2, 12, 12, 16)), _normal(rng, (3, 3, 1, 16), scale=0.1)))
  yield ("conv f16, 1-D NWC, 3 passes", conv_passes((1,), "SAME", ("NWC", "WIO", "NWC")),
         (jnp.asarray(_normal(rng, (3, 50, 8)), jnp.float16),
          jnp.asarray(_normal(rng, (5, 8, 12), scale=0.1), jnp.float16)))

  def mlp_loss(params, x, target):
    # ReLU and a product with a fixed target are exact on every platform, so the gradient's
    # bits are the DFP products' alone (a float sum's order would be the platform's own).
    h = jax.nn.relu(x @ params["w1"])
    return jnp.sum(h @ params["w2"] * target)
  yield ("dfp_transform of a 2-layer MLP's gradient", dfpjax.dfp_transform(jax.grad(mlp_loss)),
         ({"w1": _normal(rng, (24, 40), scale=0.2), "w2": _normal(rng, (40, 10), scale=0.2)},
          _normal(rng, (32, 24)), (rng.integers(-3, 4, (32, 10)) * 0.5).astype(np.float32)))
  yield ("quantize (mantissas, exponent)", dfpjax.quantize,
         (_normal(rng, (1000,), scale=1e-30),))


def leaves_bits(tree) -> list[np.ndarray]:
  """Each leaf as [elements, bytes] uint8."""
  leaves = [np.asarray(x).reshape(-1) for x in jax.tree_util.tree_leaves(tree)]
  return [x.view(np.uint8).reshape(x.size, -1) for x in leaves]


def compare(name, fn, args, accelerator, cpu) -> dict:
  """Runs ``fn`` jitted on each device (operands committed there) and counts the elements whose
  bits differ."""
  outputs = {}
  for label, device in (("accelerator", accelerator), ("cpu", cpu)):
    on_device = jax.device_put(args, device)
    outputs[label] = jax.block_until_ready(jax.jit(fn)(*on_device))
  got, want = leaves_bits(outputs["accelerator"]), leaves_bits(outputs["cpu"])
  elements = sum(len(w) for w in want)
  differing = sum(int(np.any(g != w, axis=-1).sum()) if g.shape == w.shape else len(w)
                  for g, w in zip(got, want))
  return dict(case=name, outputs=len(want), elements=elements, differing=differing)


def problems(sizes):
  """(name, operand shapes, float product, DFP product): the GEMMs n x n x n and ResNet-50's
  conv3_3x3 layer at batch 32 (28x28, 128 -> 128 channels)."""
  for n in sizes:
    yield (f"GEMM {n}^3", ((n, n), (n, n)), lambda a, b, **kw: lax.dot_general(a, b, DENSE, **kw),
           lambda a, b: dfpjax.dfp_dot_general(a, b, DENSE))
  conv = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
  yield ("conv 3x3 32x28x28x128 -> 128", ((32, 28, 28, 128), (3, 3, 128, 128)),
         lambda x, w, **kw: lax.conv_general_dilated(x, w, **conv, **kw),
         lambda x, w: dfpjax.dfp_conv_general_dilated(x, w, **conv))


def timings(accelerator, cpu, sizes, repeats: int) -> list[dict]:
  """Per problem, the forward product and the forward with both gradients: float32 (highest
  precision) and bfloat16 (float32 sums) products and DFP on the accelerator, DFP on the host's
  C kernel."""
  rows = []
  for name, shapes, product, dfp_product in problems(sizes):
    rng = np.random.default_rng(len(rows))
    args = tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)
    variants = {
        "f32": lambda a, b: product(a, b, precision=lax.Precision.HIGHEST),
        "bf16": lambda a, b: product(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                                     preferred_element_type=jnp.float32),
        "dfp": dfp_product,
    }
    for passes, wrap in (("forward", lambda f: f),
                         ("3 passes", lambda f: lambda a, b: with_grads(f, a, b))):
      on_accelerator = jax.device_put(args, accelerator)
      fns = [functools.partial(jax.jit(wrap(f)), *on_accelerator) for f in variants.values()]
      row = dict(problem=name, passes=passes)
      for label, seconds in zip(variants, time_interleaved(fns, repeats)):
        row[f"accelerator {label} ms"] = 1e3 * seconds
      on_cpu = functools.partial(jax.jit(wrap(variants["dfp"])), *jax.device_put(args, cpu))
      row["host cpu dfp ms"] = 1e3 * time_interleaved([on_cpu], max(1, repeats // 4))[0]
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=positive_ints, default=[1024, 2048, 4096],
                      help="comma-separated GEMM sizes n for n x n x n timings")
  parser.add_argument("--repeats", type=positive_int, default=10)
  parser.add_argument("--no-timing", action="store_true", help="compare the bits only")
  parser.add_argument("--json", type=writable_path, help="write the results here")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)

  accelerator = jax.devices()[0]
  if accelerator.platform == "cpu":
    sys.exit("error: JAX's default device is the CPU; this script compares an accelerator's "
             "pure-XLA lowering with the CPU kernel, so it needs a GPU or TPU JAX backend")
  cpu = jax.devices("cpu")[0]
  info = kernel_paths()
  print(f"# dfpjax on {accelerator.device_kind} ({accelerator.platform}) against the C kernel "
        f"on the host ({cpu_model()}, {os.cpu_count()} CPUs, kernel path "
        f"{info['selected_isa']}, supported {info['supported_isas']}); jax {jax.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
  print("| case | outputs | elements | elements whose bits differ |\n|---|---|---|---|")
  results = dict(device=accelerator.device_kind, jax=jax.__version__, kernel=info, bits=[],
                 timing=[])
  for name, fn, case_args in cases(np.random.default_rng(0)):
    try:
      row = compare(name, fn, case_args, accelerator, cpu)
    except Exception as err:  # a case that fails to run is reported, and counts as a failure
      row = dict(case=name, outputs=0, elements=0, differing=-1,
                 error=f"{type(err).__name__}: {err}")
    results["bits"].append(row)
    print(f"| {name} | {row['outputs']} | {row['elements']} | "
          f"{row.get('error', row['differing'])} |", flush=True)
  exact = all(r["differing"] == 0 for r in results["bits"])
  print(f"\nall bits equal: {exact}\n")
  if not args.no_timing:
    results["timing"] = timings(accelerator, cpu, args.sizes, args.repeats)
    keys = list(results["timing"][0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in results["timing"]:
      cells = (f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values())
      print("| " + " | ".join(cells) + " |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  sys.exit(0 if exact else 1)


if __name__ == "__main__":
  main()
