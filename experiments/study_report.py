"""The study's report, written from its records alone (``experiments/results/study_runs.csv``):
per task the paired comparisons its PROTOCOL declares (``scipy.stats``), the flatness and
calibration of the final solutions, the cheaper NRS variants' goal, costs and machines."""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import numpy as np
from scipy import stats

from experiments import study_spec as study
from experiments.tables import markdown_table

MARGIN = {"accuracy": 0.01, "bits_per_char": 0.01}  # the equivalence margins (1 pp, 0.01 bpc)
ALPHA, POWER, CHEAP_COST = 0.05, 0.8, 1.15
UNITS = {"bits_per_char": "bits per character, lower is better", "accuracy": "test accuracy, %"}
TIE = {"bits_per_char": "+-0.01 bits per character", "accuracy": "+-1 pp"}
PROTOCOL = (
  "Protocol, fixed before any result. Tuning: the weight-decay methods (sgd and sgd_2x, or adamw) "
  "tune learning rate x weight decay; every other method tunes learning rate x its own strength at "
  "the first one's weight decay (on the transformers at AdamW's learning rate x 0.5, 1, 2); each "
  "ablation retunes the radius at NRS's chosen learning rate and weight decay. A setting scores its "
  "mean validation value over the 2 tuning seeds; a choice at an edge extends that axis, up to "
  f"{study.MAX_EXTENSIONS} times. Final seeds are disjoint from the tuning seeds and shared by every "
  "method, so NRS - method pairs by seed: positive means NRS ahead in accuracy, negative means NRS "
  "ahead in bits per character. Primary test: two-sided Wilcoxon signed-rank, Holm-corrected over "
  "the task's comparisons (p < 0.05); effect sizes: paired 95% t-intervals. A tie is claimed only "
  "where two one-sided paired t-tests at +-1 pp (+-0.01 bits per character), Holm-corrected, pass; "
  "otherwise the verdict is inconclusive, with the minimum detectable difference (paired t, 80% "
  "power, alpha 0.05). A diverged run (a non-finite loss, or validation at chance) counts at chance "
  "(1/C, 8 bits per character), and each method's are counted in their own column. On the "
  "semi-supervised tasks (10% of the training labels kept) the pairs are nrs_unlabeled - method, "
  "and nrs_unlabeled, vat and pi_model weigh their consistency term 1 and tune its strength."
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


def wilcoxon(d) -> float:
  """Two-sided Wilcoxon signed-rank p of paired differences (1 where all are zero)."""
  d = np.asarray(d, float)
  return 1.0 if np.all(d == 0) else float(stats.wilcoxon(d).pvalue)


def tost(d, margin: float) -> float:
  """Two one-sided paired t-tests that the mean of ``d`` lies within +-``margin``: the larger
  p (equivalence at level alpha where it is below alpha)."""
  d = np.asarray(d, float)
  se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
  if se == 0:
    return 0.0 if abs(d.mean()) < margin else 1.0
  lower = stats.t.sf((d.mean() + margin) / se, len(d) - 1)
  upper = stats.t.cdf((d.mean() - margin) / se, len(d) - 1)
  return float(max(lower, upper))


def mdd(d) -> float:
  """The smallest mean difference a paired t-test (alpha 0.05, two-sided) detects with 80%
  power at this spread and number of pairs."""
  n = len(d)
  t = stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)
  return float(t * np.std(np.asarray(d, float), ddof=1) / np.sqrt(n))


def holm(ps: list[float]) -> list[float]:
  """Holm's step-down adjustment (controls the family-wise error over ``ps``)."""
  order, out, running = np.argsort(ps), [0.0] * len(ps), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    out[i] = running
  return out


def compare(test: dict, ref: str, others: list, metric: str) -> dict:
  """``ref - m`` for each of ``others``: (mean, lo, hi, Wilcoxon Holm p, TOST Holm p, MDD,
  verdict), Holm over ``others``."""
  d = {m: np.subtract(test[ref], test[m]) for m in others}
  w = dict(zip(others, holm([wilcoxon(d[m]) for m in others])))
  e = dict(zip(others, holm([tost(d[m], MARGIN[metric]) for m in others])))
  out = {}
  for m in others:
    mean, lo, hi, _ = paired(test[ref], test[m])
    ahead = (mean > 0) == (metric == "accuracy")
    verdict = "tie" if e[m] < ALPHA else "inconclusive"
    verdict = f"{ref} {'ahead' if ahead else 'behind'}" if w[m] < ALPHA else verdict
    out[m] = (mean, lo, hi, w[m], e[m], mdd(d[m]), verdict)
  return out


