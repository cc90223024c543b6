"""The study report's figures: cost against accuracy over tasks, and each task's sensitivity
of the validation value to every method's strength (from the tuning rows alone)."""

from __future__ import annotations

import json

import numpy as np

from experiments import study_spec as study

UNITS = {"bits_per_char": "bits per character, lower is better", "accuracy": "test accuracy, %"}


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def cost_accuracy(tests: dict, costs: dict, path: str) -> None:
  """One panel per task: each method's median test value and interquartile range against its
  step cost; a legend, not labels, names them (a colour and marker each; the subjects black)."""
  plt = _pyplot()
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


def strength_curve(rows: dict, task: str, method: str, chosen: dict) -> tuple[list, list, float]:
  """The tuning rows of ``method`` that share its chosen setting but for its strength: each
  strength value with its mean validation value over the tuning seeds, and the chosen one."""
  key = study.method_of(method, "absolute", study.task_of(task)).strength
  others = {k: v for k, v in chosen.items() if k != key}
  by: dict = {}
  for r in rows.values():
    if (r["task"], r["method"], r["phase"]) != (task, method, "tune"):
      continue
    setting = json.loads(r["setting"])
    if key in setting and {k: setting.get(k) for k in others} == others:
      by.setdefault(setting[key], []).append(r["val"])
  xs = sorted(by)
  return xs, [float(np.mean(by[x])) for x in xs], chosen.get(key, float("nan"))


def sensitivity(rows: dict, task: str, path: str) -> None:
  """One panel per method of ``task``: validation value against its strength (log scale)."""
  from experiments.study_report import chosen
  from experiments.study_report import ran_methods

  plt = _pyplot()
  methods = ran_methods(rows, task)
  scale = 1 if study.TASKS[task].metric == "bits_per_char" else 100
  ncol = min(4, len(methods))
  nrow = -(-len(methods) // ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
  for ax in axes.flat[len(methods) :]:
    ax.axis("off")
  for ax, m in zip(axes.flat, methods):
    xs, ys, best = strength_curve(rows, task, m, chosen(rows, task, m)[0])
    ax.plot(xs, [y * scale for y in ys], "o-", mfc="white", c="C0")
    ax.plot(
      [x for x in xs if x == best], [y * scale for x, y in zip(xs, ys) if x == best], "o", c="C0"
    )
    key = study.method_of(m, "absolute", study.TASKS[task]).strength
    ax.set(title=m, xscale="log", xlabel=key)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # (log minor labels overlap)
  axes[0, 0].set_ylabel("validation " + ("bits/char" if scale == 1 else "%"))
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
