"""The data-parallel train step on 1, 2 and 4 simulated CPU devices, same global batch.

    python benchmarks/sharded_step.py                  # ResNet-18, batch 32, 64x64, FP32 and DFP
    python benchmarks/sharded_step.py --quick          # try-out: 32x32, batch 8, one timed step
    python benchmarks/sharded_step.py --modes dfp --states replicated,sharded  # ZeRO-style state

Each configuration (mode x device count) runs in a process of its own, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: the examples' trainer step (Flax FP32, or
``dfp_transform``ed DFP) jitted over a "data" mesh of N devices, the batch sharded and the state
replicated (or split, ``--states sharded``: the trainer's ``shard_state``), exactly as
``examples/imagenet/train.py`` runs it. The simulated devices share the
same cores, so splitting the batch should leave wall and CPU time per step about flat; work
repeated on every device (an operation XLA replicates instead of partitioning) makes them grow
with N. Prints median wall and CPU seconds per step and their ratios to 1 device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args: argparse.Namespace) -> dict:
  """Times one configuration in this process; JAX sees ``args.devices`` CPU devices."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, REPO)  # the examples package
  from examples.imagenet import parallel, train  # pylint: disable=g-import-not-at-top
  from examples.imagenet.configs.base import Config  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == args.devices, (jax.device_count(), args.devices)
  config = Config(model=args.network, image_size=args.image_size, batch_size=args.batch,
                  dfp=args.mode == "dfp", shard_state=args.state == "sharded")
  data_parallel = parallel.DataParallel.over_all_devices(config.batch_size, config.shard_state)
  model = train.create_model(config, num_classes=1000)
  lr = train.create_learning_rate_fn(dataclasses.replace(config, warmup_epochs=0), 100)
  create = functools.partial(train.create_train_state, config, model, config.image_size, lr)
  abstract_state = jax.eval_shape(create)
  state_sharding = data_parallel.state_sharding(abstract_state)
  # Leaves only, as train.restore_or_create: each call of create makes the optimizer's
  # functions, static fields of the state, anew, and jit refuses out_shardings' as different.
  leaves = jax.jit(lambda: jax.tree.leaves(create()),
                   out_shardings=jax.tree.leaves(state_sharding))()
  state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
  step_fn = functools.partial(train.train_step, aux_loss_weight=config.aux_loss_weight)
  if config.dfp:
    step_fn = train.make_dfp_step(step_fn, config)
  step = jax.jit(step_fn, donate_argnums=0,
                 out_shardings=(state_sharding, data_parallel.replicated),
                 compiler_options=train.compiler_options(config))
  rng = np.random.default_rng(0)
  batch = data_parallel.global_batch({
      "image": rng.standard_normal((args.batch, args.image_size, args.image_size, 3), np.float32),
      "label": rng.integers(0, 1000, args.batch, dtype=np.int32)})

  start = time.perf_counter()
  state, metrics = step(state, batch)  # compiles
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  wall, cpu = [], []
  for _ in range(args.steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return {"mode": args.mode, "state": args.state, "devices": args.devices, "compile_s": compile_s,
          "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def run_config(args: argparse.Namespace, mode: str, state: str, devices: int) -> dict | None:
  """Runs ``worker`` in a fresh process with ``devices`` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--state", state,
         "--devices", str(devices), "--network", args.network, "--batch", str(args.batch),
         "--image-size", str(args.image_size), "--steps", str(args.steps)]
  try:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    print(f"{mode} ({state} state) on {devices} device(s): timed out after {args.timeout} s",
          file=sys.stderr)
    return None
  if proc.returncode:
    print(f"{mode} ({state} state) on {devices} device(s) failed:\n{proc.stderr[-3000:]}",
          file=sys.stderr)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  lines = ["| mode | state | devices | compile s | wall s/step | CPU s/step | wall vs 1 device | "
           "CPU vs 1 device |", "|---|---|---|---|---|---|---|---|"]
  for row in rows:
    base = next((r for r in rows if r["mode"] == row["mode"] and r["devices"] == 1
                 and r["state"] == row["state"]), None)
    ratio = lambda key: f"{row[key] / base[key]:.2f}x" if base else "n/a"
    lines.append(f"| {row['mode']} | {row['state']} | {row['devices']} | {row['compile_s']:.1f} | "
                 f"{row['wall_s']:.3f} | {row['cpu_s']:.3f} | {ratio('wall_s')} | "
                 f"{ratio('cpu_s')} |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="resnet18", help="a model of examples/imagenet")
  parser.add_argument("--batch", type=int, default=32, help="global batch, the same for all N")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--devices", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4],
                      help="comma-separated device counts (each must divide --batch)")
  parser.add_argument("--modes", type=lambda s: s.split(","), default=["fp32", "dfp"])
  parser.add_argument("--states", type=lambda s: s.split(","), default=["replicated"],
                      help="comma-separated: replicated, sharded (the trainer's shard_state)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps after the compiling one")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
  parser.add_argument("--quick", action="store_true", help="32x32, batch 8, one timed step")
  parser.add_argument("--json", help="also write the rows here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--state", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.image_size, args.steps = 8, 32, 1
  if args.worker:
    args.devices = args.devices[0]
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args)))
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from common import cpu_model, kernel_paths, malloc_settings  # pylint: disable=g-import-not-at-top
  print(f"{args.network}, global batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{args.steps} timed steps; {cpu_model()}, {os.cpu_count()} CPUs, DFP kernel path "
        f"{kernel_paths()['selected_isa']}; load average {os.getloadavg()[0]:.1f} at the start; "
        f"{malloc_settings()}\n", flush=True)
  bad = set(args.states) - {"replicated", "sharded"}
  if bad:
    sys.exit(f"--states takes replicated and sharded, got {sorted(bad)}")
  # Interleaved by device count, so that the machine's load falls alike on the configurations.
  rows = [row for devices in args.devices for mode in args.modes for state in args.states
          if (row := run_config(args, mode, state, devices)) is not None]
  rows.sort(key=lambda r: (args.modes.index(r["mode"]), args.states.index(r["state"]),
                           r["devices"]))
  print(table(rows))
  print(f"load average {os.getloadavg()[0]:.1f} at the end")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  if len(rows) < len(args.modes) * len(args.states) * len(args.devices):
    sys.exit("some configurations failed (see above)")


if __name__ == "__main__":
  main()
