"""The data-parallel train step on 1, 2 and 4 simulated CPU devices, same global batch.

    python benchmarks/sharded_step.py                  # ResNet-18, batch 32, 64x64, FP32 and DFP
    python benchmarks/sharded_step.py --quick          # try-out: 32x32, batch 8, one timed round
    python benchmarks/sharded_step.py --modes dfp --states replicated,sharded  # ZeRO-style state

Each device count n runs in a process of its own, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=n`` (appended to the caller's XLA_FLAGS), which
builds every configuration (mode x state): the examples' trainer step (Flax FP32, or
``dfp_transform``ed DFP) jitted over a "data" mesh of its n devices, the batch sharded and the
state replicated (or split, ``--states sharded``: the trainer's ``shard_state``), as
``examples/imagenet/train.py`` runs it. The processes stay up together; each timed round steps
every configuration once, process after process, so the host's drift over minutes falls alike on
all of them. The simulated devices share the same cores, so splitting the batch should leave
wall and CPU time per step about flat; work repeated on every device (an operation XLA
replicates instead of partitioning) makes them grow with n. Prints median wall and CPU seconds
per step, their ratios to 1 device, and the range of the wall ratio between the steps of one
round, and per step the process's minor page faults (fresh memory XLA's buffers and the
collectives' copies touch) and context switches (a thread blocking, as in the collectives'
rendezvous, or preempted), which show where the growth comes from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Config:
  """One configuration's jitted step, state and batch on a mesh over the first ``devices``."""

  def __init__(self, args: argparse.Namespace, mode: str, state: str, devices: int):
    import dataclasses  # pylint: disable=g-import-not-at-top
    import functools  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from examples.imagenet import parallel, train  # pylint: disable=g-import-not-at-top
    from examples.imagenet.configs.base import Config  # pylint: disable=g-import-not-at-top

    self.key = {"mode": mode, "state": state, "devices": devices}
    config = Config(model=args.network, image_size=args.image_size, batch_size=args.batch,
                    dfp=mode == "dfp", shard_state=state == "sharded")
    mesh = jax.make_mesh((devices,), (parallel.DATA_AXIS,), (jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    data_parallel = parallel.DataParallel(mesh, config.batch_size, config.shard_state)
    model = train.create_model(config, num_classes=1000)
    lr = train.create_learning_rate_fn(dataclasses.replace(config, warmup_epochs=0), 100)
    create = functools.partial(train.create_train_state, config, model, config.image_size, lr)
    abstract_state = jax.eval_shape(create)
    state_sharding = data_parallel.state_sharding(abstract_state)
    # Leaves only, as train.restore_or_create: each call of create makes the optimizer's
    # functions, static fields of the state, anew, and jit refuses out_shardings' as different.
    leaves = jax.jit(lambda: jax.tree.leaves(create()),
                     out_shardings=jax.tree.leaves(state_sharding))()
    self.state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    step_fn = functools.partial(train.train_step, aux_loss_weight=config.aux_loss_weight)
    if config.dfp:
      step_fn = train.make_dfp_step(step_fn, config)
    self.step = jax.jit(step_fn, donate_argnums=0,
                        out_shardings=(state_sharding, data_parallel.replicated),
                        compiler_options=train.compiler_options(config))
    rng = np.random.default_rng(0)
    self.batch = data_parallel.global_batch({
        "image": rng.standard_normal((args.batch, args.image_size, args.image_size, 3),
                                     np.float32),
        "label": rng.integers(0, 1000, args.batch, dtype=np.int32)})
    self.compile_s = self.run()[0]  # the wall time of the step that compiles

  def run(self) -> tuple[float, float, int, int]:
    """One step: its wall and CPU seconds, the process's minor page faults and context switches
    (voluntary and involuntary) during it."""
    import jax  # pylint: disable=g-import-not-at-top
    start, start_cpu = time.perf_counter(), time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    end = resource.getrusage(resource.RUSAGE_SELF)
    switches = end.ru_nvcsw + end.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
    return wall, cpu, end.ru_minflt - usage.ru_minflt, switches


def worker(args: argparse.Namespace) -> None:
  """Serves the configurations of one device count, ``args.devices[0]``, this process's.

  Builds and compiles them, says ``ready`` (with the compile times), then for each ``step``
  line on stdin runs one step of each and answers their wall and CPU seconds.
  """
  import jax  # pylint: disable=g-import-not-at-top

  devices = args.devices[0]
  assert jax.device_count() == devices, (jax.device_count(), devices)
  configs = [_Config(args, mode, state, devices) for mode in args.modes for state in args.states]
  print(json.dumps([{**c.key, "compile_s": c.compile_s} for c in configs]), flush=True)
  for line in sys.stdin:
    if line.strip() == "step":
      print(json.dumps([c.run() for c in configs]), flush=True)


class _Worker:
  """A worker process with its own device count, driven line by line."""

  def __init__(self, args: argparse.Namespace, devices: int, deadline: float):
    self.deadline = deadline
    self.stderr = tempfile.TemporaryFile(mode="w+")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--modes", ",".join(args.modes),
           "--states", ",".join(args.states), "--devices", str(devices), "--network",
           args.network, "--batch", str(args.batch), "--image-size", str(args.image_size)]
    self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.stderr, text=True)
    self.devices = devices
    self.rows = [dict(row, wall=[], cpu=[], faults=[], switches=[]) for row in self.answer()]

  def answer(self):
    """The worker's next line, parsed; exits with its stderr if it fails or runs out of time."""
    ready, _, _ = select.select([self.proc.stdout], [], [], max(0, self.deadline - time.time()))
    line = self.proc.stdout.readline() if ready else ""
    if not line:
      self.proc.kill()
      self.stderr.seek(0)
      sys.exit(f"the {self.devices}-device worker " + ("failed:\n" + self.stderr.read()[-3000:]
                                                       if ready else "ran out of --timeout"))
    return json.loads(line)

  def step(self):
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    for row, measured in zip(self.rows, self.answer()):
      for key, value in zip(("wall", "cpu", "faults", "switches"), measured):
        row[key].append(value)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def run_workers(args: argparse.Namespace) -> list[dict]:
  """A worker process per device count, each started (and compiled) after the last; then each
  timed round steps them in turn, backwards every other round, so that the host's drift over
  minutes falls alike on all of them while each keeps its own device count."""
  deadline = time.time() + args.timeout
  workers = [_Worker(args, devices, deadline) for devices in args.devices]
  for round_ in range(args.steps):
    for w in workers if round_ % 2 == 0 else workers[::-1]:
      w.step()
  for w in workers:
    w.close()
  return [{**row, "wall_s": statistics.median(row["wall"]), "cpu_s": statistics.median(row["cpu"]),
           "faults_per_step": statistics.median(row["faults"]),
           "switches_per_step": statistics.median(row["switches"])}
          for w in workers for row in w.rows]


