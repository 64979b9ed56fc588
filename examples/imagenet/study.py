"""The accuracy study: networks x arithmetic settings x seeds, every run trained by the example's
own trainer (``train.train_and_evaluate``) in its own directory, then summarised (study_report).

    python -m examples.imagenet.main study --config study_resnet18 --workdir /tmp/study

``--workdir`` holds ``<network>/<setting>/seed<k>/``, one trainer workdir per run. The study is
resumable at any point: a run with a summary.json is read back, not retrained; an interrupted run
continues from its latest checkpoint (the trainer's exact resume); a run directory trained with a
different config is an error rather than a silent mix. With ``--records DIR`` each finished run's
config, metrics and summary are also kept in ``DIR`` (same layout, no checkpoints: small enough to
commit), and a run found there is copied into the work directory instead of being trained, so a
grid that spans machines loses at most its unfinished run. The method is in docs/accuracy.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Sequence

from examples.imagenet import reporting, study_report, train
from examples.imagenet.configs.base import Config

IMAGENET_DATASETS = ("imagenet_folder", "imagenet_tfds")
# What a finished run's record keeps: all that the study's summary reads.
RECORD_FILES = ("config.json", reporting.METRICS_FILE, "summary.json")


@dataclasses.dataclass(frozen=True)
class Setting:
  """The arithmetic of a run: FP32 (``bits=None``), or every convolution and matmul in DFP with
  ``bits``, ``rounding`` and ``headroom`` (dfpjax.QuantConfig), forward and backward."""
  bits: int | None = None
  rounding: str = "nearest"
  headroom: int = 0

  @property
  def name(self) -> str:
    """``fp32``, or ``dfp<bits>`` with ``_h<headroom>`` when nonzero, ``_sr`` when stochastic."""
    if self.bits is None:
      return "fp32"
    return (f"dfp{self.bits}" + (f"_h{self.headroom}" if self.headroom else "")
            + ("_sr" if self.rounding == "stochastic" else ""))

  def apply(self, config: Config) -> Config:
    """``config`` with its DFP fields set to this setting (left at their defaults for FP32)."""
    if self.bits is None:
      defaults = Config()
      return dataclasses.replace(config, dfp=False, dfp_bits=defaults.dfp_bits,
                                 dfp_rounding=defaults.dfp_rounding,
                                 dfp_headroom=defaults.dfp_headroom)
    return dataclasses.replace(config, dfp=True, dfp_bits=self.bits, dfp_rounding=self.rounding,
                               dfp_headroom=self.headroom)


FP32 = Setting()
DFP16 = Setting(16)
# The paper's claim: INT16 DFP trains to FP32 accuracy.
PARITY_SETTINGS = (FP32, DFP16)
# ResNet-18's sweep: the paper's exponent choice (headroom 2) at 16 bits, and fewer bits with
# either rounding.
SWEEP_SETTINGS = (FP32, DFP16, Setting(16, headroom=2), Setting(16, "stochastic"),
                  *(Setting(bits, rounding) for bits in (12, 10, 8, 6)
                    for rounding in ("nearest", "stochastic")))


@dataclasses.dataclass(frozen=True)
class Study:
  """One network's grid.

  Attributes:
    network: the name of the network's directory and of its rows in the summary.
    config: the run on Fashion-MNIST (its DFP fields are replaced by each setting).
    imagenet_config: the ImageNet recipe ``config`` was scaled from, run for ``--dataset
      imagenet_folder`` / ``imagenet_tfds``.
    settings: the arithmetic settings; FP32 is the reference every other is compared with.
    seeds: the seeds of each setting; the same seed gives FP32 and DFP the same initial weights
      and data order, so their difference is paired.
  """
  network: str
  config: Config
  imagenet_config: Config
  settings: tuple[Setting, ...] = PARITY_SETTINGS
  seeds: tuple[int, ...] = (0, 1, 2)

  def __post_init__(self):
    names = [s.name for s in self.settings]
    if FP32 not in self.settings:
      raise ValueError(f"study {self.network!r}: settings {names} lack the FP32 reference")
    if len(set(names)) != len(names) or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"study {self.network!r}: repeated settings {names} or seeds {self.seeds}")
    if not self.seeds:
      raise ValueError(f"study {self.network!r}: no seeds")

  def base_config(self, dataset: str | None = None, overrides: dict | None = None) -> Config:
    """The FP32 config of this study on ``dataset`` (None: the config's own), with the fields
    of ``overrides`` replaced."""
    if dataset in IMAGENET_DATASETS:
      config = dataclasses.replace(self.imagenet_config, dataset=dataset)
    else:
      config = self.config if dataset is None else dataclasses.replace(self.config,
                                                                       dataset=dataset)
    return dataclasses.replace(config, **(overrides or {}))

  def setting(self, name: str) -> Setting:
    for setting in self.settings:
      if setting.name == name:
        return setting
    raise ValueError(f"study {self.network!r} has no setting {name!r}; its settings: "
                     f"{[s.name for s in self.settings]}")


def scale_recipe(imagenet: Config, *, num_epochs: float, image_size: int,
                 model_kwargs: dict | None = None, batch_size: int = 128) -> Config:
  """An ImageNet recipe on full Fashion-MNIST (60,000 training images, 10 classes).

  Kept: the learning rate per 256 images (scaled linearly to ``batch_size``), momentum, weight
  decay, the schedule's shape. Scaled: the image size, the widths (``model_kwargs``) and the
  epochs, with warm-up and decay epochs compressed by ``num_epochs / imagenet.num_epochs``.
  Fashion-MNIST's 28x28 items fill the frame, so crops are milder than ImageNet's (scale >= 0.35).
  """
  factor = num_epochs / imagenet.num_epochs
  return dataclasses.replace(
      imagenet, dataset="fashion_mnist_full", image_size=image_size, crop_scale=(0.35, 1.0),
      model_kwargs={**imagenet.model_kwargs, **(model_kwargs or {})}, batch_size=batch_size,
      num_workers=1, num_epochs=num_epochs, warmup_epochs=imagenet.warmup_epochs * factor,
      lr_decay_epochs=tuple(e * factor for e in imagenet.lr_decay_epochs),
      log_every_steps=50)


@dataclasses.dataclass(frozen=True)
class Run:
  network: str
  setting: Setting
  seed: int
  config: Config
  directory: str

  @property
  def label(self) -> str:
    return f"{self.network} {self.setting.name} seed {self.seed}"


def run_directory(workdir: str, network: str, setting_name: str, seed: int) -> str:
  return os.path.join(workdir, network, setting_name, f"seed{seed}")


def plan(study: Study, workdir: str, base: Config, settings: Sequence[str] | None = None,
         seeds: Sequence[int] | None = None) -> list[Run]:
  """The runs of ``study`` on ``base``: its settings named in ``settings`` (all when None), with
  ``seeds`` (the study's when None), in the study's order of settings, seed-major."""
  chosen = study.settings if settings is None else tuple(study.setting(n) for n in settings)
  return [Run(study.network, setting, seed,
              setting.apply(dataclasses.replace(base, seed=seed)),
              run_directory(workdir, study.network, setting.name, seed))
          for seed in (study.seeds if seeds is None else seeds) for setting in chosen]


def finished_summary(run: Run) -> dict | None:
  """The run's summary.json when it finished, else None (also checks the directory's config:
  ``train.check_workdir``)."""
  train.check_workdir(run.config, run.directory)
  path = os.path.join(run.directory, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min"


def _eta(pending: Sequence[Run], walls: dict[tuple[str, bool], list[float]]) -> str:
  """Remaining time from the mean wall time of the runs timed so far: of the same network and
  arithmetic (FP32 or DFP), else of the same network, else of all."""
  known = [t for times in walls.values() for t in times]
  if not known:
    return "ETA unknown until a run finishes"
  mean = lambda times: sum(times) / len(times)
  total = 0.0
  for run in pending:
    same_network = [t for (network, _), ts in walls.items() if network == run.network for t in ts]
    total += mean(walls.get((run.network, run.config.dfp)) or same_network or known)
  return f"ETA {_minutes(total)} for {len(pending)} run(s)"


def sync_record(run: Run, records: str):
  """Makes ``records`` and the work directory agree on ``run`` when it has finished in either:
  a record absent from the work directory is copied there, a finished run absent from
  ``records`` is copied to it (only RECORD_FILES, summary.json last, so a record without it
  is an incomplete copy and is overwritten)."""
  record = dataclasses.replace(run, directory=run_directory(records, run.network,
                                                            run.setting.name, run.seed))
  if finished_summary(run) is not None:
    source, target = run, record
  elif finished_summary(record) is not None:  # also checks the record's config
    source, target = record, run
  else:
    return
  if finished_summary(target) is None:
    os.makedirs(target.directory, exist_ok=True)
    for name in RECORD_FILES:
      shutil.copyfile(os.path.join(source.directory, name), os.path.join(target.directory, name))


def run_grid(runs: Sequence[Run], log: Callable[[str], None] = print,
             records: str | None = None) -> list[dict]:
  """Trains the runs not finished yet, in order, with a progress line per run; returns every
  run's summary. Wall times (for the ETA) come from the finished runs' summaries. With
  ``records``, each run is recorded there as it finishes (sync_record)."""
  summaries = [finished_summary(run) for run in runs]  # every directory checked before training
  walls: dict[tuple[str, bool], list[float]] = {}
  for run, summary in zip(runs, summaries):
    if summary is not None:
      walls.setdefault((run.network, run.config.dfp), []).append(summary["wall_time_s"])
  n = len(runs)
  for i, run in enumerate(runs):
    head = f"[{i + 1}/{n}] {run.label}"
    if summaries[i] is not None:
      log(f"{head}: finished earlier, eval top-1 {summaries[i]['eval_top1']:.4f}")
      continue
    pending = [r for r, s in zip(runs[i:], summaries[i:]) if s is None]
    resuming = os.path.isdir(os.path.join(run.directory, "checkpoints"))
    log(f"{head}: {'resuming' if resuming else 'training'} in {run.directory}; "
        f"{_eta(pending, walls)}")
    start = time.perf_counter()
    summaries[i] = train.train_and_evaluate(run.config, run.directory)
    if records:
      sync_record(run, records)
    elapsed = time.perf_counter() - start
    walls.setdefault((run.network, run.config.dfp), []).append(elapsed)
    log(f"{head}: done in {_minutes(elapsed)}, eval top-1 {summaries[i]['eval_top1']:.4f}, "
        f"top-5 {summaries[i]['eval_top5']:.4f}, loss {summaries[i]['eval_loss']:.4f}")
  return summaries


def run_studies(studies: Sequence[Study], workdir: str, *, dataset: str | None = None,
                overrides: dict | None = None, settings: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, train_runs: bool = True,
                records: str | None = None, log: Callable[[str], None] = print) -> str:
  """Trains the selected runs of ``studies`` (``train_runs=False``: none), then writes every
  network's summary over all its runs found in ``workdir`` and the study's index; returns the
  index's markdown. With ``records``, every run of the studies is first synced with it
  (sync_record), so the summary covers the runs recorded there too.

  Args:
    dataset: a dataset of input_pipeline.DATASETS; ImageNet ones run each study's ImageNet recipe.
    overrides: Config fields replaced in every network's config (the command line's flags).
    settings, seeds: the part of the grid to train (None: all of it).
    records: a directory of finished runs' records kept beside the code (run_grid).
  """
  bases = [s.base_config(dataset, overrides) for s in studies]
  # Every study is planned before any training, so that a bad setting name fails first.
  runs = [run for study, base in zip(studies, bases)
          for run in plan(study, workdir, base, settings, seeds)]
  for study, base in zip(studies, bases) if records else ():
    recorded = study_report.seeds_on_disk(records, study.network)
    for run in plan(study, workdir, base, None,
                    sorted(set(study.seeds) | set(seeds or ()) | recorded)):
      sync_record(run, records)
  if train_runs:
    run_grid(runs, log, records)
  for study, base in zip(studies, bases):
    found = study_report.seeds_on_disk(workdir, study.network)
    all_runs = plan(study, workdir, base, None, sorted(set(study.seeds) | found))
    entries = [dict(setting=r.setting.name, seed=r.seed, directory=r.directory,
                    config=dataclasses.asdict(r.config), summary=finished_summary(r))
               for r in all_runs]
    study_report.write_network(workdir, study.network, [s.name for s in study.settings],
                               entries)
  return study_report.write_index(workdir)