def check(rows: dict, tasks: list, quick: bool) -> None:
  """Raises unless every row names a known task and method and every task in ``tasks``
  has all its final runs (a partial table is never written silently)."""
  for r in rows.values():
    names = study.task_of(r["task"]).methods if r["task"] in (*study.TASKS, "pilot") else ()
    if r["method"] not in (*names, *(study.ABLATIONS if r["task"] == study.ABLATION_TASK else ())):
      raise ValueError(
        f"records: task {r['task']!r} with method {r['method']!r} is not in the study's lists."
      )
  for t in tasks:
    task = study.TASKS[t]
    need = {m: study.final_seeds(task, quick) for m in task.methods}
    if t == study.ABLATION_TASK:
      need.update({a: study.final_seeds(task, quick, ablation=True) for a in study.ABLATIONS})
    missing = [m for m, seeds in need.items() if set(seeds) - set(finals(rows, t, m))]
    if missing:
      raise ValueError(
        f"records lack final runs of task {t!r} for {missing}: run the study, or declare the "
        "finished tasks with --tasks for a partial report."
      )


def finals(rows, task, method) -> dict:
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


def _fmt(metric):
  f = lambda x: f"{x:.3f}" if metric == "bits_per_char" else f"{100 * x:.2f}"
  return f, lambda trio: "{} [{}, {}]".format(*map(f, trio))


def cost_lines(fin, names, seeds, base) -> list:
  """Step cost against the median CPU seconds per final run, each over the base method's;
  where the two differ by more than 15% (after the run's epochs), the fixed part of a run
  (compiling, evaluating, measuring), fitted over the methods, is what the step leaves out;
  so is the speed of another machine, where a method's final runs were made on one."""
  sec = {m: float(np.median([fin[m][s]["seconds"] for s in seeds])) for m in names}
  work = {m: fin[m][seeds[0]]["step_cost"] * study.method_of(m, "absolute").epochs for m in names}
  slope, fixed = np.polyfit([work[m] for m in names], [sec[m] for m in names], 1)
  off = [m for m in names if abs(sec[m] / sec[base] / work[m] - 1) > 0.15]
  ratios = ", ".join(f"{m} {sec[m] / sec[base]:.2f}" for m in names)
  why = "which splits no run into fixed work and steps: the seconds vary with when the runs "
  why += "were made (several sessions, shared machines); read the step cost, timed side by side."
  if 0 < fixed < sec[base] and slope > 0:
    why = f"so the fixed {fixed:.1f} s of {sec[base]:.1f} s pull the ratios toward 1."
  where = {m: {fin[m][s].get("machine") for s in seeds} for m in names}
  if moved := ", ".join(m for m in off if where[m] != where[base]):
    why += f" And {moved} ran (some or all) on other machines than {base}, at their speed."
  lines = [f"Median CPU seconds per final run over {base}'s: {ratios}."]
  if off:
    lines.append(
      f"These differ by more than 15% from step cost x epochs for {', '.join(off)}: a run also "
      f"compiles, evaluates and (final runs) measures its solution, work the step time leaves "
      f"out; fitted over this task's methods, seconds = {fixed:.1f} + {slope:.1f} x (step cost x "
      f"epochs), {why}"
    )
  return lines


class TaskReport(NamedTuple):
  lines: list  # the task's markdown
  test: dict  # method -> per-seed test values
  cheap: dict  # cheap variant -> whether it meets the goal
  costs: dict  # method -> step cost
  summary: dict  # the machine-readable summary (study_summary.json) the README renders


