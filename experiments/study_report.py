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

from experiments import study_plots
from experiments import study_spec as study
from experiments import study_stats as stats_
from experiments.tables import markdown_table

MARGIN = {"accuracy": 0.01, "bits_per_char": 0.01}  # the equivalence margins (1 pp, 0.01 bpc)
ALPHA, CHEAP_COST = stats_.ALPHA, 1.15
UNITS = study_plots.UNITS
TIE = {"bits_per_char": "+-0.01 bits per character", "accuracy": "+-1 pp"}
PROTOCOL = (
  "Protocol: the tuning and the runs were fixed before any result; the statistics were revised "
  "after them (exact tests on rounded differences, robustness checks, within-method flatness), "
  "which changed no run. Tuning: the weight-decay methods (sgd and sgd_2x, or adamw) "
  "tune learning rate x weight decay; every other method tunes learning rate x its own strength at "
  "the first one's weight decay (on the transformers at AdamW's learning rate x 0.5, 1, 2); each "
  "ablation retunes the radius at NRS's chosen learning rate and weight decay. A setting scores its "
  "mean validation value over the 2 tuning seeds; a choice at an edge extends that axis, up to "
  f"{study.MAX_EXTENSIONS} times. Final seeds are disjoint from the tuning seeds and shared by every "
  "method, so NRS - method pairs by seed: positive means NRS ahead in accuracy, negative means NRS "
  "ahead in bits per character. Paired differences are rounded to the metric's resolution (1/N "
  "for accuracy over N test examples) before any test. Primary test: the exact two-sided "
  "sign-flip permutation test on the Wilcoxon signed-rank statistic (all 2^n sign patterns; zero "
  "differences dropped, tied magnitudes at their average rank), Holm-corrected over the task's "
  "comparisons (p < 0.05); where a comparison's seeds ran on different machine kinds, "
  "Mann-Whitney and a Welch TOST instead (unpaired). Effect sizes: paired 95% t-intervals. A tie "
  "is claimed only where two one-sided paired t-tests at +-1 pp (+-0.01 bits per character), "
  "Holm-corrected, pass; a tie whose 90% interval excludes zero reads 'equivalent, difference x "
  "detected'. Otherwise the verdict is inconclusive, with the minimum detectable difference of the "
  "exact test at its Holm level (simulated, 80% power). Each ahead, behind or tie is robust when "
  "it also holds under the other test (the paired t-test for ahead and behind, the exact "
  "signed-rank TOST for a tie) and with any one seed left out; otherwise fragile, and the report "
  f"says what breaks it. Fewer than {stats_.MIN_PAIRS} pairs: too few pairs, no p-value. A diverged "
  "run (a non-finite loss, or validation at chance) counts at chance (1/C, 8 bits per character) "
  "in the test value, its measures are left out, and each method's are counted in their own "
  "column. On the semi-supervised tasks (10% of the training labels kept) the pairs are "
  "nrs_unlabeled - method, and nrs_unlabeled, vat and pi_model weigh their consistency term 1 and "
  "tune its strength."
)


def ci95(xs) -> tuple[float, float, float]:
  """Mean and the 95% t-interval of the mean."""
  return stats_.ci(xs)


class Comparison(NamedTuple):
  """``ref - method`` on one task: the mean difference and its 95% interval; the primary
  test's Holm p (the exact signed-rank test, or Mann-Whitney where the pairs straddle machine
  kinds) and TOST's Holm p; the verdict; how it was tested; whether it survives the other
  test and the loss of any one seed; the MDD of an inconclusive one."""

  mean: float
  lo: float
  hi: float
  p: float
  tie_p: float
  verdict: str  # "<ref> ahead", "<ref> behind", "tie", "inconclusive" or "too few pairs"
  paired: bool
  detected: bool  # a tie whose 90% interval excludes zero: a difference, within the margin
  robust: bool | None  # None: nothing claimed (inconclusive, too few pairs)
  fragile: str  # what breaks a fragile verdict
  mdd: float


