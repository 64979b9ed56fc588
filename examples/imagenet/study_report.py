"""The accuracy study's summary: statistics over seeds, the verdict, a table, curves and a JSON.

For each network and setting: the mean and sample standard deviation over seeds of eval top-1,
top-5 and loss; for each DFP setting, its difference from FP32 paired by seed (the same seed gives
both the same initial weights and data order) with the standard error of that mean difference;
and a verdict on top-1 (``verdict``). The rule is documented in docs/accuracy.md.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Mapping, Sequence

from examples.imagenet import reporting

METRICS = (("eval_top1", "top-1"), ("eval_top5", "top-5"), ("eval_loss", "loss"))
REFERENCE = "fp32"
VERDICT_RULE = ("on eval top-1, d = mean over seeds of (setting - FP32) paired by seed, SE = its "
                "standard error (sample std of the paired differences / sqrt(n)), s = the FP32 "
                "sample std over seeds: 'parity' if |d| <= max(2 SE, s), else 'better' or "
                "'worse' by the sign of d; 'too few seeds' with fewer than 2 pairs")
NETWORK_FILE = "study.json"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1); the std is NaN for fewer than two values."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(reference: Mapping[int, float],
                      other: Mapping[int, float]) -> tuple[float, float, int]:
  """Mean of ``other[seed] - reference[seed]`` over the seeds both have, its standard error
  (NaN below two pairs) and the number of pairs."""
  diffs = [other[seed] - reference[seed] for seed in sorted(reference.keys() & other.keys())]
  mean, std = mean_std(diffs)
  return mean, std / math.sqrt(len(diffs)) if diffs else math.nan, len(diffs)


def verdict(diff: float, se: float, reference_std: float, pairs: int) -> str:
  """The VERDICT_RULE: 'parity', 'better', 'worse' or 'too few seeds'."""
  if pairs < 2 or math.isnan(se) or math.isnan(reference_std):
    return "too few seeds"
  if abs(diff) <= max(2 * se, reference_std):
    return "parity"
  return "better" if diff > 0 else "worse"


def aggregate(settings: Sequence[str], entries: Sequence[Mapping]) -> list[dict]:
  """One row per setting from ``entries`` (dicts with ``setting``, ``seed`` and ``summary``,
  None for a run not finished): seeds, mean/std of each metric, and for DFP settings the paired
  difference from FP32 with its SE and the verdict."""
  values = {name: {key: {} for key, _ in METRICS} for name in settings}
  for entry in entries:
    if entry["summary"] is not None:
      for key, _ in METRICS:
        values[entry["setting"]][key][entry["seed"]] = entry["summary"][key]
  reference_std = mean_std(list(values[REFERENCE]["eval_top1"].values()))[1]
  rows = []
  for name in settings:
    row = {"setting": name, "seeds": sorted(values[name]["eval_top1"])}
    for key, _ in METRICS:
      row[key] = dict(zip(("mean", "std"), mean_std(list(values[name][key].values()))))
      if name != REFERENCE:
        diff, se, pairs = paired_difference(values[REFERENCE][key], values[name][key])
        row[key].update(diff=diff, se=se, pairs=pairs)
    if name != REFERENCE:
      top1 = row["eval_top1"]
      row["verdict"] = verdict(top1["diff"], top1["se"], reference_std, top1["pairs"])
    rows.append(row)
  return rows


def _pm(mean: float, spread: float, scale: float, digits: int, signed: bool = False) -> str:
  if math.isnan(mean):
    return "-"
  text = f"{mean * scale:+.{digits}f}" if signed else f"{mean * scale:.{digits}f}"
  return text if math.isnan(spread) else f"{text} ± {spread * scale:.{digits}f}"


def table(network: str, rows: Sequence[dict], pending: int) -> str:
  """Markdown: accuracies in percent, mean ± std over seeds; differences ± SE."""
  lines = [f"## {network}", "",
           "| setting | seeds | top-1 (%) | top-5 (%) | eval loss | top-1 - FP32 (pts) | "
           "top-5 - FP32 (pts) | loss - FP32 | verdict |", "|" + "---|" * 9]
  for row in rows:
    cells = [row["setting"], ",".join(map(str, row["seeds"])) or "-"]
    for key, scale, digits in (("eval_top1", 100, 2), ("eval_top5", 100, 2), ("eval_loss", 1, 4)):
      cells.append(_pm(row[key]["mean"], row[key]["std"], scale, digits))
    for key, scale, digits in (("eval_top1", 100, 2), ("eval_top5", 100, 2), ("eval_loss", 1, 4)):
      cells.append("reference" if row["setting"] == REFERENCE else
                   _pm(row[key]["diff"], row[key]["se"], scale, digits, signed=True))
    cells.append(row.get("verdict", ""))
    lines.append("| " + " | ".join(cells) + " |")
  if pending:
    lines += ["", f"{pending} run(s) not finished yet."]
  return "\n".join(lines) + "\n"


def plot_network(network: str, settings: Sequence[str], entries: Sequence[Mapping], path: str):
  """Eval top-1, eval loss and train loss against step: per setting the mean over the finished
  seeds and a band of ± one std (on the steps every seed logged)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  panels = (("eval", "top1", "eval top-1"), ("eval", "loss", "eval loss"),
            ("train", "loss", "train loss"))
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  # More settings than the default cycle's 10 colours (a sweep) take tab20's 20.
  palette = plt.get_cmap("tab20").colors if len(settings) > 10 else [f"C{i}" for i in range(10)]
  for i, name in enumerate(settings):
    runs = [reporting.read_metrics(e["directory"]) for e in entries
            if e["setting"] == name and e["summary"] is not None]
    if not runs:
      continue
    for ax, (split, key, _) in zip(axes, panels):
      curves = [{r["step"]: r[key] for r in records if r["split"] == split} for records in runs]
      steps = sorted(set.intersection(*(set(c) for c in curves)))
      values = np.array([[c[s] for s in steps] for c in curves])
      mean, std = values.mean(0), values.std(0, ddof=1) if len(runs) > 1 else 0 * values[0]
      ax.plot(steps, mean, color=palette[i], label=f"{name} (n={len(runs)})")
      ax.fill_between(steps, mean - std, mean + std, color=palette[i], alpha=0.2, linewidth=0)
  reporting.save_figure(fig, axes, [f"{network}: {title}, mean ± std over seeds"
                                    for _, _, title in panels], path)


