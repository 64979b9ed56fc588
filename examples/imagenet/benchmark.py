"""Training throughput of each network: jitted train steps on random images, no input pipeline.

    python -m examples.imagenet.benchmark --models resnet50,vgg16 --image_size 224 --batch_size 16

Prints a markdown table (compile time, seconds per step, images/s); ``--dfp`` times the DFP step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import numpy as np

from examples.imagenet import models, train
from examples.imagenet.main import at_least, load_config, name_list


def benchmark(name: str, image_size: int, batch_size: int, steps: int, dfp: bool) -> dict:
  config = dataclasses.replace(load_config(name), batch_size=batch_size, dfp=dfp)
  model = train.create_model(config, 1000)
  state = train.create_train_state(config, model, image_size,
                                   train.create_learning_rate_fn(config, 100))
  step_fn = train.make_dfp_step(train.train_step, config) if dfp else train.train_step
  step = jax.jit(step_fn, donate_argnums=0, compiler_options=train.compiler_options(config))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
           "label": rng.integers(0, 1000, batch_size).astype(np.int32)}
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  params = sum(math.prod(p.shape) for p in jax.tree.leaves(state.params))
  return {"model": name, "params": params, "compile_s": compile_s, "step_s": step_s,
          "images_per_sec": batch_size / step_s}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", type=name_list, default=tuple(models.MODELS),
                      help="comma-separated config names (examples/imagenet/configs)")
  parser.add_argument("--image_size", type=at_least(1), default=224)
  parser.add_argument("--batch_size", type=at_least(1), default=16)
  parser.add_argument("--steps", type=at_least(1), default=3, help="timed steps after the first")
  parser.add_argument("--dfp", action=argparse.BooleanOptionalAction, default=False)
  args = parser.parse_args(argv)
  for name in args.models:
    try:
      load_config(name)
    except ValueError as e:
      parser.error(f"--models: {e}")
  print("| network | params | compile + first step (s) | s/step | images/s |")
  print("|---|---|---|---|---|")
  for name in args.models:
    r = benchmark(name, args.image_size, args.batch_size, args.steps, args.dfp)
    print(f"| {r['model']} | {r['params']:,} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
          f"{r['images_per_sec']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