def _family(test, ref, others, metric, step, unpaired) -> dict:
  """The primary verdicts of one Holm family: ``m -> (verdict, p, tie_p, raw p)``."""
  raw_p, raw_e = [], []
  for m in others:
    if unpaired[m]:
      raw_p.append(float(stats.mannwhitneyu(test[ref], test[m]).pvalue))
      raw_e.append(stats_.unpaired_tost(test[ref], test[m], MARGIN[metric]))
    else:
      d = stats_.differences(test[ref], test[m], step)
      raw_p.append(stats_.signed_rank_exact(d))
      raw_e.append(stats_.tost(d, MARGIN[metric]))
  w, e = stats_.holm(raw_p), stats_.holm(raw_e)
  out = {}
  for i, m in enumerate(others):
    ahead = (np.mean(test[ref]) - np.mean(test[m]) > 0) == (metric == "accuracy")
    verdict = "tie" if e[i] < ALPHA else "inconclusive"
    verdict = f"{ref} {'ahead' if ahead else 'behind'}" if w[i] < ALPHA else verdict
    out[m] = (verdict, w[i], e[i], raw_p)
  return out


def _other_test(test, ref, diffs, metric, unpaired) -> dict:
  """Whether each verdict also holds under the other test: an ahead or behind under the
  (paired, or Welch) t-test, a tie under the exact (sign-flip) TOST; Holm over the family
  (``diffs``: method -> rounded ``ref - method``)."""
  t_p, eq_p = [], []
  for m, d in diffs.items():
    if unpaired[m]:
      t_p.append(float(stats.ttest_ind(test[ref], test[m], equal_var=False).pvalue))
    else:
      t_p.append(stats_.t_test(d))
    eq_p.append(stats_.exact_tost(d, MARGIN[metric]))
  return dict(zip(diffs, zip(stats_.holm(t_p), stats_.holm(eq_p))))


def compare(
  test: dict, ref: str, others: list, metric: str, kinds: dict | None = None, seeds=None
) -> dict:
  """``ref - m`` for each of ``others`` (:class:`Comparison`), Holm over ``others``: test
  values rounded to the metric's resolution; pairs whose seeds ran on different machine kinds
  (``kinds``: method -> kind per seed) compared unpaired; each verdict checked under the
  other test and with each seed left out."""
  n = len(test[ref])
  step = stats_.resolution([v for m in (ref, *others) for v in test[m]])
  kinds = kinds or {}
  unpaired = {m: kinds.get(m, [None] * n) != kinds.get(ref, [None] * n) for m in others}
  if n < stats_.MIN_PAIRS:
    nan = math.nan
    return {
      m: Comparison(nan, nan, nan, nan, nan, "too few pairs", True, False, None, "", nan)
      for m in others
    }
  diffs = {m: stats_.differences(test[ref], test[m], step) for m in others}
  primary = _family(test, ref, others, metric, step, unpaired)
  other = _other_test(test, ref, diffs, metric, unpaired)
  drops = [
    _family({m: np.delete(test[m], s) for m in test}, ref, others, metric, step, unpaired)
    for s in range(n)
  ]
  out, names = {}, seeds or list(range(n))
  for i, m in enumerate(others):
    verdict, w, e, raw_p = primary[m]
    d = diffs[m]
    mean, lo, hi = stats_.ci(d)
    _, lo90, hi90 = stats_.ci(d, 0.90)
    robust, fragile, dd = None, "", math.nan
    if verdict == "inconclusive":
      dd = _mdd(test[ref], test[m], d, stats_.holm_level(raw_p, i), unpaired[m])
    else:
      t_ok = other[m][1] < ALPHA if verdict == "tie" else other[m][0] < ALPHA
      lost = [names[s] for s in range(n) if drops[s][m][0] != verdict]
      many = f", {len(lost)} of {n} seeds" if len(lost) > 1 else ""
      fragile = "; ".join(
        ([] if t_ok else ["not under the other test"])
        + ([f"not without seed {lost[0]}{many}"] if lost else [])
      )
      robust = not fragile
    detected = verdict == "tie" and (lo90 > 0 or hi90 < 0)
    out[m] = Comparison(mean, lo, hi, w, e, verdict, not unpaired[m], detected, robust, fragile, dd)
  return out


def _p_text(c: Comparison) -> str:
  return "" if math.isnan(c.p) else f"{c.p:.3g}"


def verdict_text(c: Comparison, f, tie: str) -> str:
  """The verdict as the report prints it: robust or fragile (and what breaks it), an
  equivalence with a detected difference, an inconclusive one's MDD."""
  if c.verdict == "inconclusive":
    return f"inconclusive (MDD {f(c.mdd)})"
  if c.robust is None:
    return c.verdict
  text = f"equivalent at {tie}, difference {f(c.mean)} detected" if c.detected else c.verdict
  return f"{text}, robust" if c.robust else f"{text}, fragile ({c.fragile})"


