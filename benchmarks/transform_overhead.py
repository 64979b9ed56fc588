"""Python-side time per step of a jitted ``dfp_transform``ed train step and of the jitted FP32 one.

    python benchmarks/transform_overhead.py                 # 300 calls of each step
    python benchmarks/transform_overhead.py --calls 1000 --json rows.json

``dfp_transform`` rewrites while ``jax.jit`` traces; once compiled, a call of the jitted DFP step
is jit's dispatch of an executable, as for the FP32 step, so the two should cost the same
(issue 4). Both steps are the examples' trainer's (``examples/imagenet/train.py``: forward,
backward, SGD with momentum, BatchNorm statistics, metrics), jitted with the state donated:
  fp32  jax.jit(train_step)
  dfp   jax.jit(train.make_dfp_step(train_step, config)): the model's apply dfp_transform'ed
        inside the step's gradient
on two networks, in the same process:
  resnet18  ResNet-18 at width 8 on 32x32 images, batch 8: a real train state (kernels,
            BatchNorm statistics, momentum: the arrays that each call flattens and checks)
  mlp       a two-layer MLP (16 hidden units) on 8x8 images, batch 8: little to compute
Per step, after compilation:
  Python calls  Python functions run by one call (sys.setprofile): jit's C++ fast path runs
                none of dfp_transform's or the step's code, only the state's unflattening
  dispatch      median time from the call until it returns, with the batch's images still
                being computed by an earlier computation, so that XLA cannot start the step
                on the calling thread before returning (it does for ready inputs on CPU)
  step          median time from the call until the outputs are ready, inputs ready: dispatch
                and the computation, in which DFP quantizes and runs integer products
over --calls calls of each, the FP32 and DFP calls alternating. The script also checks that
neither step is traced again after its first call.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from common import cpu_model, kernel_paths, names_of, positive_int, writable_path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.imagenet import train  # pylint: disable=wrong-import-position
from examples.imagenet.configs.base import Config  # pylint: disable=wrong-import-position


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


NETWORKS = {
    "resnet18": (32, lambda config: train.create_model(config, 10)),
    "mlp": (8, lambda config: MLP(10)),
}


def steps_for(network: str, batch_size: int):
  """The state, a batch, and the jitted FP32 and DFP train steps of ``network``."""
  image_size, make_model = NETWORKS[network]
  config = Config(model="resnet18", model_kwargs={"num_filters": 8}, image_size=image_size,
                  batch_size=batch_size, warmup_epochs=0, dfp=True)
  model = make_model(config)
  state = train.create_train_state(config, model, image_size,
                                   train.create_learning_rate_fn(config, 100))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}
  steps = {"fp32": train.train_step, "dfp": train.make_dfp_step(train.train_step, config)}
  return state, jax.device_put(batch), {name: jax.jit(_counted(name, step), donate_argnums=0)
                                        for name, step in steps.items()}


TRACES = collections.Counter()


def _counted(name, step):
  def traced(state, batch):
    TRACES[name] += 1  # Python runs only while jax.jit traces
    return step(state, batch)
  return traced


def python_calls(fn, *args):
  """fn(*args) and the number of Python functions it ran."""
  calls = 0

  def profile(frame, event, arg):
    nonlocal calls
    del frame, arg
    calls += event == "call"
  sys.setprofile(profile)
  try:
    out = fn(*args)
  finally:
    sys.setprofile(None)
  return out, calls


def measure(network: str, batch_size: int, calls: int) -> list[dict]:
  TRACES.clear()
  state, batch, steps = steps_for(network, batch_size)
  states = {name: jax.tree.map(jnp.array, state) for name in steps}  # each its own buffers
  python = {}
  for name, step in steps.items():
    states[name], metrics = step(states[name], batch)  # compiles
    jax.block_until_ready(metrics)
    (states[name], metrics), python[name] = python_calls(step, states[name], batch)
    jax.block_until_ready(metrics)
  # A few milliseconds of XLA work whose output the timed call takes as its images.
  busy = jnp.ones((384, 384), jnp.float32)
  produce = jax.jit(lambda image, busy: image + 0.0 * jnp.sum(busy @ busy @ busy))
  jax.block_until_ready(produce(batch["image"], busy))
  dispatch = {name: [] for name in steps}
  total = {name: [] for name in steps}
  for i in range(calls):
    for name in (("fp32", "dfp") if i % 2 else ("dfp", "fp32")):
      step = steps[name]
      jax.block_until_ready(states[name])
      pending = {**batch, "image": produce(batch["image"], busy)}
      start = time.perf_counter()
      states[name], metrics = step(states[name], pending)
      dispatch[name].append(time.perf_counter() - start)
      jax.block_until_ready((states[name], metrics))
      start = time.perf_counter()
      states[name], metrics = step(states[name], batch)
      jax.block_until_ready((states[name], metrics))
      total[name].append(time.perf_counter() - start)
  rows = []
  for name in steps:
    if TRACES[name] != 1:
      raise RuntimeError(f"{network} {name}: traced {TRACES[name]} times, not once")
    rows.append({"network": network, "step": name, "batch": batch_size,
                 "state_arrays": len(jax.tree.leaves(state)), "python_calls": python[name],
                 "dispatch_us": 1e6 * statistics.median(dispatch[name]),
                 "step_us": 1e6 * statistics.median(total[name]), "calls": calls})
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--networks", type=names_of(NETWORKS), default=list(NETWORKS),
                      help=f"comma-separated, of {','.join(NETWORKS)}")
  parser.add_argument("--batch_size", type=positive_int, default=8)
  parser.add_argument("--calls", type=positive_int, default=300)
  parser.add_argument("--json", type=writable_path, help="also write the rows here")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__}, DFP kernel path {kernel_paths()['selected_isa']}, "
        f"{args.calls} calls per step")
  print("| network | state arrays | step | Python calls | dispatch (us) | DFP / FP32 | "
        "step (us) | DFP / FP32 |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for network in args.networks:
    fp32, dfp = measure(network, args.batch_size, args.calls)
    rows += [fp32, dfp]
    for r in (fp32, dfp):
      print(f"| {network} | {r['state_arrays']} | {r['step']} | {r['python_calls']} | "
            f"{r['dispatch_us']:.0f} | "
            f"{r['dispatch_us'] / fp32['dispatch_us']:.2f} | {r['step_us']:.0f} | "
            f"{r['step_us'] / fp32['step_us']:.2f} |", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
