"""Command line for the ImageNet example.

    python -m examples.imagenet.main --config fashion_mnist_resnet --workdir /tmp/fmnist
    python -m examples.imagenet.main --config default --data_dir /data/imagenet --workdir /tmp/r50
    python -m examples.imagenet.main compare --config fashion_mnist_resnet --workdir /tmp/cmp
    python -m examples.imagenet.main study --config study_resnet18,study_alexnet --workdir /tmp/s

``train`` (the default mode) trains one run, resuming from --workdir's latest checkpoint;
``compare`` trains FP32 and DFP from the same seed and data order and tabulates both;
``study`` trains (or resumes) the grids of comma-separated study configs, networks x settings x
seeds, and summarises them (docs/accuracy.md).

Training is data-parallel over all devices (on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
makes N). Several processes, on one machine or many, each run this command with the same flags
and their own ``--process_id``::

    python -m examples.imagenet.main --config fashion_mnist_resnet --workdir /tmp/fmnist \
        --coordinator_address localhost:12355 --num_processes 2 --process_id 0   # and 1
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys

from examples.imagenet import compare, configs, input_pipeline, parallel, study, train
from examples.imagenet.configs.base import Config


def config_names() -> list[str]:
  """The configs of examples/imagenet/configs, by name."""
  return sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "base")


def load_config_module(name_or_path: str):
  """A module of examples/imagenet/configs by name (``default``), or a .py file by path; either
  must have a ``get_config()``. ValueError, listing the configs, where there is no such."""
  available = (f"the configs are {', '.join(config_names())}, or a path to a .py file with a "
               "get_config()")
  if name_or_path.endswith(".py"):
    if not os.path.isfile(name_or_path):
      raise ValueError(f"no file {name_or_path!r}; {available}")
    spec = importlib.util.spec_from_file_location("imagenet_config", name_or_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  elif name_or_path in config_names():
    module = importlib.import_module(f"examples.imagenet.configs.{name_or_path}")
  else:
    raise ValueError(f"no config {name_or_path!r}; {available}")
  if not hasattr(module, "get_config"):
    raise ValueError(f"{name_or_path!r} has no get_config(); {available}")
  return module


def load_config(name_or_path: str) -> Config:
  return load_config_module(name_or_path).get_config()


def load_study(name_or_path: str) -> study.Study:
  module = load_config_module(name_or_path)
  if not hasattr(module, "get_study"):
    raise ValueError(f"{name_or_path!r} is not a study config (it has no get_study()); "
                     "the study configs are examples/imagenet/configs/study_*.py")
  return module.get_study()


def at_least(low: int):
  """An argparse type: an integer of at least ``low``."""
  def integer(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value
  return integer


def _every_steps(text: str) -> int:
  value = at_least(-1)(text)
  if value == 0:
    raise argparse.ArgumentTypeError("must be a positive number of steps, or -1: once per epoch")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {text}")
  return value


def _patterns(text: str) -> tuple[str, ...]:
  return tuple(p.strip() for p in text.split(",") if p.strip())


def name_list(text: str) -> tuple[str, ...]:
  """An argparse type: comma-separated names, at least one, none twice."""
  names = _patterns(text)
  if not names:
    raise argparse.ArgumentTypeError(f"names nothing: {text!r}")
  if len(set(names)) != len(names):
    raise argparse.ArgumentTypeError(f"names one twice: {text!r}")
  return names


def _seeds(text: str) -> tuple[int, ...]:
  return tuple(map(at_least(0), name_list(text)))


def parse_args(argv=None) -> argparse.Namespace:
  """The flags, checked: a value that cannot work is an argparse error before anything is
  written (check_args)."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("mode", nargs="?", choices=("train", "compare", "study"), default="train")
  parser.add_argument("--config", default="default",
                      help="config name in examples/imagenet/configs, or a .py path; for "
                      "study, comma-separated study configs")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
  # Every flag below overrides the config field of the same name (dest) when given.
  parser.add_argument("--dfp", action=argparse.BooleanOptionalAction, default=None,
                      help="run convolutions and matmuls in INT16 dynamic fixed point")
  parser.add_argument("--dfp_bits", type=int, help="DFP mantissa bits (2..16)")
  parser.add_argument("--dfp_rounding", choices=("nearest", "stochastic"))
  parser.add_argument("--dfp_headroom", type=int,
                      help="DFP headroom bits (0..bits-2; 2 is the paper's exponent choice)")
  parser.add_argument("--dfp_keep_float", type=_patterns,
                      help="comma-separated module-path globs kept in float, "
                      "e.g. '*/conv_init,*/head'")
  parser.add_argument("--reproducible_batch_sums", action=argparse.BooleanOptionalAction,
                      default=None, help="BatchNorm's and the head's sums over the batch the "
                      "same bits on any device count (ResNets)")
  parser.add_argument("--shard_state", action=argparse.BooleanOptionalAction, default=None,
                      help="split a DFP run's state over the devices (ZeRO-style), not "
                      "replicate it")
  parser.add_argument("--steps", type=at_least(1), dest="num_train_steps",
                      help="train this many steps (the schedule is fitted to them)")
  parser.add_argument("--batch_size", type=at_least(1))
  parser.add_argument("--learning_rate", type=float, dest="base_learning_rate",
                      help="learning rate per 256 images")
  parser.add_argument("--num_epochs", type=_positive_float)
  parser.add_argument("--model", choices=sorted(train.models.MODELS))
  parser.add_argument("--dataset", choices=input_pipeline.DATASETS)
  parser.add_argument("--data_dir", help="ImageFolder root (train/, val/) or tfds data_dir")
  parser.add_argument("--image_size", type=at_least(1))
  parser.add_argument("--num_workers", type=at_least(0), help="decoding processes (0: in-process)")
  parser.add_argument("--seed", type=at_least(0))
  parser.add_argument("--log_every_steps", type=_every_steps, help="-1: once per epoch")
  parser.add_argument("--eval_every_steps", type=_every_steps, help="-1: once per epoch")
  parser.add_argument("--checkpoint_every_steps", type=_every_steps, help="-1: once per epoch")
  group = parser.add_argument_group("study", "which part of the grid to train (the summary "
                                    "always covers every finished run)")
  group.add_argument("--settings", type=name_list,
                     help="comma-separated setting names, e.g. 'fp32,dfp16' (default: all)")
  group.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the study's)")
  group.add_argument("--report_only", action="store_true",
                     help="train nothing, only rewrite the summary")
  group.add_argument("--records", help="a directory that keeps each finished run's config, "
                     "metrics and summary (to commit), and whose runs are not trained again")
  group = parser.add_argument_group(
      "several processes", "all three together call jax.distributed.initialize (gloo on CPU); "
      "every process loads its part of each global batch, process 0 writes the metrics")
  group.add_argument("--coordinator_address", help="host:port of process 0, e.g. localhost:12355")
  group.add_argument("--num_processes", type=at_least(1), help="how many processes take part")
  group.add_argument("--process_id", type=at_least(0),
                     help="this process's index, 0..num_processes-1")
  args = parser.parse_args(argv)
  check_args(parser, args)
  return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
  """``parser.error`` for flags that parse but cannot work together, or with their config or
  workdir: each run that the command would train is checked (``train.check_config``,
  ``train.check_workdir``)."""
  if args.mode != "study" and (args.settings or args.seeds or args.report_only or args.records):
    parser.error("--settings, --seeds, --report_only and --records belong to the study mode")
  distributed = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in distributed) and None in distributed:
    parser.error("--coordinator_address, --num_processes and --process_id go together")
  if args.coordinator_address is not None:
    host, _, port = args.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      parser.error(f"--coordinator_address must be host:port, e.g. localhost:12355, got "
                   f"{args.coordinator_address!r}")
    if args.process_id >= args.num_processes:
      parser.error(f"--process_id must be below --num_processes {args.num_processes}, got "
                   f"{args.process_id}")
  try:
    runs = study_runs(args) if args.mode == "study" else command_runs(args)
    for config, workdir in runs:
      train.check_config(config)
      train.check_workdir(config, workdir)
  except ValueError as e:
    parser.error(str(e))
  # compare trains a DFP run beside the FP32 one, and study refuses these flags itself.
  dfp_flags = sorted(f"--{k}" for k in config_overrides(args) if k.startswith("dfp_"))
  if args.mode == "train" and dfp_flags and not runs[0][0].dfp:
    parser.error(f"{', '.join(dfp_flags)}: DFP settings for a run that trains in FP32 (its "
                 "config's dfp is False): add --dfp, or leave them out")