def _mdd(a, b, d, level: float, unpaired: bool) -> float:
  """The minimum detectable difference of the primary test at ``level`` (80% power)."""
  if not unpaired:
    return stats_.mdd(d, level)
  se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
  return float((stats.norm.ppf(1 - level / 2) + stats.norm.ppf(stats_.POWER)) * se)


def step_costs(report: str) -> dict:
  """The side-by-side step timings beside a report (``<dir>/results/study_step_costs.json``,
  the runner's): each task's methods timed together, again whenever a method joins it."""
  path = os.path.join(os.path.dirname(report) or ".", "results", "study_step_costs.json")
  return json.load(open(path)) if os.path.exists(path) else {}


def ran_methods(rows: dict, t: str) -> list:
  """The task's methods (declared order) that have final rows; the others have not run yet
  (declared later, or re-run with their old rows gone) and the report names them so."""
  return [m for m in study.TASKS[t].methods if m == study.TASKS[t].subject or finals(rows, t, m)]


def check(rows: dict, tasks: list, quick: bool) -> None:
  """Raises unless every row names a known task and method and every task in ``tasks`` has
  all the final runs of its subject and of each method that has any (a partial table is
  never written silently; a method with none is reported as not run yet)."""
  for r in rows.values():
    names = study.task_of(r["task"]).methods if r["task"] in (*study.TASKS, "pilot") else ()
    if r["task"] in study.REUSE_PILOTS:
      names = study.REUSE_PILOT_METHODS
    if r["method"] not in (*names, *(study.ABLATIONS if r["task"] == study.ABLATION_TASK else ())):
      raise ValueError(
        f"records: task {r['task']!r} with method {r['method']!r} is not in the study's lists."
      )
  for t in tasks:
    task = study.TASKS[t]
    need = {m: study.final_seeds(task, quick) for m in ran_methods(rows, t)}
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


def cost_lines(fin, names, seeds, base, costs) -> list:
  """Step cost against the median CPU seconds per final run, each over the base method's;
  where the two differ by more than 15% (after the run's epochs), the fixed part of a run
  (compiling, evaluating, measuring), fitted over the methods, is what the step leaves out;
  so is the speed of another machine, where a method's final runs were made on one."""
  sec = {m: float(np.median([fin[m][s]["seconds"] for s in seeds])) for m in names}
  work = {m: costs[m] * study.method_of(m, "absolute").epochs for m in names}
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


def meets_goal(cost: float, c: Comparison) -> bool:
  """Issue 52's goal for a cheaper variant against full NRS: at most ``CHEAP_COST`` base
  steps, and a tie that is robust (it survives the other test and the loss of any one seed)
  with no difference detected (an equivalence that sees a difference within the margin is not
  a tie the README may claim)."""
  return cost <= CHEAP_COST and c.verdict == "tie" and bool(c.robust) and not c.detected


def looksam_lines(test, cheap: list, task, kinds, seeds) -> list:
  """Issue 52's goal, second half: each variant that met the goal against ``looksam`` (SAM's
  counterpart at a comparable cost), its own Holm family; or where none met it, so."""
  if "looksam" not in test:
    return []
  if not cheap:
    return ["No NRS variant met the goal here, so none is compared with looksam.", ""]
  cmp = compare(test, "looksam", cheap, task.metric, kinds, seeds)
  f, ci = _fmt(task.metric)
  said = "; ".join(
    f"looksam - {m} {ci((c.mean, c.lo, c.hi))}, {verdict_text(c, f, TIE[task.metric])}"
    for m, c in cmp.items()
  )
  return [f"The variants that met it against looksam (Holm over them): {said}.", ""]


def vat_nrs_lines(test, task, kinds, seeds) -> list:
  """Issue 51's question on the semi-supervised tasks: does NRS's penalty add to VAT?
  ``vat_nrs - vat``, paired by seed, a family of one."""
  if not {"vat", "vat_nrs"} <= set(test):
    return []
  c = compare(test, "vat_nrs", ["vat"], task.metric, kinds, seeds)["vat"]
  f, ci = _fmt(task.metric)
  said = f"vat_nrs - vat {ci((c.mean, c.lo, c.hi))}, p {_p_text(c)}: "
  said += verdict_text(c, f, TIE[task.metric])
  return [f"Does NRS's penalty add to VAT (at VAT's chosen setting, the radius tuned)? {said}.", ""]


