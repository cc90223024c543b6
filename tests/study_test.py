"""The study runner in --quick mode, and its statistics helpers against direct computation."""

import os
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


def test_transformer_selection_minimises_the_lm_loss_and_skips_diverged_runs():
  grid = [{"a": 1}, {"a": 2}, {"a": 3}]
  lm = [
    {"val_loss": 1.0, "test_loss": 1.0},
    {"val_loss": 0.5, "test_loss": float("nan")},  # the lowest, but diverged
    {"val_loss": 0.8, "test_loss": 0.8},
  ]
  assert study._best("stdlib_lm", grid, lm) == {"a": 3}
  vit = [
    {"val_accuracy": 0.5, "test_accuracy": 0.5, "train_loss": 1.0},
    {"val_accuracy": 0.9, "test_accuracy": 0.1, "train_loss": 2.3},  # chance: diverged
    {"val_accuracy": 0.7, "test_accuracy": 0.7, "train_loss": 0.9},
  ]
  assert study._best("mnist1d_vit", grid, vit) == {"a": 3}
  assert study.transformer_method("mnist1d_vit", "nrs_b4") == (
    "nrs",
    {"nrs.neighbor_batch_size": 32},
  )
  assert study.transformer_method("stdlib_lm", "nrs_b4") == ("nrs", {"nrs.neighbor_batch_size": 8})
  assert study.transformer_method("stdlib_lm", "adamw") == ("sgd", {})


def _fake_score(task, method, ov):
  """A made-up validation score with a known best setting per method."""
  own = {"sgd": ("weight_decay", 0.1), "sam": ("sam.rho", 0.05), "nrs": ("nrs.radius", 0.025)}
  key, best = own[method]
  return 1.0 - abs(ov[key] - best) - (0.0 if ov.get("model_kwargs.dropout") else 0.001)


def test_transformer_study_tunes_adamw_first_then_the_others_on_top(tmp_path, monkeypatch):
  jobs_seen = []

  def fake_run_all(jobs, workers):
    import json
    import os

    for d, t, method, ov, seed, _quick in jobs:
      jobs_seen.append((d, t, method, dict(ov), seed))
      os.makedirs(d, exist_ok=True)
      s = _fake_score(t, method, ov)
      rec = {"val_accuracy": s, "test_accuracy": s, "train_loss": 0.1, "val_loss": 2 - s,
             "test_loss": 2 - s}  # fmt: skip
      with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(rec) + "\n")
      study._mark_done(os.path.join(d, study.DONE))

  monkeypatch.setattr(study, "run_all", fake_run_all)
  tasks = ["mnist1d_vit", "stdlib_lm"]
  results, _ = study.transformer_study(str(tmp_path), False, tasks, 1)
  for t in tasks:
    chosen = results[t]["chosen"]
    assert chosen["adamw"] == {"weight_decay": 0.1, "model_kwargs.dropout": 0.1}
    assert chosen["sam"] == {**chosen["adamw"], "sam.rho": 0.05}
    assert chosen["nrs"] == {**chosen["adamw"], "nrs.radius": 0.025}
    assert chosen["nrs_b4"] == chosen["nrs"]
    assert len(results[t]["runs"]["nrs"]) == study.TRANSFORMER_SEEDS[t]
  # Equal budgets: four tuning runs per method and task, on one seed; hessians off.
  tune = [j for j in jobs_seen if j[4] == 100]
  assert len(tune) == 2 * 4 * len(study.TRANSFORMER_METHODS)
  assert all(j[3]["hessian.num_iters"] == 0 for j in jobs_seen)
  b4 = [j for j in jobs_seen if "nrs_b4" in j[0] and j[1] == "stdlib_lm"]
  assert b4 and all(j[3]["nrs.neighbor_batch_size"] == 8 for j in b4)
  # A second call trains nothing (every run is marked done).
  n = len(jobs_seen)
  monkeypatch.setattr(study, "run_all", lambda jobs, workers: [study._run(j) for j in jobs])
  study.transformer_study(str(tmp_path), False, tasks, 1)
  assert len(jobs_seen) == n
  # The report: a row per method, bits per character for the LM, the comparisons.
  costs = {t: {m: 1.0 + i for i, m in enumerate(study.TRANSFORMER_METHODS)} for t in tasks}
  path = tmp_path / "R.md"
  study_report.transformer_report(
    results, costs, 60.0, str(path), "cmd", study.TRANSFORMER_PASSES,
    study.TRANSFORMER_GRIDS, "env line",
  )  # fmt: skip
  text = path.read_text()
  for m in study.TRANSFORMER_METHODS:
    assert f"| {m} |" in text
  assert "test bits/char" in text and "nrs - adamw:" in text and "env line" in text
  assert "| interior |" in text and "4-point grid" in text


@pytest.mark.slow
def test_quick_transformer_part_trains_elsewhere_and_reports_here(tmp_path):
  """--train_only, then the report from the runs' metrics.jsonl and done.json alone."""
  import shutil

  runs = tmp_path / "trained"
  study.transformer_study(str(runs), True, ["mnist1d_vit"], 1)
  copied = tmp_path / "copied"
  for done in study._done_files(str(runs)):
    d = os.path.dirname(done)
    dest = copied / os.path.relpath(d, runs)
    dest.mkdir(parents=True)
    for name in (study.DONE, "metrics.jsonl"):
      shutil.copy(os.path.join(d, name), dest / name)
  report = tmp_path / "R.md"
  t = time.time()
  study.transformers_part(str(copied), True, ["mnist1d_vit"], 1, str(report), "cmd")
  assert time.time() - t < 120  # nothing retrained: step costs and the report only
  text = report.read_text()
  assert "| nrs_b4 |" in text and "Runs trained on:" in text


def test_a_run_whose_loss_turns_nan_is_recorded_as_diverged(tmp_path, monkeypatch):
  from experiments import train

  def boom(config, workdir):
    raise FloatingPointError("training loss is nan at step 7")

  monkeypatch.setattr(train, "train_and_evaluate", boom)
  d = str(tmp_path / "run")
  os.makedirs(d)
  study._run((d, "mnist1d_mlp", "sgd", {"learning_rate": 9.0}, 0, True))
  last = study.read(d)[-1]
  assert study_report.diverged(last) and "nan at step 7" in last["diverged"]
  assert study_report.collapsed("stdlib_lm", last) and study_report.collapsed("mnist1d_vit", last)
  grid = [{"a": 1}, {"a": 2}]
  assert study._best("mnist1d_vit", grid, [last, {"val_accuracy": 0.3, "test_accuracy": 0.3,
                                                  "train_loss": 1.0}]) == {"a": 2}  # fmt: skip
  # Finished: a second call does not train again.
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: pytest.fail("retrained"))
  study._run((d, "mnist1d_mlp", "sgd", {"learning_rate": 9.0}, 0, True))