def config_overrides(args: argparse.Namespace) -> dict:
  """The Config fields that flags set."""
  fields = {f.name for f in dataclasses.fields(Config)}
  return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
  """The --config file's config with the fields that flags set replaced."""
  return dataclasses.replace(load_config(args.config), **config_overrides(args))


def command_runs(args: argparse.Namespace) -> list[tuple[Config, str]]:
  """The (config, workdir) of each run that train or compare mode trains."""
  try:
    config = config_from_args(args)
  except ValueError as e:
    raise ValueError(f"--config: {e}") from e
  if args.mode == "compare":
    return compare.runs(config, args.workdir)
  return [(config, args.workdir)]


def _study_args(args: argparse.Namespace) -> tuple[list[study.Study], str | None, dict]:
  """The studies of ``--config``, the dataset and the other overrides of study mode."""
  overrides = config_overrides(args)
  owned = sorted(f"--{k}" for k in overrides if k.startswith("dfp") or k == "seed")
  if owned:
    raise ValueError(f"study mode sets {', '.join(owned)} itself, per run: choose runs with "
                     "--settings and --seeds instead")
  try:
    studies = [load_study(name) for name in name_list(args.config)]
  except (ValueError, argparse.ArgumentTypeError) as e:
    raise ValueError(f"--config: {e}") from e
  return studies, overrides.pop("dataset", None), overrides


def study_runs(args: argparse.Namespace) -> list[tuple[Config, str]]:
  """The (config, workdir) of each run that study mode trains."""
  studies, dataset, overrides = _study_args(args)
  try:
    return [(run.config, run.directory) for s in studies
            for run in study.plan(s, args.workdir, s.base_config(dataset, overrides),
                                  args.settings, args.seeds)]
  except ValueError as e:
    raise ValueError(f"--settings: {e}") from e


def run_study(args: argparse.Namespace) -> str:
  studies, dataset, overrides = _study_args(args)
  return study.run_studies(studies, args.workdir, dataset=dataset, overrides=overrides,
                           settings=args.settings, seeds=args.seeds,
                           train_runs=not args.report_only, records=args.records)


def main(argv=None):
  args = parse_args(argv)
  if args.mode == "study":
    print(run_study(args))
    return
  config = config_from_args(args)
  if args.coordinator_address is not None:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  if args.mode == "compare":
    print(compare.run_compare(config, args.workdir))
  else:
    summary = train.train_and_evaluate(config, args.workdir)
    print(", ".join(f"{k} {v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
  sys.exit(main())