def table(rows: list[dict]) -> str:
  lines = ["| mode | state | devices | compile s | wall s/step | CPU s/step | wall vs 1 device | "
           "CPU vs 1 device | wall vs 1 device, per round | page faults/step | context switches/step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    base = next((r for r in rows if r["mode"] == row["mode"] and r["devices"] == 1
                 and r["state"] == row["state"]), None)
    ratio = lambda key: f"{row[key] / base[key]:.2f}x" if base else "n/a"
    rounds = "n/a"
    if base:  # the same round's steps ran seconds apart
      paired = sorted(w / b for w, b in zip(row["wall"], base["wall"]))
      rounds = f"{paired[0]:.2f}-{paired[-1]:.2f}x (median {statistics.median(paired):.2f}x)"
    lines.append(f"| {row['mode']} | {row['state']} | {row['devices']} | {row['compile_s']:.1f} | "
                 f"{row['wall_s']:.3f} | {row['cpu_s']:.3f} | {ratio('wall_s')} | "
                 f"{ratio('cpu_s')} | {rounds} | {row['faults_per_step']:,.0f} | "
                 f"{row['switches_per_step']:,.0f} |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  # pylint: disable-next=g-import-not-at-top
  from common import names_of, positive_float, positive_int, positive_ints, writable_path
  sys.path.insert(0, REPO)  # the examples package
  from examples.imagenet.models import MODELS  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="resnet18", choices=MODELS,
                      help="a model of examples/imagenet")
  # --quick sets only what is not given: its defaults are None here.
  parser.add_argument("--batch", type=positive_int,
                      help="global batch, the same for all N (default 32; --quick 8)")
  parser.add_argument("--image-size", type=positive_int, help="default 64; --quick 32")
  parser.add_argument("--devices", type=positive_ints, default=[1, 2, 4],
                      help="comma-separated device counts (each must divide --batch)")
  parser.add_argument("--modes", type=names_of(("fp32", "dfp")), default=["fp32", "dfp"],
                      help="comma-separated: fp32, dfp")
  parser.add_argument("--states", type=names_of(("replicated", "sharded")), default=["replicated"],
                      help="comma-separated: replicated, sharded (the trainer's shard_state)")
  parser.add_argument("--steps", type=positive_int,
                      help="timed rounds after the compiling step (one step of each "
                           "configuration; default 10, --quick 1)")
  parser.add_argument("--timeout", type=positive_float, default=3600,
                      help="seconds for the whole run")
  parser.add_argument("--quick", action="store_true",
                      help="32x32, batch 8, one timed round, where not given")
  parser.add_argument("--json", type=writable_path, help="also write the rows here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.batch = args.batch or (8 if args.quick else 32)
  args.image_size = args.image_size or (32 if args.quick else 64)
  args.steps = args.steps or (1 if args.quick else 10)
  uneven = [n for n in args.devices if args.batch % n]
  if uneven:
    parser.error(f"--devices {uneven} do not divide --batch {args.batch}: each device takes an "
                 "equal part of the global batch")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return
  import jax  # pylint: disable=g-import-not-at-top
  from common import cpu_model, kernel_paths, malloc_settings  # pylint: disable=g-import-not-at-top
  print(f"{args.network}, global batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{args.steps} timed rounds; {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{cpu_model()}, {os.cpu_count()} CPUs, jax {jax.__version__}, DFP kernel path "
        f"{kernel_paths()['selected_isa']}; load average {os.getloadavg()[0]:.1f} at the start; "
        f"{malloc_settings()}\n", flush=True)
  rows = sorted(run_workers(args), key=lambda r: (args.modes.index(r["mode"]),
                                                  args.states.index(r["state"]), r["devices"]))
  print(table(rows))
  print(f"load average {os.getloadavg()[0]:.1f} at the end")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
