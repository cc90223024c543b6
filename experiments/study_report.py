"""The study's report, written from its records alone (``experiments/results/study_runs.csv``).
Per task: each method's chosen setting with its grid position, its tuning runs, the mean test
value over the final seeds with a 95% t-interval, and NRS minus each method as a paired
difference (by seed) with its 95% interval and a Holm-adjusted p over the task's comparisons
(``scipy.stats``). A diverged run counts at its chance value."""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import stats

from experiments import study_spec as study
from experiments.tables import markdown_table

READING = (
  "Reading the tables: a method's chosen setting has the best mean validation score over the "
  "tuning seeds; the final seeds are disjoint from those and shared by every method (the same "
  "initialisation, data order and split), so NRS - method is paired by seed: positive means NRS "
  "is ahead in accuracy, negative means it is ahead in bits per character. Intervals are "
  "t-intervals, p a paired t-test, and Holm's adjustment runs over the task's comparisons. A "
  "diverged run counts at chance (1/C accuracy, 8 bits per character), so a method with one has "
  "seeds far from normal: its interval widens, may pass the metric's range (above 100%), and "
  "its test loses power. The diverged column says where; the per-seed rows are in the records."
)


def ci95(xs) -> tuple[float, float, float]:
  """Mean and the 95% t-interval of the mean."""
  xs = np.asarray(xs, float)
  m = float(xs.mean())
  if len(xs) < 2 or np.all(xs == xs[0]):
    return m, m, m
  lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=m, scale=stats.sem(xs))
  return m, float(lo), float(hi)


def paired(a, b) -> tuple[float, float, float, float]:
  """Mean of ``a - b`` (paired by seed), its 95% interval, and the two-sided t-test's p."""
  d = np.asarray(a, float) - np.asarray(b, float)
  m, lo, hi = ci95(d)
  p = 1.0 if np.all(d == d[0]) and d[0] == 0 else float(stats.ttest_1samp(d, 0.0).pvalue)
  return m, lo, hi, (0.0 if np.isnan(p) else p)


def holm(ps: list[float]) -> list[float]:
  """Holm's step-down adjustment (controls the family-wise error over ``ps``)."""
  order, out, running = np.argsort(ps), [0.0] * len(ps), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    out[i] = running
  return out


def check(rows: dict, tasks: list, quick: bool) -> None:
  """Raises unless every row names a known task and method and every task in ``tasks``
  has all its final runs (a partial table is never written silently)."""
  for r in rows.values():
    names = study.task_of(r["task"]).methods if r["task"] in (*study.TASKS, "pilot") else None
    ok = names is not None and (
      r["method"] in names or (r["task"] == study.ABLATION_TASK and r["method"] in study.ABLATIONS)
    )
    if not ok:
      raise ValueError(
        f"records: task {r['task']!r} with method {r['method']!r} is not in the study's lists."
      )
  for t in tasks:
    seeds = study.final_seeds(study.TASKS[t], quick)
    names = [*study.TASKS[t].methods, *(study.ABLATIONS if t == study.ABLATION_TASK else ())]
    missing = [m for m in names if len(_finals(rows, t, m)) < len(seeds)]
    if missing:
      raise ValueError(
        f"records lack final runs of task {t!r} for {missing}: run the study, or declare the "
        "finished tasks with --tasks for a partial report."
      )


def _finals(rows, task, method) -> dict:
  key = (task, method, "final")
  return {r["seed"]: r for r in rows.values() if (r["task"], r["method"], r["phase"]) == key}


def chosen(rows, task, method) -> tuple[dict, str, int]:
  """The tuned setting (best mean validation value), its grid position, the tuning runs."""
  tune = [
    r for r in rows.values() if (r["task"], r["method"], r["phase"]) == (task, method, "tune")
  ]
  if not tune:
    return {}, "", 0
  settings = [json.loads(s) for s in dict.fromkeys(r["setting"] for r in tune)]
  setting = study.select(rows, task, method, settings)
  pos = []
  for k, v in setting.items():
    axis = sorted({st[k] for st in settings})
    if len(axis) > 1:
      i = axis.index(v)
      pos.append(f"{k} {i + 1}/{len(axis)}" + (" (edge)" if i in (0, len(axis) - 1) else ""))
  return setting, ", ".join(pos), len(tune)


UNITS = {"bits_per_char": "bits per character, lower is better", "accuracy": "test accuracy, %"}