def task_section(rows, t, quick) -> TaskReport:
  """The task's section of the report, with what the rest of the report and the summary
  read from it."""
  task = study.TASKS[t]
  seeds = study.final_seeds(task, quick)
  fin = {m: finals(rows, t, m) for m in task.methods}
  costs = {m: fin[m][seeds[0]]["step_cost"] for m in task.methods}
  test = {m: [fin[m][s]["test"] for s in seeds] for m in task.methods}
  f, ci = _fmt(task.metric)
  ref = task.subject
  others = [m for m in task.methods if m != ref]
  cmp = compare(test, ref, others, task.metric)
  body, edges, methods = [], [], {}
  for m in task.methods:
    setting, pos, n = chosen(rows, t, m)
    edges += [f"{m} ({p.split(' ')[0]})" for p in pos.split(", ") if "edge" in p]
    r0 = fin[m][seeds[0]]
    div = sum(fin[m][s]["diverged"] for s in seeds)
    row = [m, f"{r0['passes']:.2f}", f"{costs[m]:.2f}", json.dumps(setting, sort_keys=True)]
    row += [pos, str(n), ci(ci95(test[m])), str(div)]
    methods[m] = {"passes": r0["passes"], "step_cost": costs[m], "chosen": setting}
    methods[m].update(mean_ci=ci(ci95(test[m])), diverged=div)
    if m == ref:
      row += ["", "", ""]
    else:
      mean, lo, hi, w, _, dd, verdict = cmp[m]
      methods[m].update(diff_ci=ci((mean, lo, hi)), wilcoxon_holm_p=w, verdict=verdict)
      methods[m]["mdd"] = f(dd) if verdict == "inconclusive" else None
      verdict += f" (MDD {f(dd)})" if verdict == "inconclusive" else ""
      row += [ci((mean, lo, hi)), f"{w:.3g}", verdict]
    body.append(row)
  head = ["method", "passes", "step cost", "chosen", "grid position", "tuning runs"]
  head += [f"mean [95% CI] ({UNITS[task.metric]})", "diverged", f"{ref} - method [95% CI]"]
  head += ["Wilcoxon Holm p", "verdict"]
  lines = [f"## {t}", "", markdown_table(head, body), ""]
  at_edge = ", ".join(edges) or "none"
  lines += [f"Still at an edge of its grid after the extensions: {at_edge}.", ""]
  lines += cost_lines(fin, list(task.methods), seeds, task.methods[0]) + [""]
  # the variants against full NRS: the table's own verdicts (one Holm family per task)
  variants = [m for m in study.NRS_FAMILY[1:] if m in task.methods and ref == "nrs"]
  cheap = {m: costs[m] <= CHEAP_COST and cmp[m][6] == "tie" for m in variants}
  goal = f"goal: step cost <= {CHEAP_COST} x and a tie at {TIE[task.metric]}"
  said = "; ".join(f"{m} step {costs[m]:.2f}, {cmp[m][6]}" for m in variants)
  lines += [f"Cheaper NRS variants against full NRS ({goal}): {said}.", ""] if variants else []
  measured, flat = measures_section(rows, t, fin, seeds, test)
  lines += measured
  if t == study.ABLATION_TASK:
    lines += ablation_section(rows, t, quick)
  summary = {"kind": task.kind, "metric": task.metric, "unit": UNITS[task.metric]}
  summary.update(subject=ref, head=head, rows=body, methods=methods, edges=edges, flatness=flat)
  return TaskReport(lines, test, cheap, costs, summary)


def measures_section(rows, t, fin, seeds, test) -> list:
  """Per measure: each method's mean [95% CI], NRS - method (Wilcoxon, Holm), and Kendall's
  tau against test accuracy over all final runs; then the task's plain answers."""
  methods, ref = list(study.TASKS[t].methods), study.TASKS[t].subject
  val = {(m, k): [fin[m][s][k] for s in seeds] for m in methods for k in study.MEASURES}
  failed = sorted(
    f"{m}/seed {s}: {k}"
    for m in methods
    for s in seeds
    for k in study.MEASURES
    if not math.isfinite(fin[m][s][k])
  )
  body, signs = [], {}
  for k in study.MEASURES:
    ok = [i for i in range(len(seeds)) if all(math.isfinite(val[m, k][i]) for m in methods)]
    row = [k]
    for m in methods:
      row.append("{:.3g} [{:.3g}, {:.3g}]".format(*ci95([val[m, k][i] for i in ok])) if ok else "")
    others = [m for m in methods if m != ref]
    ps = holm([wilcoxon([val[ref, k][i] - val[m, k][i] for i in ok]) for m in others])
    for m, p in zip(others, ps):
      mean = float(np.mean([val[ref, k][i] - val[m, k][i] for i in ok])) if ok else math.nan
      signs[k, m] = (mean, p)
    x = [val[m, k][i] for m in methods for i in range(len(seeds))]
    y = [test[m][i] for m in methods for i in range(len(seeds))]
    keep = [j for j in range(len(x)) if math.isfinite(x[j])]
    tau, p_tau = stats.kendalltau([x[j] for j in keep], [y[j] for j in keep])
    signs[k, "tau"] = (float(tau), float(p_tau))
    cmp = ", ".join(f"{m} {signs[k, m][0]:+.3g} (p {signs[k, m][1]:.2g})" for m in others)
    body.append(row + [cmp, f"{tau:+.2f} (p {p_tau:.2g})"])
  head = ["measure", *methods, f"{ref} - method (Wilcoxon Holm p)", "Kendall tau with test"]
  lines = [f"### Flatness and calibration of the final solutions ({t})", ""]
  lines += [markdown_table(head, body), ""]
  if failed:
    lines += [f"Measures that failed (NaN, left out of the pair): {'; '.join(failed)}.", ""]
  flat = flatness_words(signs, methods[0], study.TASKS[t].metric)
  return lines + [flatness_answer(flat, methods[0], ref, study.TASKS[t].metric), ""], flat


