"""The study runner: tuning with edge extension, paired final seeds, records, resume, report.

Orchestration runs with a fake trainer (a known score surface), so that what the runner
selects, extends, counts and reports is checked exactly; one slow test trains for real.
"""

import csv
import json
import math
import os
import re

import numpy as np
import pytest
from scipy import stats

from experiments import input_pipeline
from experiments import study
from experiments import study_report


def fake_trainer(optima, diverge=()):
  """Scores peak at ``optima[method][key]`` (log distance); ``diverge``: (method, seed) pairs."""
  calls = []

  def train(job):
    task, method, phase, seed, setting, *_ = job
    calls.append(job)
    opt = optima.get(method, {})
    val = 0.9 - sum(0.01 * math.log2(setting[k] / v) ** 2 for k, v in opt.items() if k in setting)
    val += 0.001 * (seed % 3)  # paired by seed: the same offset for every method
    test = val - 0.02 + (0.01 if method == "nrs" else 0.0)
    bad = (method, seed) in diverge
    row = dict(task=task, method=method, phase=phase, seed=seed, metric="accuracy")
    row.update(setting=json.dumps(setting, sort_keys=True), val=val, test=test)
    if bad:
      row.update(val=0.1, test=0.1)
    return {**row, "diverged": int(bad), "seconds": 1.0}

  train.calls = calls
  return train


@pytest.fixture
def no_timing(monkeypatch):
  monkeypatch.setattr(study, "step_costs", lambda name, family, quick: {})


def _study(tmp_path, trainer):
  return study.Study(str(tmp_path / "runs.csv"), str(tmp_path / "w"), 1, False, trainer)


def test_tuning_selects_on_the_mean_validation_and_extends_edges_up_to_twice(tmp_path):
  # sam's optimum (rho 3.2) lies two steps past its grid's high edge (0.8), its lr optimum
  # (0.1) on the low edge (one extension makes it interior); sgd's optimum is interior.
  train = fake_trainer(
    {
      "sam": {"sam.rho": 3.2, "learning_rate": 0.1},
      "sgd": {"weight_decay": 5e-4, "learning_rate": 0.2},
    }
  )
  s = _study(tmp_path, train)
  axes = {m: study._axes("mnist1d_mlp", m, "filter", False, True) for m in ("sgd", "sam")}
  assert axes["sam"] == [("learning_rate", [0.1, 0.2, 0.4]), ("sam.rho", [0.1, 0.2, 0.4, 0.8])]
  chosen = s.tune("mnist1d_mlp", axes)
  assert chosen["sam"] == {"learning_rate": 0.1, "sam.rho": 3.2}
  assert chosen["sgd"] == {"learning_rate": 0.2, "weight_decay": 5e-4}
  sam_runs = [j for j in train.calls if j[1] == "sam"]
  # 3 x 4, then lr 0.05 and rho 1.6 (4 x 5), then rho 3.2 (4 x 6): 24 settings x 2 seeds.
  assert len(sam_runs) == 24 * 2 and {j[3] for j in sam_runs} == set(study.TUNE_SEEDS)
  assert len([j for j in train.calls if j[1] == "sgd"]) == 12 * 2  # interior: no extension
  setting, pos, n = study_report.chosen(s.rows, "mnist1d_mlp", "sam")
  assert setting == chosen["sam"] and n == 48
  assert pos == "learning_rate 2/4, sam.rho 6/6 (edge)"


def test_runner_and_report_break_a_tie_alike_whatever_the_records_order(tmp_path):
  s = _study(tmp_path, fake_trainer({}))  # every setting scores 0.9: one tie
  axes = [("learning_rate", [0.1, 0.2]), ("weight_decay", [5e-4, 2e-3])]
  chosen = s.tune("mnist1d_mlp", {"sgd": axes})["sgd"]
  assert chosen == {"learning_rate": 0.025, "weight_decay": 3.125e-5}  # the smallest values
  for rows in (s.rows, dict(reversed(s.rows.items()))):
    assert study_report.chosen(rows, "mnist1d_mlp", "sgd")[0] == chosen


def test_a_diverged_tuning_run_counts_in_its_settings_mean(tmp_path):
  train = fake_trainer({"sgd": {"weight_decay": 5e-4}}, diverge={("sgd", 1)})
  s = _study(tmp_path, train)
  chosen = s.tune("mnist1d_mlp", {"sgd": [("weight_decay", [5e-4, 2e-3])]})
  # Every setting has one diverged seed (0.1), so the means still rank the settings.
  assert chosen["sgd"] == {"weight_decay": 5e-4}
  assert study.score(s.rows, "mnist1d_mlp", "sgd", chosen["sgd"]) == pytest.approx((0.9 + 0.1) / 2)