def _json_safe(value):
  """NaN (a metric with too few seeds) as null, so that study.json is strict JSON."""
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_network(workdir: str, network: str, settings: Sequence[str],
                  entries: Sequence[Mapping]):
  """workdir/<network>/study.json (every run, the rows, the markdown) and curves.png."""
  directory = os.path.join(workdir, network)
  os.makedirs(directory, exist_ok=True)
  rows = aggregate(settings, entries)
  pending = sum(e["summary"] is None for e in entries)
  # Run directories relative to the work directory: the record stays true wherever it is moved.
  runs = [dict(e, directory=os.path.relpath(e["directory"], workdir)) for e in entries]
  record = {"network": network, "rule": VERDICT_RULE, "rows": rows, "runs": runs,
            "markdown": table(network, rows, pending)}
  with open(os.path.join(directory, NETWORK_FILE), "w", encoding="utf-8") as f:
    json.dump(_json_safe(record), f, indent=1, allow_nan=False)
  plot_network(network, settings, entries, os.path.join(directory, "curves.png"))


def seeds_on_disk(workdir: str, network: str) -> set[int]:
  """Seeds of the network's run directories that hold a summary (any setting)."""
  pattern = os.path.join(glob.escape(workdir), glob.escape(network), "*", "seed*", "summary.json")
  return {int(m.group(1)) for path in glob.glob(pattern)
          if (m := re.fullmatch(r"seed(\d+)", os.path.basename(os.path.dirname(path))))}


def write_index(workdir: str) -> str:
  """workdir/study.md and study.json: every network summarised so far; returns the markdown."""
  records = []
  for path in sorted(glob.glob(os.path.join(glob.escape(workdir), "*", NETWORK_FILE))):
    with open(path, encoding="utf-8") as f:
      records.append(json.load(f))
  markdown = ("# Accuracy study: FP32 against DFP\n\nMean ± sample std over seeds; differences "
              "± standard error, paired by seed. Verdict: " + VERDICT_RULE + ".\n\n"
              + "\n".join(r["markdown"] for r in records))
  with open(os.path.join(workdir, "study.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(workdir, "study.json"), "w", encoding="utf-8") as f:
    json.dump({"rule": VERDICT_RULE, "networks": records}, f, indent=1, allow_nan=False)
  return markdown