def flatness_words(signs, base: str, metric: str = "accuracy") -> dict:
  """Flatter: lambda_max and the trace both lower than the base method's (SGD or AdamW) and
  SAM's, each at Holm p < 0.05. Flatness predicts the test value where Kendall's tau says
  flatter goes with better (p < 0.05); a significant tau the other way says so."""

  def word(m):
    (a, pa), (b, pb) = signs["lambda_max", m], signs["hessian_trace", m]
    if a < 0 and b < 0 and pa < ALPHA and pb < ALPHA:
      return "yes"
    if a > 0 and b > 0 and pa < ALPHA and pb < ALPHA:
      return "no, sharper"
    return "not shown"

  tau, p = signs["lambda_max", "tau"]
  predicts = "yes" if (tau < 0) == (metric == "accuracy") else "no: the reverse, sharper did better"
  return {
    "vs_base": word(base),
    "vs_sam": word("sam"),
    "tau": tau,
    "tau_p": p,
    "predicts": predicts if p < ALPHA else "not shown",
  }


def flatness_answer(flat: dict, base: str, ref: str = "nrs", metric: str = "accuracy") -> str:
  """The report's sentence of :func:`flatness_words`."""
  what = "test accuracy" if metric == "accuracy" else "test bits per character"
  return (
    f"Does {ref} find flatter minima (lower lambda_max and trace, Holm p < 0.05) than {base}: "
    f"{flat['vs_base']}; than sam: {flat['vs_sam']}. "
    f"Does flatness predict accuracy here (Kendall tau of lambda_max with {what}, p < 0.05): "
    f"{flat['predicts']} (tau {flat['tau']:+.2f}, p {flat['tau_p']:.2g})."
  )


def ablation_section(rows, t, quick) -> list:
  task = study.TASKS[t]
  seeds = study.final_seeds(task, quick, ablation=True)
  names = ["nrs", *study.ABLATIONS]
  test = {m: [finals(rows, t, m)[s]["test"] for s in seeds] for m in names}
  cmp = compare(test, "nrs", list(study.ABLATIONS), task.metric)
  f, ci = _fmt(task.metric)
  body = []
  for a in study.ABLATIONS:
    setting, pos, _ = chosen(rows, t, a)
    mean, lo, hi, w, _, dd, verdict = cmp[a]
    verdict = verdict.replace("nrs ahead", "ablation behind").replace(
      "nrs behind", "ablation ahead"
    )
    verdict += f" (MDD {f(dd)})" if verdict == "inconclusive" else ""
    row = [a, json.dumps(study.ABLATIONS[a]), str(setting.get("nrs.radius")), pos]
    body.append(row + [ci(ci95(test[a])), ci((-mean, -hi, -lo)), f"{w:.3g}", verdict])
  head = ["ablation", "changed from nrs", "radius (retuned)", "grid position", "mean [95% CI]"]
  head += ["ablation - nrs [95% CI]", "Wilcoxon Holm p", "verdict"]
  title = f"### Ablations of nrs, each with its radius retuned ({t}, the first {len(seeds)} seeds)"
  return [title, "", markdown_table(head, body), ""]


def machines_line(rows, t) -> str:
  used = [r for r in rows.values() if r["task"] == t]
  names = sorted({r["machine"] or "unknown" for r in used})
  by_seed = {}
  for r in used:
    if r["phase"] == "final":
      by_seed.setdefault(r["seed"], set()).add(r["machine"])
  straddle = sum(len(v) > 1 for v in by_seed.values())
  return (
    f"Rows of {t} were made on {len(names)} machine(s) ({'; '.join(names)}); "
    f"{straddle} of its {len(by_seed)} final seeds have rows from more than one machine."
  )


