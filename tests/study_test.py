"""The study runner in --quick mode, and its statistics helpers against direct computation."""

import time

import numpy as np
import pytest
from scipy import stats

from experiments import study
from experiments import study_report


def test_ci95_and_welch_difference():
  xs = [0.70, 0.72, 0.71, 0.74, 0.73]
  mean, std, half = study_report.ci95(xs)
  assert np.isclose(mean, np.mean(xs)) and np.isclose(std, np.std(xs, ddof=1))
  lo, hi = stats.t.interval(0.95, 4, loc=np.mean(xs), scale=stats.sem(xs))
  assert np.isclose(mean - half, lo) and np.isclose(mean + half, hi)
  a, b = [0.75, 0.76, 0.77, 0.76, 0.78], xs
  d, lo, hi = study_report.diff_ci(a, b)
  t = stats.ttest_ind(a, b, equal_var=False)
  assert np.isclose(d, np.mean(a) - np.mean(b))
  assert (lo > 0) == (t.pvalue < 0.05)


def test_lambda_at_loss_interpolates_in_log_log():
  rows = [
    {"train_loss": 1.0, "hessian/lambda_max": 10.0},
    {"train_loss": 0.5},
    {"train_loss": 0.01, "hessian/lambda_max": 0.1},
  ]
  assert np.isclose(study_report.lambda_at_loss(rows, 0.1), 1.0)
  assert np.isnan(study_report.lambda_at_loss(rows, 5.0))


@pytest.mark.slow
def test_quick_study_writes_the_report(tmp_path):
  results, abl, secs = study.study(str(tmp_path / "runs"), True, ["digits_bn"], False, 1)
  assert set(results["digits_bn"]["runs"]) == {"sgd", "sam", "rwp", "nrs", "sgd_2x"}
  report = tmp_path / "RESULTS.md"
  study_report.report(results, abl, secs, str(report), "python -m experiments.study --quick")
  text = report.read_text()
  for m in ("| sgd |", "| sam |", "| rwp |", "| nrs |", "| sgd_2x |"):
    assert m in text
  assert "NRS - sgd:" in text and "95% CI" in text
  assert (tmp_path / "results" / "digits_bn.png").stat().st_size > 1000
  # Resumable: a second call finds every run finished and trains nothing
  # (its few seconds add to the accumulated wall time).
  t = time.time()
  again, _, secs2 = study.study(str(tmp_path / "runs"), True, ["digits_bn"], False, 1)
  assert time.time() - t < 0.5 * secs
  assert secs2 >= secs


def test_diverged_runs_and_grid_edges():
  assert study_report.diverged({"test_accuracy": 0.11, "train_loss": 2.3})
  assert study_report.diverged({"test_accuracy": 0.9, "train_loss": float("nan")})
  assert not study_report.diverged({"test_accuracy": 0.5, "train_loss": 0.3})
  grid = [{"a": 1}, {"a": 2}, {"a": 3}]
  assert [study_report._edge(grid, g) for g in grid] == ["low edge", "interior", "high edge"]
  mixed = [{"r": 0.1}, {"r": 0.2}, {"s": "filter", "r": 0.5}, {"s": "filter", "r": 1.0}]
  assert [study_report._edge(mixed, g) for g in mixed] == ["low edge", "high edge"] * 2
  # Every cost-study method has a grid of the same size and a pass count.
  assert {len(g) for g in study.COST_GRIDS.values()} == {6}
  assert set(study.COST_GRIDS) == set(study.COST_METHODS) == set(study.COST_PASSES)


@pytest.mark.slow
def test_quick_cost_study_writes_the_report(tmp_path):
  results, secs = study.cost_study(str(tmp_path / "runs"), True, ["mnist1d_mlp"], 1)
  assert set(results["mnist1d_mlp"]["runs"]) == set(study.COST_METHODS)
  costs = {"mnist1d_mlp": study.measure_step_costs("mnist1d_mlp", repeats=2)}
  assert costs["mnist1d_mlp"]["sgd"] == 1.0 and costs["mnist1d_mlp"]["sam"] > 1.0
  report = tmp_path / "RESULTS_COST.md"
  study_report.cost_report(
    results, costs, secs, str(report), "cmd", study.COST_PASSES, study.COST_GRIDS
  )
  text = report.read_text()
  assert "| nrs_b4 | 1.50 |" in text and "nrs_b4 - nrs:" in text and "diverged seeds" in text
  assert (tmp_path / "results" / "cost_mnist1d_mlp.png").stat().st_size > 1000
