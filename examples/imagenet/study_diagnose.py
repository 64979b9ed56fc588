"""Where a study's settings lose precision: ``dfpjax.diagnose`` of one train step per setting.

    python -m examples.imagenet.study_diagnose --config study_resnet18 --workdir /tmp/accuracy

Takes a network's trained FP32 run (seed 0 unless ``--seed``) from the study's workdir and one
training batch, and runs ``dfpjax.diagnose`` on the DFP train step of every DFP setting of the
study: the same weights and the same batch, only the arithmetic changes. Per setting and pass
(forward, backward-data, backward-weights) it summarises the products' relative errors against
float64 (median and largest, with the layer of the largest), how much of the mantissa range the
operands use, and the share of nonzero elements lost to the shared exponent (underflow). Writes
``<workdir>/<network>/diagnose.md`` and ``diagnose.json``; prints the markdown.

    python -m examples.imagenet.study_diagnose --config study_resnet18 --workdir /tmp/accuracy \
        --gradients dfp16,dfp16_sr --draws 8

instead measures whole weight gradients (``gradient_spread``): how far each setting's gradient of
the kernels, over ``--draws`` stochastic-rounding keys, lies from the float gradient, against two
yardsticks of the float network itself, its gradient after a 1e-4 relative perturbation of the
images (the size of a 16-bit forward error) and the gradient of the next batches (SGD's own
step-to-step spread). Writes ``gradients.md`` and ``gradients.json`` beside the others.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import dfpjax
from examples.imagenet import input_pipeline, main, study, train

PASSES = ("forward", "backward-data", "backward-weights")


def trained_fp32(study_: study.Study, workdir: str, seed: int):
  """(config, state, source) of the study's FP32 run with ``seed``, restored from its last
  checkpoint. The config is the one the run recorded (config.json): a study trained with flags
  that override its config (``--steps``, ``--dataset``) is read as it was trained."""
  directory = study.run_directory(workdir, study_.network, study.FP32.name, seed)
  config = train.read_config(directory)
  if config is None or not os.path.exists(os.path.join(directory, "summary.json")):
    raise FileNotFoundError(
        f"no finished FP32 run of {study_.network!r} with seed {seed} in {directory}: train it "
        f"first (python -m examples.imagenet.main study --config ... --settings fp32 --seeds "
        f"{seed} --workdir {workdir})")
  source = input_pipeline.make_source(config.dataset, "train", config.data_dir)
  _, learning_rate_fn = train.create_schedule(
      config, input_pipeline.steps_per_epoch(source, config.batch_size))
  model = train.create_model(config, source.num_classes)
  create_state = functools.partial(train.create_train_state, config, model, config.image_size,
                                   learning_rate_fn)
  manager = train.checkpoint_manager(directory, config)
  try:
    state = manager.restore(manager.latest_step(),
                            args=ocp.args.StandardRestore(jax.eval_shape(create_state)))
  finally:
    manager.close()
  return config, state, source


def first_batches(config, source, count: int) -> list[dict]:
  """The first ``count`` training batches of ``config``'s data order (its seed), decoded in this
  process."""
  with input_pipeline.Loader(source, batch_size=config.batch_size, train=True,
                             image_size=config.image_size, seed=config.seed, num_workers=0,
                             crop_scale=config.crop_scale) as loader:
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def first_batch(config, source) -> dict:
  """The first training batch of ``config``'s data order (its seed), decoded in this process."""
  return first_batches(config, source, 1)[0]


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