class TaskReport(NamedTuple):
  lines: list  # the task's markdown
  test: dict  # method -> per-seed test values
  cheap: dict  # cheap variant -> whether it meets the goal
  costs: dict  # method -> step cost
  summary: dict  # the machine-readable summary (study_summary.json) the README renders


def task_section(rows, t, quick, path="") -> TaskReport:
  """The task's section of the report, with what the rest of the report and the summary
  read from it."""
  task = study.TASKS[t]
  seeds = study.final_seeds(task, quick)
  ran = ran_methods(rows, t)
  fin = {m: finals(rows, t, m) for m in ran}
  timed = step_costs(path).get(t, {})  # the latest side-by-side timing; else the rows' own
  costs = {m: timed.get(m, fin[m][seeds[0]]["step_cost"]) for m in ran}
  test = {m: [fin[m][s]["test"] for s in seeds] for m in ran}
  f, ci = _fmt(task.metric)
  ref = task.subject
  others = [m for m in ran if m != ref]
  kinds = {m: [study.machine_kind(fin[m][s]["machine"]) for s in seeds] for m in ran}
  cmp = compare(test, ref, others, task.metric, kinds, seeds)
  body, edges, methods = [], [], {}
  for m in ran:
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
      c = cmp[m]
      methods[m].update(diff_ci=ci((c.mean, c.lo, c.hi)), holm_p=c.p, verdict=c.verdict)
      methods[m].update(robust=c.robust, fragile=c.fragile, paired=c.paired)
      methods[m].update(detected=c.detected, mdd=f(c.mdd) if math.isfinite(c.mdd) else None)
      row += [ci((c.mean, c.lo, c.hi)), _p_text(c), verdict_text(c, f, TIE[task.metric])]
    body.append(row)
  head = ["method", "passes", "step cost", "chosen", "grid position", "tuning runs"]
  head += [f"mean [95% CI] ({UNITS[task.metric]})", "diverged", f"{ref} - method [95% CI]"]
  head += ["Holm p", "verdict"]
  lines = [f"## {t}", "", markdown_table(head, body), ""]
  old = [m for m in study.OLD_IMPLEMENTATION.get(t, ()) if m in ran]
  if old:
    what = "; ".join(f"{m} (now {study.RERUN[m]})" for m in old)
    lines += [
      f"Rows of the implementation before issue 51's changes, not re-run yet here: {what}.",
      "",
    ]
  pending = [m for m in task.methods if m not in ran]
  if pending:
    lines += [
      f"Declared, not run yet on this task (no final runs recorded): {', '.join(pending)}.",
      "",
    ]
  if not all(c.paired for c in cmp.values()):
    straddle = ", ".join(m for m, c in cmp.items() if not c.paired)
    lines += [
      f"Unpaired (Mann-Whitney, Welch TOST): {straddle}, whose final runs ran on other machine "
      f"kinds than {ref}'s for some seeds (a run moves across kinds; docs: evidence).",
      "",
    ]
  at_edge = ", ".join(edges) or "none"
  lines += [f"Still at an edge of its grid after the extensions: {at_edge}.", ""]
  lines += cost_lines(fin, ran, seeds, ran[0], costs) + [""]
  # the variants against full NRS: the table's own verdicts (one Holm family per task)
  variants = [m for m in (*study.NRS_FAMILY[1:], *study.NRS_LOOK, "nrs_rademacher") if m in ran]
  variants = variants if ref == "nrs" else []
  cheap = {m: meets_goal(costs[m], cmp[m]) for m in variants}
  goal = f"goal: step cost <= {CHEAP_COST} x, a robust tie at {TIE[task.metric]}, no difference"
  said = "; ".join(
    f"{m} step {costs[m]:.2f}, {verdict_text(cmp[m], f, TIE[task.metric])}" for m in variants
  )
  lines += [f"Cheaper NRS variants against full NRS ({goal}): {said}.", ""] if variants else []
  lines += looksam_lines(test, [m for m in variants if cheap[m]], task, kinds, seeds)
  lines += vat_nrs_lines(test, task, kinds, seeds)
  measured, flat = measures_section(rows, t, fin, seeds, test)
  lines += measured
  if t == study.ABLATION_TASK:
    lines += ablation_section(rows, t, quick)
  summary = {"kind": task.kind, "metric": task.metric, "unit": UNITS[task.metric]}
  summary.update(subject=ref, head=head, rows=body, methods=methods, edges=edges, flatness=flat)
  return TaskReport(lines, test, cheap, costs, summary)


