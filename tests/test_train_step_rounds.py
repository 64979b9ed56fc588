"""``benchmarks/train_step.py --rounds``: a configuration run in several rounds pools its steps."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_step():
  """The script, its folder left on sys.path for the ``common`` its parse_args imports."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import train_step  # pylint: disable=g-import-not-at-top
  yield train_step
  sys.path.remove(str(ROOT / "benchmarks"))


def _round(steps, peak, faults=10.0):
  """What one configuration's process reports (run_config), reduced to what a merge reads."""
  return {"network": "resnet50", "batch": 16, "mode": "flax-dfp", "env": {}, "step_s": steps,
          "peak_rss": peak, "peak_rss_compile": peak / 2, "cpus_used": 2.0,
          "faults_per_step": faults, "system_s_per_step": 0.1, "first_step_s": 3.0,
          "compile_s": 20.0}


def test_rounds_pool_the_steps_and_keep_the_largest_peak(train_step):
  row = train_step.merge_round(_round([2.0, 2.2, 2.1], 1.5e9, faults=10.0),
                               _round([3.0, 2.9, 3.1], 1.4e9, faults=40.0))
  assert row["step_s"] == [2.0, 2.2, 2.1, 3.0, 2.9, 3.1]
  assert row["round_medians_s"] == [2.1, 3.0]
  assert row["peak_rss"] == 1.5e9 and row["peak_rss_compile"] == 0.75e9
  assert row["faults_per_step"] == 25.0  # weighted by the rounds' steps
  row = train_step.merge_round(row, _round([2.5], 1.6e9))
  assert len(row["step_s"]) == 7 and row["round_medians_s"] == [2.1, 3.0, 2.5]
  assert row["peak_rss"] == 1.6e9


def test_a_failed_round_is_named_and_leaves_the_others(train_step):
  row = train_step.merge_round(_round([2.0], 1.5e9), {"error": "timed out after 1800 s"})
  assert row["step_s"] == [2.0] and row["round_medians_s"] == [2.0, None]
  assert "round 2: timed out after 1800 s" in row["note"]
  later = train_step.merge_round({"error": "worker exited with status 1"},
                                 _round([2.4, 2.6], 1.5e9))
  assert later["step_s"] == [2.4, 2.6] and "error" not in later
  assert later["round_medians_s"] == [None, 2.5]
  assert "round 1: worker exited with status 1" in later["note"]


def test_rounds_must_be_at_least_one(train_step):
  with pytest.raises(SystemExit):
    train_step.parse_args(["--rounds", "0"])