def _recording_gradients(state):
  """``state`` with an optimizer that stores the gradient it is given and leaves the weights as
  they are: the train step's own gradient (aux losses, BatchNorm in training mode) read back."""
  record = optax.GradientTransformation(
      lambda params: params,
      lambda grads, _, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
  return state.replace(tx=record, opt_state=record.init(state.params))


def _kernel_gradients(config, setting: study.Setting):
  """A jitted ``(state, batch, rng) -> {kernel path: gradient}`` of ``setting``'s train step;
  ``rng`` replaces the state's base key (the stochastic-rounding draws)."""
  step = functools.partial(train.train_step, aux_loss_weight=config.aux_loss_weight)
  if setting.bits is not None:
    step = train.make_dfp_step(step, setting.apply(config))

  def gradients(state, batch, rng):
    grads = step(state.replace(rng=rng), batch)[0].opt_state
    return {jax.tree_util.keystr(path): g for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if g.ndim > 1}
  return jax.jit(gradients)


def gradient_spread(study_: study.Study, workdir: str, settings: list[str], draws: int = 8,
                    seed: int = 0, perturbation: float = 1e-4, batches: int = 4) -> dict:
  """Per kernel, ``||g - g_float|| / ||g_float||`` on the first training batch of the trained
  FP32 run, for each of ``settings`` (``draws`` rounding keys when stochastic, else one) and for
  two references: the float gradient of images scaled by ``1 + perturbation * N(0, 1)``
  (``draws`` draws), and of the next ``batches - 1`` batches. Rows: label -> kernel -> the
  relative distances, one per draw."""
  config, state, source = trained_fp32(study_, workdir, seed)
  state, data = _recording_gradients(state), first_batches(config, source, batches)
  rngs = [jax.random.PRNGKey(1000 + k) for k in range(draws)]
  float_gradients = _kernel_gradients(config, study.FP32)
  reference = float_gradients(state, data[0], rngs[0])

  def distances(gradients):
    return {path: float(jnp.linalg.norm(g - reference[path]) / jnp.linalg.norm(reference[path]))
            for path, g in gradients.items()}
  rows = {}
  for name in settings:
    setting = study_.setting(name)
    fn = _kernel_gradients(config, setting)
    keys = rngs if setting.rounding == "stochastic" else rngs[:1]
    rows[name] = [distances(fn(state, data[0], rng)) for rng in keys]
  images = data[0]["image"]
  rows[f"fp32, images x (1 + {perturbation:g} N(0,1))"] = [
      distances(float_gradients(state, dict(data[0], image=images * (
          1 + perturbation * jax.random.normal(jax.random.key(k), images.shape))), rngs[0]))
      for k in range(draws)]
  rows["fp32, the next batches"] = [distances(float_gradients(state, batch, rngs[0]))
                                    for batch in data[1:]]
  return {label: {path: [d[path] for d in per_draw] for path in per_draw[0]}
          for label, per_draw in rows.items()}


def gradients_markdown(network: str, seed: int, spread: dict) -> str:
  """Per row: the median over kernels of the median over draws, and the largest (kernel)."""
  lines = [f"# {network}: weight gradients against the float gradient, trained FP32 weights "
           f"(seed {seed}), first training batch", "",
           "| gradient | draws | median over kernels | largest (kernel) |", "|---|---|---|---|"]
  for label, per_kernel in spread.items():
    medians = {path: float(np.median(d)) for path, d in per_kernel.items()}
    worst = max(per_kernel, key=lambda path: max(per_kernel[path]))
    lines.append(f"| {label} | {len(per_kernel[worst])} | {np.median(list(medians.values())):.2e} "
                 f"| {max(per_kernel[worst]):.2e} ({worst}) |")
  return "\n".join(lines) + "\n"


def run_gradients(study_: study.Study, workdir: str, settings: list[str], draws: int = 8,
                  seed: int = 0) -> str:
  """``gradient_spread`` written to ``<workdir>/<network>/gradients.{md,json}``; returns the
  markdown."""
  spread = gradient_spread(study_, workdir, settings, draws, seed)
  text = gradients_markdown(study_.network, seed, spread)
  directory = os.path.join(workdir, study_.network)
  with open(os.path.join(directory, "gradients.json"), "w", encoding="utf-8") as f:
    json.dump(dict(network=study_.network, seed=seed, rows=spread), f, indent=2)
  with open(os.path.join(directory, "gradients.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="a study config, e.g. study_resnet18")
  parser.add_argument("--workdir", required=True, help="the study's workdir")
  parser.add_argument("--seed", type=main.at_least(0), default=0,
                      help="the FP32 run whose weights to use")
  parser.add_argument("--gradients", type=main.name_list,
                      help="comma-separated settings (e.g. dfp16,dfp16_sr): measure their whole "
                           "weight gradients (gradient_spread) instead of the per-product table")
  parser.add_argument("--draws", type=main.at_least(1), default=8,
                      help="with --gradients: rounding keys per stochastic setting, and "
                           "perturbations of the images")
  args = parser.parse_args(argv)
  try:
    args.study = main.load_study(args.config)
  except ValueError as e:
    parser.error(f"--config: {e}")
  for name in args.gradients or ():
    try:
      args.study.setting(name)
    except ValueError as e:
      parser.error(f"--gradients: {e}")
  return args


if __name__ == "__main__":
  args = parse_args()
  if args.gradients:
    print(run_gradients(args.study, args.workdir, list(args.gradients), args.draws, args.seed))
  else:
    print(run(args.study, args.workdir, args.seed))
