"""FP32 against DFP: the same config, seed and data order, trained twice, side by side."""

from __future__ import annotations

import dataclasses
import os

from examples.imagenet import reporting, train
from examples.imagenet.configs.base import Config


def runs(config: Config, workdir: str) -> list[tuple[Config, str]]:
  """The (config, workdir) of the FP32 run and of the DFP run of ``config``."""
  return [(dataclasses.replace(config, dfp=dfp), os.path.join(workdir, "dfp" if dfp else "fp32"))
          for dfp in (False, True)]


def run_compare(config: Config, workdir: str) -> str:
  """Trains ``config`` in FP32 (workdir/fp32) and in DFP (workdir/dfp).

  Both runs start from the same initialisation and see the same batches, so the difference is the
  arithmetic alone. Writes workdir/compare.md and workdir/compare.png; returns the markdown.
  """
  both = runs(config, workdir)
  for run_config, _ in both:  # bad DFP settings fail before the FP32 run starts
    train.check_config(run_config)
  summaries, records = {}, {}
  for (run_config, run_dir), label in zip(both, ("FP32", f"DFP{config.dfp_bits}")):
    summaries[label] = train.train_and_evaluate(run_config, run_dir)
    records[label] = reporting.read_metrics(run_dir)
  title = (f"# FP32 vs DFP{config.dfp_bits} ({config.dfp_rounding} rounding): {config.model} on "
           f"{config.dataset}, batch {config.batch_size}, seed {config.seed}\n\n")
  markdown = title + reporting.comparison_table(summaries)
  with open(os.path.join(workdir, "compare.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  reporting.plot_curves(records, os.path.join(workdir, "compare.png"))
  return markdown
