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
