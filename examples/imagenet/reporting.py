"""What a run reports: a progress bar, metrics as JSON lines and TensorBoard, plots and tables."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Sequence

METRICS_FILE = "metrics.jsonl"


class ProgressBar:
  """A one-line progress bar on a terminal; elsewhere (logs, CI) a line per metrics update."""

  def __init__(self, total: int, start: int = 0, stream=None, width: int = 24):
    self.total, self.step, self.width = total, start, width
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.status = ""
    self._last_draw = 0.0

  def update(self, step: int, **metrics: float):
    """Moves to ``step``; ``metrics`` (if any) replace the status text."""
    self.step = step
    if metrics:
      self.status = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    if self.tty:
      now = time.monotonic()
      if metrics or step == self.total or now - self._last_draw > 0.1:
        filled = self.width * step // max(1, self.total)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {step}/{self.total}  {self.status}\033[K")
        self.stream.flush()
        self._last_draw = now
    elif metrics:
      self.stream.write(f"step {step}/{self.total}  {self.status}\n")
      self.stream.flush()

  def close(self):
    if self.tty:
      self.stream.write("\n")
      self.stream.flush()


class MetricWriter:
  """Appends ``{"step", "split", **metrics}`` records to metrics.jsonl, and to TensorBoard when
  tensorboardX is installed (optional: it needs neither TensorFlow nor a network)."""

  def __init__(self, workdir: str):
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      self._tb = None
    else:
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]):
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{split}/{name}", value, step)

  def close(self):
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of a run, in step order; a resumed run's re-done steps replace the old ones."""
  latest = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      latest[(record["split"], record["step"])] = record
  return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))


def plot_curves(runs: Mapping[str, Sequence[dict]], path: str):
  """Loss, top-1 accuracy and learning rate against step, one colour per run; writes a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only, no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, (label, records) in enumerate(runs.items()):
    color = f"C{i}"
    for split, style in (("train", "-"), ("eval", "--")):
      rows = [r for r in records if r["split"] == split]
      steps = [r["step"] for r in rows]
      kwargs = {"color": color, "label": f"{label} {split}",
                "marker": "." if split == "eval" else None}
      axes[0].plot(steps, [r["loss"] for r in rows], style, **kwargs)
      axes[1].plot(steps, [r["top1"] for r in rows], style, **kwargs)
    train = [r for r in records if r["split"] == "train"]
    axes[2].plot([r["step"] for r in train], [r["learning_rate"] for r in train], color=color,
                 label=label)
  save_figure(fig, axes, ("loss", "top-1 accuracy", "learning rate"), path)


def save_figure(fig, axes, titles, path: str) -> None:
  """Titles, step axes, grids and legends on ``axes``; ``fig`` written to ``path`` and closed."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


SUMMARY_ROWS = (
    ("steps", "steps", "{:d}"),
    ("final train loss", "train_loss", "{:.4f}"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("eval top-1", "eval_top1", "{:.4f}"),
    ("eval top-5", "eval_top5", "{:.4f}"),
    ("train images/s", "images_per_sec", "{:.1f}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
)


def comparison_table(summaries: Mapping[str, Mapping[str, float]]) -> str:
  """A markdown table with one column per run and, for two runs, their difference."""
  labels = list(summaries)
  header = ["metric", *labels] + (["difference"] if len(labels) == 2 else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, key, fmt in SUMMARY_ROWS:
    values = [summaries[label][key] for label in labels]
    cells = [fmt.format(v) for v in values]
    if len(values) == 2:
      cells.append(fmt.replace("{:", "{:+").format(values[1] - values[0]))
    lines.append("| " + " | ".join([name, *cells]) + " |")
  return "\n".join(lines) + "\n"