def test_the_study_resumes_from_its_records_and_writes_the_report(tmp_path, no_timing):
  optima = {"nrs_absolute": {"nrs.radius": 0.05}, "nrs_filter": {"nrs.radius": 0.25}}
  train = fake_trainer(optima, diverge={("sam", study.FINAL_SEED0 + 1)})
  s = _study(tmp_path, train)
  family = study.pilot_family(s)
  assert family == "absolute"  # the fake gives both 0.9; ties go to the first family
  chosen = study.run_task(s, "mnist1d_mlp", family)
  finals = [j for j in train.calls if j[2] == "final"]
  seeds = list(range(study.FINAL_SEED0, study.FINAL_SEED0 + 10))
  per_method = {m: sorted(j[3] for j in finals if j[1] == m) for m in study.IMAGE}
  assert all(v == seeds for v in per_method.values())  # paired: the same 10 seeds each
  assert not set(seeds) & set(study.TUNE_SEEDS)
  ablations = {j[1] for j in finals} - set(study.IMAGE)
  assert ablations == set(study.ABLATIONS)
  assert all(j[4] == chosen["nrs"] for j in finals if j[1] in study.ABLATIONS)
  n = len(train.calls)
  again = fake_trainer(optima)
  s2 = _study(tmp_path, again)  # a fresh checkout: only the records survive
  study.pilot_family(s2)
  study.run_task(s2, "mnist1d_mlp", family)
  assert again.calls == [] and len(s2.rows) == n
  with open(tmp_path / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert tuple(rows[0]) == study.COLUMNS and len(rows) == n
  assert {r["passes"] for r in rows if r["method"] == "nrs_k4"} == {"5.0"}
  report = tmp_path / "RESULTS_STUDY.md"
  study_report.write(study.read_records(str(tmp_path / "runs.csv")), ["mnist1d_mlp"], str(report))
  text = report.read_text()
  sam = [line for line in text.splitlines() if line.startswith("| sam |")][0]
  # The diverged seed counts at chance (10%) in sam's mean, and is reported.
  test = study_report._finals(s.rows, "mnist1d_mlp", "sam")
  mean = np.mean([test[s]["test"] for s in seeds])
  assert f"{100 * mean:.2f} [" in sam and "| 1 |" in sam
  assert "NRS - method" in text and "Ablations of nrs" in text
  assert (tmp_path / "results" / "study_cost_accuracy.png").stat().st_size > 1000


def test_the_plot_gives_each_method_one_colour_on_every_panel(tmp_path):
  import matplotlib.colors
  import matplotlib.image

  # In each panel's own colour cycle nrs would be 3rd on the left and 2nd on the right.
  left = {
    "sgd": (1.0, 0.7, 0.69, 0.71),
    "sam": (1.7, 0.72, 0.7, 0.74),
    "nrs": (1.8, 0.75, 0.7, 0.8),
  }
  right = {"adamw": (1.0, 2.6, 2.5, 2.7), "nrs": (1.8, 2.5, 2.4, 2.6)}
  study_report.plot({"mnist1d_mlp": left, "stdlib_lm": right}, str(tmp_path / "p.png"))
  img = matplotlib.image.imread(tmp_path / "p.png")[..., :3]
  halves = img[:, : img.shape[1] // 2], img[:, img.shape[1] // 2 :]
  # The palette without C7, grey, which anti-aliased text also gives.
  palette = {f"C{i}": np.array(matplotlib.colors.to_rgb(f"C{i}")) for i in range(10) if i != 7}
  used = [
    {c for c, rgb in palette.items() if np.all(np.abs(h - rgb) < 0.01, axis=-1).sum() > 20}
    for h in halves
  ]
  assert len(used[0]) == 3 and len(used[1]) == 2  # every method its own colour
  assert len(used[0] & used[1]) == 1  # the one shared method, nrs, in one colour


def test_report_only_refuses_records_that_do_not_match(tmp_path, no_timing):
  s = _study(tmp_path, fake_trainer({}))
  s.run([("mnist1d_mlp", "sgd", "final", study.FINAL_SEED0, {"weight_decay": 5e-4})])
  rows = study.read_records(str(tmp_path / "runs.csv"))
  with pytest.raises(ValueError, match="lack final runs of task 'mnist1d_mlp'.*--tasks"):
    study_report.write(rows, ["mnist1d_mlp"], str(tmp_path / "r.md"))
  bad = dict(next(iter(rows.values())), method="rwp")
  with pytest.raises(ValueError, match="method 'rwp' is not in the study's lists"):
    study_report.write({("x",): bad}, [], str(tmp_path / "r.md"))


def test_bad_names_and_empty_grids_fail_before_training():
  with pytest.raises(ValueError, match="method='adam' is not known"):
    study.method_of("adam", "absolute")
  with pytest.raises(ValueError, match="noise family"):
    study.method_of("nrs", "")
  with pytest.raises(ValueError, match="empty grid"):
    study._axes("mnist1d_mlp", "nrs_k2", "absolute", False, True)


def test_methods_on_the_transformers_tune_below_the_previous_low_edges():
  vit = study.TASKS["mnist1d_vit"]
  assert max(study.method_of("sam", "absolute", vit).grid) <= 0.02
  assert max(study.method_of("nrs", "absolute", vit).grid) <= 0.01
  config = study.make_config(vit, "nrs_cheap", {"nrs.radius": 0.005}, 3, False, "absolute")
  assert config.nrs.neighbor_batch_size == config.batch_size // 4
  assert config.nrs.stop_gradient_center and config.seed == 3 and config.method == "nrs"


def test_statistics_match_scipy():
  a, b = [0.75, 0.76, 0.77, 0.76, 0.78], [0.70, 0.72, 0.71, 0.74, 0.73]
  m, lo, hi, p = study_report.paired(a, b)
  t = stats.ttest_rel(a, b)
  assert np.isclose(m, np.mean(np.subtract(a, b))) and np.isclose(p, t.pvalue)
  ci = t.confidence_interval()
  assert np.isclose(lo, ci.low) and np.isclose(hi, ci.high)
  assert study_report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
  assert study_report.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_mnist5k_is_real_digits_with_a_clean_validation_split():
  ds = input_pipeline.load("mnist5k", validation_fraction=0.25, seed=0, label_noise=0.2)
  assert (
    ds.train.x.shape == (3000, 28, 28, 1)
    and len(ds.validation.y) == 1000
    and len(ds.test.y) == 1000
  )
  assert 0.0 <= ds.train.x.min() and ds.train.x.max() == 1.0
  assert np.bincount(ds.test.y, minlength=10).min() > 60  # shuffled: every class in test
  clean = input_pipeline.load("mnist5k", validation_fraction=0.25, seed=0)
  np.testing.assert_array_equal(
    ds.validation.y, clean.validation.y
  )  # noise only in training labels
  assert np.mean(ds.train.y != clean.train.y) == pytest.approx(0.2, abs=0.001)


def test_mnist1d_cache_names_the_sample_count(tmp_path):
  ds = input_pipeline.load("mnist1d", data_dir=str(tmp_path), mnist1d_samples=1000)
  assert (tmp_path / "mnist1d_seed42_n1000.npz").exists()
  assert len(ds.train.y) + len(ds.validation.y) == 800 and len(ds.test.y) == 200


@pytest.mark.slow
def test_a_quick_study_trains_and_reports(tmp_path):
  s = study.Study(str(tmp_path / "runs.csv"), str(tmp_path / "w"), 1, True)
  family = study.pilot_family(s)
  study.run_task(s, "mnist1d_mlp", family)
  study_report.write(s.rows, ["mnist1d_mlp"], str(tmp_path / "r.md"), quick=True)
  assert "| nrs_cheap |" in (tmp_path / "r.md").read_text()


def test_the_committed_report_is_what_the_committed_records_give(tmp_path):
  """Every table is generated from the records: ``experiments/RESULTS_STUDY.md`` regenerates
  byte for byte from ``experiments/results/study_runs.csv`` (for the tasks its first line
  declares), however many runs of other tasks the records already hold."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "experiments", "RESULTS_STUDY.md")) as f:
    text = f.read()
  declared = re.search(r"--report_only(?: --tasks=([\w,]+))?`", text).group(1)
  rows = study.read_records(os.path.join(root, "experiments", "results", "study_runs.csv"))
  out = tmp_path / "RESULTS_STUDY.md"
  tasks = declared.split(",") if declared else list(study.TASKS)
  study_report.write(rows, tasks, str(out), declared=bool(declared))
  assert out.read_text() == text


def test_the_report_does_not_import_the_runner():
  """The report imported the runner's declarations and the runner the report: an import
  cycle. Both now import ``study_spec``; the report alone loads neither the runner nor
  absl's flags, and the pilot's family rule is one function both call."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
    "import sys; from experiments import study_report; "
    "print('experiments.study' in sys.modules, 'absl.flags' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
  assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
  assert study.pilot_choice({"nrs_absolute": 0.7, "nrs_filter": 0.71}) == "filter"
  assert study.pilot_choice({"nrs_absolute": 0.72, "nrs_filter": 0.71}) == "absolute"
