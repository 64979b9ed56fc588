"""Where a study's settings lose precision: ``dfpjax.diagnose`` of one train step per setting.

    python -m examples.imagenet.study_diagnose --config study_resnet18 --workdir /tmp/accuracy

Takes a network's trained FP32 run (seed 0 unless ``--seed``) from the study's workdir and one
training batch, and runs ``dfpjax.diagnose`` on the DFP train step of every DFP setting of the
study: the same weights and the same batch, only the arithmetic changes. Per setting and pass
(forward, backward-data, backward-weights) it summarises the products' relative errors against
float64 (median and largest, with the layer of the largest), how much of the mantissa range the
operands use, and the share of nonzero elements lost to the shared exponent (underflow). Writes
``<workdir>/<network>/diagnose.md`` and ``diagnose.json``; prints the markdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

import dfpjax
from examples.imagenet import input_pipeline, main, study, train

PASSES = ("forward", "backward-data", "backward-weights")


def trained_fp32(study_: study.Study, workdir: str, seed: int):
  """(config, state) of the study's FP32 run with ``seed``, restored from its last checkpoint."""
  run = study.plan(study_, workdir, study_.config, [study.FP32.name], [seed])[0]
  if study.finished_summary(run) is None:
    raise FileNotFoundError(
        f"no finished FP32 run of {study_.network!r} with seed {seed} in {run.directory}: train "
        f"it first (study --config ... --settings fp32 --seeds {seed} --workdir {workdir})")
  config = run.config
  source = input_pipeline.make_source(config.dataset, "train", config.data_dir)
  _, learning_rate_fn = train.create_schedule(config, len(source.records) // config.batch_size)
  model = train.create_model(config, source.num_classes)
  create_state = functools.partial(train.create_train_state, config, model, config.image_size,
                                   learning_rate_fn)
  manager = train.checkpoint_manager(run.directory, config)
  try:
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(jax.eval_shape(create_state)))
  finally:
    manager.close()
  return config, state, source


def first_batch(config, source) -> dict:
  """The first training batch of ``config``'s data order (its seed), decoded in this process."""
  with input_pipeline.Loader(source, batch_size=config.batch_size, train=True,
                             image_size=config.image_size, seed=config.seed, num_workers=0,
                             crop_scale=config.crop_scale) as loader:
    return next(iter(loader))


def diagnose_setting(config, state, batch, setting: study.Setting):
  """``dfpjax.diagnose`` of ``config``'s train step in ``setting``'s arithmetic."""
  step = train.make_dfp_step(
      functools.partial(train.train_step, aux_loss_weight=config.aux_loss_weight),
      setting.apply(config))
  return dfpjax.diagnose(step, state, batch)


def summarize(diagnosis) -> dict[str, dict]:
  """Per pass: products, median and largest relative error (and where), median mantissa use,
  largest and median underflow over the products' operands."""
  out = {}
  for role in PASSES:
    rows = [d for d in diagnosis if d.role == role and d.calls]
    if not rows:
      continue
    errors = np.array([d.rel_error for d in rows])
    worst = rows[int(np.argmax(errors))]
    underflow = [max(d.underflow) for d in rows]
    out[role] = dict(products=len(rows), median_rel_error=float(np.median(errors)),
                     max_rel_error=float(errors.max()), max_rel_error_at=worst.path,
                     median_mantissa_use=float(np.median([u for d in rows
                                                          for u in d.mantissa_use])),
                     median_underflow=float(np.median(underflow)),
                     max_underflow=float(max(underflow)))
  return out


def markdown(network: str, seed: int, summaries: dict[str, dict]) -> str:
  lines = [f"# {network}: DFP numerics per setting on one training batch, trained FP32 weights "
           f"(seed {seed})", "",
           "| setting | pass | products | median rel. error | largest (layer) | median mantissa use "
           "| underflow median / largest |", "|---|---|---|---|---|---|---|"]
  for name, per_pass in summaries.items():
    for role, s in per_pass.items():
      lines.append(f"| {name} | {role} | {s['products']} | {s['median_rel_error']:.2e} | "
                   f"{s['max_rel_error']:.2e} ({s['max_rel_error_at']}) | "
                   f"{s['median_mantissa_use']:.3f} | {s['median_underflow']:.2e} / "
                   f"{s['max_underflow']:.2e} |")
  return "\n".join(lines) + "\n"


def run(study_: study.Study, workdir: str, seed: int = 0, log=print) -> str:
  """Diagnoses every DFP setting of ``study_`` on its FP32 run; writes and returns the markdown."""
  config, state, source = trained_fp32(study_, workdir, seed)
  batch = first_batch(config, source)
  summaries = {}
  for setting in study_.settings:
    if setting.bits is None:
      continue
    log(f"{study_.network}: diagnosing {setting.name}")
    summaries[setting.name] = summarize(diagnose_setting(config, state, batch, setting))
  text = markdown(study_.network, seed, summaries)
  directory = os.path.join(workdir, study_.network)
  with open(os.path.join(directory, "diagnose.json"), "w", encoding="utf-8") as f:
    json.dump(dict(network=study_.network, seed=seed, batch_size=config.batch_size,
                   settings=summaries), f, indent=2)
  with open(os.path.join(directory, "diagnose.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a study config, e.g. study_resnet18")
  parser.add_argument("--workdir", required=True, help="the study's workdir")
  parser.add_argument("--seed", type=int, default=0, help="the FP32 run whose weights to use")
  return parser.parse_args(argv)


if __name__ == "__main__":
  args = parse_args()
  print(run(main.load_study(args.config), args.workdir, args.seed))