def plot(tests: dict, costs: dict, path: str) -> None:
  """One panel per task: each method's median test value and interquartile range against its
  step cost; a legend, not labels, names them (a colour and marker each; the subjects black)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys([*study.IMAGE, *study.TRANSFORMER, *study.SEMI]))
  style = {m: dict(c=plt.get_cmap("tab20")(i), marker="os^D"[i % 4]) for i, m in enumerate(names)}
  style.update(nrs=dict(c="k", marker="*"), nrs_unlabeled=dict(c="k", marker="P"))  # subjects
  ncol, nrow, leg = min(3, len(tests)), -(-len(tests) // 3), 0.25 * -(-len(names) // 7) + 0.2
  fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow + leg), squeeze=False)
  for ax in axes.flat[len(tests) :]:
    ax.axis("off")
  for ax, (t, test) in zip(axes.flat, tests.items()):
    scale = 1 if study.TASKS[t].metric == "bits_per_char" else 100
    for m, xs in test.items():
      q1, med, q3 = np.percentile(np.asarray(xs) * scale, [25, 50, 75])
      ax.errorbar([costs[t][m]], [med], [[med - q1], [q3 - med]], ls="", capsize=3, **style[m])
    ax.set(title=t, xlabel="step time / base method's", ylabel=UNITS[study.TASKS[t].metric])
  handles = [plt.Line2D([], [], ls="", **style[m]) for m in names]
  fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=8)
  fig.suptitle("median and interquartile range over the final seeds", fontsize=9)
  fig.tight_layout(rect=(0, leg / (3.8 * nrow + leg), 1, 0.97))  # (the legend's inches free)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(rows: dict, tasks: list, path: str, quick: bool = False) -> None:
  """The report of ``tasks``; its header names them (not the command's spelling), so the
  report reproduces whichever way the same tasks were asked for."""
  tasks = [t for t in tasks if t != "pilot"]
  check(rows, tasks, quick)
  used = [r for r in rows.values() if r["task"] in (*tasks, "pilot")]  # others may be running
  pilot, best = [], {}
  for m in study.PILOT.methods:
    setting, pos, n = chosen(rows, "pilot", m)
    best[m] = study.score(rows, "pilot", m, setting)  # the runner's pilot_family rule
    pilot.append([m, json.dumps(setting, sort_keys=True), pos, str(n), f"{100 * best[m]:.2f}"])
  hours = sum(r["seconds"] for r in used) / 3600
  lines = [
    "# The evidence study",
    "",
    "Written by `python -m experiments.study --report_only` (`--tasks=` a subset) from "
    f"`experiments/results/study_runs.csv` for the tasks {', '.join(f'`{t}`' for t in tasks)} "
    f"({len(used)} runs of these tasks and the pilot, {hours:.1f} CPU hours); do not edit.",
    "",
    PROTOCOL,
    "",
    f"NRS's noise family for the study: **{study.pilot_choice(best)}**, the better tuned "
    "validation score on the pilot task (mnist1d, another data seed; not in the tables):",
    "",
    markdown_table(["family", "chosen", "grid position", "tuning runs", "validation %"], pilot),
    "",
  ]
  tests, costs, cheap, summary = {}, {}, {}, {}
  for t in tasks:
    section = task_section(rows, t, quick)
    tests[t], cheap[t], costs[t] = section.test, section.cheap, section.costs
    summary[t] = section.summary
    lines += section.lines + [machines_line(rows, t), ""]
  image = [t for t in tasks if study.TASKS[t].kind == "image"]
  if image:
    reach = [m for m in study.NRS_FAMILY[1:] if all(cheap[t][m] for t in image)]
    lines += [
      f"## The cheaper NRS variants\n\nA variant at <= {CHEAP_COST} x SGD's step time and tied "
      f"with full NRS (+-1 pp) on every image task reported ({', '.join(image)}): "
      f"{', '.join(reach) or 'none'}.",
      "",
    ]
  if tests:
    png = os.path.join(os.path.dirname(path) or ".", "results", "study_cost_accuracy.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    plot(tests, costs, png)
    lines += [f"![cost and accuracy](results/{os.path.basename(png)})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  os.makedirs(os.path.dirname(summary_path(path)), exist_ok=True)
  with open(summary_path(path), "w") as f:
    json.dump({"tasks": summary}, f, indent=1)  # (in the report's order)
    f.write("\n")


def summary_path(report: str) -> str:
  """The machine-readable summary beside a report: ``<dir>/results/study_summary.json``."""
  return os.path.join(os.path.dirname(report) or ".", "results", "study_summary.json")