NORMALISED = {"lambda_max x |w|^2": "lambda_max", "hessian_trace x |w|^2": "hessian_trace"}


def _measure_values(fin, methods, seeds) -> tuple[dict, list, list]:
  """Each (method, measure) per seed, NaN for a diverged run (its measures describe no
  trained solution), with the weight-norm-normalised views; the diverged and failed runs."""
  nan = math.nan
  val, diverged = {}, []
  for m in methods:
    for s in seeds:
      if fin[m][s]["diverged"]:
        diverged.append(f"{m}/seed {s}")
  for m in methods:
    for k in study.MEASURES:
      val[m, k] = [nan if fin[m][s]["diverged"] else fin[m][s][k] for s in seeds]
    for view, k in NORMALISED.items():
      val[m, view] = [v * w**2 for v, w in zip(val[m, k], val[m, "weight_norm"])]
  failed = [
    f"{m}/seed {s}: {k}"
    for m in methods
    for i, s in enumerate(seeds)
    for k in study.MEASURES
    if not fin[m][s]["diverged"] and not math.isfinite(fin[m][s][k])
  ]
  return val, diverged, sorted(failed)


def measures_section(rows, t, fin, seeds, test) -> tuple[list, dict]:
  """Per measure: each method's mean [95% CI], NRS - method (exact signed-rank, Holm), and
  Kendall's tau against the test value, within methods (stratified: the answer) and pooled
  over methods (between methods); then the task's plain answers."""
  methods, ref = list(fin), study.TASKS[t].subject
  val, diverged, failed = _measure_values(fin, methods, seeds)
  body, signs = [], {}
  for k in [*study.MEASURES, *NORMALISED]:
    ok = [i for i in range(len(seeds)) if all(math.isfinite(val[m, k][i]) for m in methods)]
    row = [k]
    for m in methods:
      row.append("{:.3g} [{:.3g}, {:.3g}]".format(*ci95([val[m, k][i] for i in ok])) if ok else "")
    others = [m for m in methods if m != ref]
    ps = stats_.holm(
      [stats_.signed_rank_exact([val[ref, k][i] - val[m, k][i] for i in ok]) for m in others]
    )
    for m, p in zip(others, ps):
      mean = float(np.mean([val[ref, k][i] - val[m, k][i] for i in ok])) if ok else math.nan
      signs[k, m] = (mean, p)
    signs[k, "tau"] = stats_.stratified_kendall([(val[m, k], test[m]) for m in methods])
    x = [val[m, k][i] for m in methods for i in range(len(seeds))]
    y = [test[m][i] for m in methods for i in range(len(seeds))]
    keep = [j for j in range(len(x)) if math.isfinite(x[j])]
    tau, p_tau = stats.kendalltau([x[j] for j in keep], [y[j] for j in keep])
    signs[k, "tau_pooled"] = (float(tau), float(p_tau))
    cmp = ", ".join(f"{m} {signs[k, m][0]:+.3g} (p {signs[k, m][1]:.2g})" for m in others)
    within = "{:+.2f} (p {:.2g})".format(*signs[k, "tau"])
    body.append(row + [cmp, within, f"{tau:+.2f} (p {p_tau:.2g})"])
  head = ["measure", *methods, f"{ref} - method (exact signed-rank, Holm p)"]
  head += ["Kendall tau with test, within methods", "pooled (between methods)"]
  lines = [f"### Flatness and calibration of the final solutions ({t})", ""]
  lines += [markdown_table(head, body), ""]
  lines += [_measures_explained(rows, t), ""]
  if diverged:
    lines += [f"Diverged runs, whose measures are left out: {', '.join(diverged)}.", ""]
  if failed:
    lines += [f"Measures that failed (NaN, left out of the pair): {'; '.join(failed)}.", ""]
  flat = flatness_words(signs, methods[0], study.TASKS[t].metric)
  return lines + [flatness_answer(flat, methods[0], ref, study.TASKS[t].metric), ""], flat


