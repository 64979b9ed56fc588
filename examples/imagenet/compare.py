"""FP32 against DFP: the same config, seed and data order, trained twice, side by side."""

from __future__ import annotations

import dataclasses
import os

from examples.imagenet import reporting, train
from examples.imagenet.configs.base import Config


def run_compare(config: Config, workdir: str) -> str:
  """Trains ``config`` in FP32 (workdir/fp32) and in DFP (workdir/dfp).

  Both runs start from the same initialisation and see the same batches, so the difference is the
  arithmetic alone. Writes workdir/compare.md and workdir/compare.png; returns the markdown.
  """
  train.make_dfp_config(config)  # bad DFP settings fail before the FP32 run starts
  summaries, records = {}, {}
  for label, dfp in (("FP32", False), (f"DFP{config.dfp_bits}", True)):
    run_dir = os.path.join(workdir, "dfp" if dfp else "fp32")
    summaries[label] = train.train_and_evaluate(dataclasses.replace(config, dfp=dfp), run_dir)
    records[label] = reporting.read_metrics(run_dir)
  title = (f"# FP32 vs DFP{config.dfp_bits} ({config.dfp_rounding} rounding): {config.model} on "
           f"{config.dataset}, batch {config.batch_size}, seed {config.seed}\n\n")
  markdown = title + reporting.comparison_table(summaries)
  with open(os.path.join(workdir, "compare.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  reporting.plot_curves(records, os.path.join(workdir, "compare.png"))
  return markdown