def task_section(rows, t, quick) -> tuple[list, dict]:
  task = study.TASKS[t]
  seeds = study.final_seeds(task, quick)
  names = [*task.methods, *(study.ABLATIONS if t == study.ABLATION_TASK else ())]
  fin = {m: _finals(rows, t, m) for m in names}  # one scan of the records per method
  test = {m: [fin[m][s]["test"] for s in seeds] for m in names}
  unit = UNITS[task.metric]
  f = lambda x: f"{x:.3f}" if task.metric == "bits_per_char" else f"{100 * x:.2f}"
  ci = lambda trio: "{} [{}, {}]".format(*map(f, trio))
  others = [m for m in task.methods if m != "nrs"]
  diffs = {m: paired(test["nrs"], test[m]) for m in others}
  adj = dict(zip(others, holm([diffs[m][3] for m in others])))
  body, points = [], {}
  for m in task.methods:
    setting, pos, n = chosen(rows, t, m)
    r0 = fin[m][seeds[0]]
    mean, lo, hi = ci95(test[m])
    points[m] = (r0["step_cost"], mean, lo, hi)
    d = "" if m == "nrs" else ci(diffs[m][:3])
    p = "" if m == "nrs" else f"{diffs[m][3]:.3g} / {adj[m]:.3g}"
    div = sum(fin[m][s]["diverged"] for s in seeds)
    row = [m, f"{r0['passes']:.2f}", f"{r0['step_cost']:.2f}", json.dumps(setting, sort_keys=True)]
    body.append([*row, pos, str(n), ci((mean, lo, hi)), str(div), d, p])
  head = ["method", "passes", "step cost", "chosen", "grid position", "tuning runs"]
  head += [f"mean [95% CI] ({unit})", "diverged", "NRS - method [95% CI]", "p / Holm p"]
  lines = [f"## {t}", "", markdown_table(head, body), ""]
  if t == study.ABLATION_TASK:
    abl = list(study.ABLATIONS)
    d = {a: paired(test[a], test["nrs"]) for a in abl}
    adj = dict(zip(abl, holm([d[a][3] for a in abl])))
    body = []
    for a in abl:
      r0 = fin[a][seeds[0]]
      row = [a, json.dumps(study.ABLATIONS[a]), f"{r0['passes']:.2f}", f"{r0['step_cost']:.2f}"]
      body.append([*row, ci(ci95(test[a])), ci(d[a][:3]), f"{adj[a]:.3g}"])
    head = ["ablation", "changed from nrs", "passes", "step cost", "mean [95% CI]"]
    head += ["ablation - nrs [95% CI]", "Holm p"]
    title = f"### Ablations of nrs at its chosen setting ({t}, the same seeds)"
    lines += [title, "", markdown_table(head, body), ""]
  return lines, points


def plot(points: dict, path: str) -> None:
  """One panel per task (three a row), each method in the same colour on every panel."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  color = {m: f"C{i}" for i, m in enumerate([*study.IMAGE, "adamw"])}
  ncol, nrow = min(3, len(points)), -(-len(points) // 3)  # at least one task
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.5 * nrow), squeeze=False)
  for ax in axes.flat[len(points) :]:
    ax.axis("off")
  for ax, (t, pts) in zip(axes.flat, points.items()):
    bits = study.TASKS[t].metric == "bits_per_char"
    for m, (c, *mean_lo_hi) in pts.items():
      mean, lo, hi = (x if bits else 100 * x for x in mean_lo_hi)
      ax.errorbar([c], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=3, c=color[m])
      ax.annotate(m, (c, mean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ylabel = f"{UNITS[study.TASKS[t].metric]}\n(mean, 95% CI)"
    ax.set(title=t, xlabel="step time / base method's", ylabel=ylabel)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(rows: dict, tasks: list, path: str, quick: bool = False, declared: bool = False) -> None:
  check(rows, tasks, quick)
  used = [r for r in rows.values() if r["task"] in (*tasks, "pilot")]  # others may be running
  pilot, best = [], {}
  for m in study.PILOT.methods:
    setting, pos, n = chosen(rows, "pilot", m)
    best[m] = study.score(rows, "pilot", m, setting)  # the runner's pilot_family rule
    pilot.append([m, json.dumps(setting, sort_keys=True), pos, str(n), f"{100 * best[m]:.2f}"])
  lines = [
    "# The evidence study",
    "",
    f"Written by `python -m experiments.study --report_only{' --tasks=' + ','.join(tasks) if declared else ''}` from `experiments/results/study_runs.csv` ({len(used)} runs of these tasks and the pilot, {sum(r['seconds'] for r in used) / 3600:.1f} CPU hours); do not edit.",
    "",
    f"NRS's noise family for the study: **{study.pilot_choice(best)}**, the "
    "better tuned validation score on the pilot task (mnist1d, another data seed; not in the tables):",
    "",
    markdown_table(["family", "chosen", "grid position", "tuning runs", "validation %"], pilot),
    "",
    READING,
    "",
  ]
  points = {}
  for t in tasks:
    sec, points[t] = task_section(rows, t, quick)
    lines += sec
  if points:
    png = os.path.join(os.path.dirname(path) or ".", "results", "study_cost_accuracy.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    plot(points, png)
    lines += [f"![cost and accuracy](results/{os.path.basename(png)})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