def _measures_explained(rows, t) -> str:
  """Which measure is NRS's own objective, and at which radius each sharpness was taken."""
  from experiments import measures

  s = measures.SETTINGS
  nrs = chosen(rows, t, "nrs")[0] if "nrs" in study.TASKS[t].methods else {}
  sam = chosen(rows, t, "sam")[0].get("sam.rho")
  own = f"NRS's chosen radius on this task is {nrs['nrs.radius']:g}" if nrs else "NRS is not run"
  return (
    f"neighborhood_kl is NRS's own objective: the KL to neighbours at radius {s['radius']:g} "
    f"(absolute Gaussian noise, {s['draws']} draws) on the test inputs ({own}); sharpness is "
    f"SAM's ascent step at rho {s['rho']:g}, while SAM trained at rho {sam:g}. The "
    "|w|^2 rows scale lambda_max and the trace by the squared weight norm (a rescaling of the "
    "weights that leaves the function unchanged moves the raw ones)."
  )


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
  pooled, pooled_p = signs.get(("lambda_max", "tau_pooled"), (math.nan, math.nan))
  return {
    "vs_base": word(base),
    "vs_sam": word("sam"),
    "tau": tau,
    "tau_p": p,
    "predicts": predicts if p < ALPHA else "not shown",
    "tau_pooled": pooled,
    "tau_pooled_p": pooled_p,
  }


def flatness_answer(flat: dict, base: str, ref: str = "nrs", metric: str = "accuracy") -> str:
  """The report's sentence of :func:`flatness_words`."""
  what = "test accuracy" if metric == "accuracy" else "test bits per character"
  return (
    f"Does {ref} find flatter minima (lower lambda_max and trace, Holm p < 0.05) than {base}: "
    f"{flat['vs_base']}; than sam: {flat['vs_sam']}. "
    f"Does flatness predict accuracy within a method here (Kendall tau of lambda_max with {what}, "
    f"stratified by method, p < 0.05): {flat['predicts']} (tau {flat['tau']:+.2f}, p "
    f"{flat['tau_p']:.2g}; pooled between methods {flat['tau_pooled']:+.2f}, p "
    f"{flat['tau_pooled_p']:.2g})."
  )


def ablation_section(rows, t, quick) -> list:
  task = study.TASKS[t]
  seeds = study.final_seeds(task, quick, ablation=True)
  names = ["nrs", *study.ABLATIONS]
  test = {m: [finals(rows, t, m)[s]["test"] for s in seeds] for m in names}
  fin = {m: finals(rows, t, m) for m in names}
  kinds = {m: [study.machine_kind(fin[m][s]["machine"]) for s in seeds] for m in names}
  cmp = compare(test, "nrs", list(study.ABLATIONS), task.metric, kinds, seeds)
  f, ci = _fmt(task.metric)
  body = []
  for a in study.ABLATIONS:
    setting, pos, _ = chosen(rows, t, a)
    c = cmp[a]
    c = c._replace(mean=-c.mean, lo=-c.hi, hi=-c.lo)  # ablation - nrs
    verdict = verdict_text(c, f, TIE[task.metric])
    verdict = verdict.replace("nrs ahead", "ablation behind").replace(
      "nrs behind", "ablation ahead"
    )
    row = [a, json.dumps(study.ABLATIONS[a]), str(setting.get("nrs.radius")), pos]
    body.append(row + [ci(ci95(test[a])), ci((c.mean, c.lo, c.hi)), _p_text(c), verdict])
  head = ["ablation", "changed from nrs", "radius (retuned)", "grid position", "mean [95% CI]"]
  head += ["ablation - nrs [95% CI]", "Holm p", "verdict"]
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


def reuse_pilot_section(rows: dict) -> list:
  """The reuse pilot's table and the configurations its rule chose (issue 52); nothing until
  every pilot run is in."""
  table = study.reuse_pilot_table(rows)
  if set(table) != set(study.REUSE_PILOT_METHODS):
    return []
  names = list(study.REUSE_PILOTS)
  head = ["method", "passes"]
  for t in names:
    head += [f"{t} val %", "test %", "diverged"]
  body = []
  for m, cells in table.items():
    row = [m, f"{study.method_of(m, 'absolute').passes:.3g}"]
    for t in names:
      v, te, d = cells[t]
      row += [f"{100 * v:.2f}", f"{100 * te:.2f}", f"{d}/{len(study.REUSE_PILOT_SEEDS)}"]
    body.append(row)
  nrs_div = [f"{t} {table['nrs'][t][2]} of {len(study.REUSE_PILOT_SEEDS)}" for t in names]
  chosen_ = study.reuse_choice(rows)
  settings = "; ".join(
    f"{t}: {json.dumps(st, sort_keys=True)}" for t, (_, st) in study.REUSE_PILOTS.items()
  )
  return [
    "## The reuse pilot",
    "",
    "NRS's penalty gradient computed on a refresh step and reused on the k - 1 steps between "
    "(`add_nrs_gradient(reuse=...)`), each candidate rule at NRS's chosen setting of the clean "
    f"mnist1d tasks ({settings}), on the pilot's data (another data seed) with the MLP and "
    f"the 1-D CNN, seeds {list(study.REUSE_PILOT_SEEDS)}; validation decides, test shown. "
    "`nrs_rademacher` is full NRS with the cheaper draw. The rule: a candidate that diverged "
    "on any pilot seed is out; of the rest, the best mean validation value over both models, "
    "and the cheapest within 0.5 pp of it.",
    "",
    markdown_table(head, body),
    "",
    f"Full NRS diverged on {', '.join(nrs_div)} seeds at this setting (a diverged seed counts "
    "at chance in the means). Passes: a refresh's beyond the task pass, over k (the transform "
    "recomputes a differentiable centre: two; a fixed centre shares the task pass: one).",
    "",
    f"Chosen by the rule: {', '.join(chosen_) or 'none'}; declared for the study as "
    f"{', '.join(f'{k} = {v}' for k, v in study.NRS_LOOK.items()) or 'none'}.",
    "",
  ]


def write(rows: dict, tasks: list, path: str, quick: bool = False) -> None:
  """The report of ``tasks``; its header names them (not the command's spelling), so the
  report reproduces whichever way the same tasks were asked for."""
  tasks = [t for t in tasks if t != "pilot"]
  check(rows, tasks, quick)
  # (the others may be running)
  used = [r for r in rows.values() if r["task"] in (*tasks, "pilot", *study.REUSE_PILOTS)]
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
    f"({len(used)} runs of these tasks and the pilots, {hours:.1f} CPU hours); do not edit.",
    "",
    PROTOCOL,
    "",
    f"NRS's noise family for the study: **{study.pilot_choice(best)}**, the better tuned "
    "validation score on the pilot task (mnist1d, another data seed; not in the tables):",
    "",
    markdown_table(["family", "chosen", "grid position", "tuning runs", "validation %"], pilot),
    "",
    *reuse_pilot_section(rows),
  ]
  tests, costs, cheap, summary = {}, {}, {}, {}
  for t in tasks:
    section = task_section(rows, t, quick, path)
    tests[t], cheap[t], costs[t] = section.test, section.cheap, section.costs
    summary[t] = section.summary
    lines += section.lines + [machines_line(rows, t), ""]
    png = os.path.join(os.path.dirname(path) or ".", "results", f"sensitivity_{t}.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    study_plots.sensitivity(rows, t, png)
    lines += [
      f"How carefully each strength must be tuned ({t}): the mean validation value over "
      "the tuning seeds against the method's strength, at its chosen learning rate and "
      "weight decay (the chosen value filled).",
      "",
      f"![sensitivity of {t}](results/{os.path.basename(png)})",
      "",
    ]
  image = [t for t in tasks if study.TASKS[t].kind == "image"]
  if image:
    reach = [m for m in study.NRS_FAMILY[1:] if all(cheap[t][m] for t in image)]
    lines += [
      f"## The cheaper NRS variants\n\nA variant at <= {CHEAP_COST} x SGD's step time and tied "
      f"with full NRS (+-1 pp, robust, no difference detected) on every image task reported "
      f"({', '.join(image)}): "
      f"{', '.join(reach) or 'none'}.",
      "",
    ]
  if tests:
    png = os.path.join(os.path.dirname(path) or ".", "results", "study_cost_accuracy.png")
    os.makedirs(os.path.dirname(png), exist_ok=True)
    study_plots.cost_accuracy(tests, costs, png)
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
