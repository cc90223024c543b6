"""The evidence study's statistics, figures and markdown report (the runner is study.py).

Everything here reads finished runs' metrics; nothing trains.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np


def ci95(xs):
  from scipy import stats

  xs = np.asarray(xs, float)
  if len(xs) < 2:
    return float(xs.mean()), 0.0, float("nan")
  half = stats.t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / np.sqrt(len(xs))
  return float(xs.mean()), float(xs.std(ddof=1)), float(half)


def diff_ci(a, b):
  """Welch 95% CI of mean(a) - mean(b)."""
  from scipy import stats

  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  d = a.mean() - b.mean()
  se = np.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else 1
  half = stats.t.ppf(0.975, dof) * se
  return float(d), float(d - half), float(d + half)


def lambda_at_loss(rows, level):
  """log-log interpolation of the top eigenvalue at a training loss level."""
  pts = [(r["train_loss"], r["hessian/lambda_max"]) for r in rows if "hessian/lambda_max" in r]
  pts = sorted(pts)
  if not pts or not (pts[0][0] <= level <= pts[-1][0]):
    return float("nan")
  ls, lam = np.log([p[0] for p in pts]), np.log(np.maximum([p[1] for p in pts], 1e-12))
  return float(np.exp(np.interp(np.log(level), ls, lam)))


def plots(results, outdir):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(outdir, exist_ok=True)
  paths = []
  for tname, r in results.items():
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, runs in r["runs"].items():
      acc = [x[-1]["test_accuracy"] for x in runs]
      mean, _, half = ci95(acc)
      axes[0].errorbar([m], [mean], yerr=[0 if np.isnan(half) else half], fmt="o", capsize=4)
      pts = sorted(
        (row["train_loss"], row["hessian/lambda_max"])
        for x in runs
        for row in x
        if "hessian/lambda_max" in row
      )
      if pts:
        axes[1].plot(*zip(*pts), "o", alpha=0.5, label=m)
    axes[0].set(ylabel="test accuracy (mean, 95% CI)", title=tname)
    axes[1].set(
      xlabel="training loss",
      ylabel="top Hessian eigenvalue",
      xscale="log",
      yscale="log",
      title="flatness at matched loss",
    )
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, f"{tname}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)
  return paths


def report(results, abl, seconds, path, command, reading=None):
  import jax

  lines = ["# NRS evidence study", ""]
  lines += [
    f"Regenerate: `{command}` ({seconds / 60:.1f} min on this machine: {os.cpu_count()} CPU cores, "
    f"{platform.platform()}, jax {jax.__version__}, backend {jax.default_backend()}).",
    "",
    "Protocol: each method gets the same number of tuning runs (one seed) on a validation split "
    "carved from the training set; the best setting by validation accuracy then runs with every "
    "seed; test accuracy is read once at the end. `sgd_2x` is SGD with twice the epochs: the pass "
    "budget of NRS with K=1 (two forward/backward passes per step). Mean +- std and the 95% "
    "confidence interval (t distribution) over seeds. Flatness: the top Hessian eigenvalue "
    "(Lanczos) and trace (Hutchinson) of the training loss on 1024 training examples, at the end and "
    "interpolated at a training loss that every method reaches (matched loss).",
    "",
  ]
  figdir = os.path.join(os.path.dirname(path), "results")
  plots(results, figdir)
  for tname, r in results.items():
    lines += [f"## {tname}", "", f"Chosen on validation: {json.dumps(r['chosen'])}", ""]
    lines += [
      "| method | test acc (mean +- std) | 95% CI | final lambda_max | final trace | lambda_max at matched loss | train loss |",
      "|---|---|---|---|---|---|---|",
    ]
    finals = {m: [x[-1] for x in runs] for m, runs in r["runs"].items()}
    level = max(min(row["train_loss"] for x in runs for row in x) for runs in r["runs"].values())
    for m, recs in finals.items():
      mean, std, half = ci95([x["test_accuracy"] for x in recs])
      lam = np.mean([x.get("hessian/lambda_max", np.nan) for x in recs])
      tr = np.mean([x.get("hessian/trace", np.nan) for x in recs])
      lam_m = np.nanmean([lambda_at_loss(x, level) for x in r["runs"][m]])
      tl = np.mean([x["train_loss"] for x in recs])
      lines.append(
        f"| {m} | {100 * mean:.2f} +- {100 * std:.2f} | [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}] "
        f"| {lam:.3g} | {tr:.3g} | {lam_m:.3g} | {tl:.3g} |"
      )
    lines += ["", f"Matched training loss level: {level:.3g}.", ""]
    nrs = [x["test_accuracy"] for x in finals["nrs"]]
    for other in ("sgd", "sgd_2x", "sam", "rwp"):
      d, lo, hi = diff_ci(nrs, [x["test_accuracy"] for x in finals[other]])
      verdict = "NRS better" if lo > 0 else ("NRS worse" if hi < 0 else "no significant difference")
      lines.append(
        f"- NRS - {other}: {100 * d:+.2f} pp, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]: {verdict}."
      )
    lines += ["", f"![{tname}](results/{tname}.png)", ""]
  if abl:
    lines += ["## NRS ablations (mnist1d MLP, other settings as the default config)", ""]
    for name, rows in abl.items():
      lines += [
        f"### {name}",
        "",
        "| variant | test acc | 95% CI | val acc | lambda_max | train loss |",
        "|---|---|---|---|---|---|",
      ]
      for ov, recs in rows:
        te, _, half = ci95([100 * x["test_accuracy"] for x in recs])
        ci = "" if np.isnan(half) else f"[{te - half:.2f}, {te + half:.2f}]"
        va = np.mean([x["val_accuracy"] for x in recs])
        lam = np.mean([x.get("hessian/lambda_max", np.nan) for x in recs])
        tl = np.mean([x["train_loss"] for x in recs])
        lines.append(
          f"| {json.dumps(ov)} | {te:.2f} | {ci} | {100 * va:.2f} | {lam:.3g} | {tl:.3g} |"
        )
      lines.append("")
    lines.append(
      f"Ablations use {len(next(iter(abl.values()))[0][1])} seeds each. The variants were not "
      "tuned on validation: read a variant that beats the default as a lead for a tuned "
      "follow-up, not as a result."
    )
  _write(path, lines, reading, blank_before_reading=True)


def _write(path, lines, reading=None, blank_before_reading=False):
  """Writes a report's lines, then the hand-written reading (a markdown file) if given."""
  if reading and os.path.exists(reading):
    with open(reading) as f:
      lines = [*lines, *([""] if blank_before_reading else []), f.read().rstrip()]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _edge(grid: list, chosen: dict) -> str:
  """Where the chosen setting sits among the grid's settings of the same kind.

  Settings of the same kind have the same keys and the same non-numeric values
  (e.g. NRS's absolute and filter-scaled radii are two kinds): 'low edge' or
  'high edge' when the chosen one is the first or last of its kind.
  """
  kind = [
    g
    for g in grid
    if set(g) == set(chosen)
    and all(g[k] == chosen[k] for k in g if not isinstance(g[k], (int, float)))
  ]
  i = kind.index(chosen)
  return "low edge" if i == 0 else ("high edge" if i == len(kind) - 1 else "interior")


def diverged(record: dict, num_classes: int = 10) -> bool:
  """A run that ended at chance accuracy (or with a non-finite loss) has diverged."""
  loss = record.get("train_loss", float("nan"))
  return not np.isfinite(loss) or record["test_accuracy"] < 2.0 / num_classes


def collapsed(task_name: str, record: dict) -> bool:
  """Diverged: a non-finite loss (every task) or, on the classification tasks, chance accuracy."""
  if task_name == "stdlib_lm":
    return not np.isfinite(record.get("test_loss", np.nan))
  return diverged(record)


def cost_report(results, costs, seconds, path, command, passes, grids, reading=None):
  """RESULTS_COST.md: accuracy against measured step cost, per task, with a plot."""
  import jax
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lines = ["# NRS cost-accuracy study", ""]
  lines += [
    f"Regenerate: `{command}` ({seconds / 60:.1f} min on this machine: {os.cpu_count()} CPU "
    f"cores, {platform.platform()}, jax {jax.__version__}).",
    "",
    "Protocol: every method gets the same number of tuning runs (6 settings, one seed) on a "
    "validation split carved from the training set; the setting with the best validation "
    "accuracy then runs with every seed, and test accuracy is read once at the end. All "
    "methods share the base recipe of the task (SGD with momentum, learning rate 0.2 cosine, "
    "weight decay 5e-4, batch 128); SGD tunes its learning rate, the others their own "
    "parameter (NRS: the radius of absolute Gaussian noise, and one filter-scaled setting). "
    "A run that ends at chance accuracy (test accuracy < 2/10) or with a non-finite loss is "
    "reported as diverged and left out of the mean. Cost: each method's step time over SGD's, "
    "measured side by side in one process on this CPU (`measure_step_costs`; randomized "
    "methods as p expensive + (1 - p) plain steps), and the forward/backward passes per step.",
    "",
  ]
  figdir = os.path.join(os.path.dirname(path) or ".", "results")
  os.makedirs(figdir, exist_ok=True)
  for tname, r in results.items():
    lines += [f"## {tname}", ""]
    lines += [
      "| method | passes / step | step time x SGD | chosen (validation) | grid position "
      "| test acc (mean +- std) | 95% CI | diverged seeds |",
      "|---|---|---|---|---|---|---|---|",
    ]
    points = []
    for m, recs in r["runs"].items():
      ok = [x["test_accuracy"] for x in recs if not diverged(x)]
      n_div = len(recs) - len(ok)
      mean, std, half = ci95(ok) if ok else (float("nan"), float("nan"), float("nan"))
      ci = "" if np.isnan(half) else f"[{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"
      cost = costs.get(tname, {}).get(m, float("nan"))
      chosen = r["chosen"][m]
      lines.append(
        f"| {m} | {passes[m]:.2f} | {cost:.2f} | {json.dumps(chosen)} | "
        f"{_edge(grids[m][: len(r['tuning'][m])], chosen)} | {100 * mean:.2f} +- "
        f"{100 * std:.2f} | {ci} | {n_div} |"
      )
      points.append((m, cost, mean, half))
    lines.append("")
    full = [x["test_accuracy"] for x in r["runs"]["nrs"] if not diverged(x)]
    for other in r["runs"]:
      if other == "nrs":
        continue
      vals = [x["test_accuracy"] for x in r["runs"][other] if not diverged(x)]
      if len(vals) > 1 and len(full) > 1:
        d, lo, hi = diff_ci(vals, full)
        lines.append(
          f"- {other} - nrs: {100 * d:+.2f} pp, 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]."
        )
    lines += ["", "Tuning (validation accuracy of each setting; * diverged):", ""]
    for m, rows in r["tuning"].items():
      cells = ", ".join(
        f"{json.dumps(ov)}: {100 * acc:.1f}{'*' if div else ''}" for ov, acc, div in rows
      )
      lines.append(f"- {m}: {cells}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, cost, mean, half in points:
      ax.errorbar(
        [cost], [100 * mean], yerr=[0 if np.isnan(half) else 100 * half], fmt="o", capsize=3
      )
      ax.annotate(m, (cost, 100 * mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(
      xlabel="step time x SGD (measured)", ylabel="test accuracy % (mean, 95% CI)", title=tname
    )
    fig.tight_layout()
    fig.savefig(os.path.join(figdir, f"cost_{tname}.png"), dpi=90)
    plt.close(fig)
    lines += ["", f"![cost-accuracy, {tname}](results/cost_{tname}.png)", ""]
  _write(path, lines, reading)


def _fmt_setting(ov: dict) -> str:
  return ", ".join(f"{k}={v}" for k, v in ov.items()) or "defaults"


def transformer_report(results, costs, seconds, path, command, passes, grids, env, reading=None):
  """RESULTS_TRANSFORMERS.md: AdamW vs SAM vs NRS on the ViT and LM tasks.

  ``results[task]``: ``chosen``/``tuning``/``runs`` as ``study.transformer_study``
  returns them; ``costs[task][method]``: measured step time over AdamW's;
  ``env``: where the runs were trained (``done.json`` of a run) and where the
  costs were measured, as one line each.
  """
  lines = ["# Transformers: AdamW vs SAM vs NRS on a ViT and a character-level LM", ""]
  lines += [
    f"Regenerate: `{command}` (accumulated wall time {seconds / 60:.1f} min).",
    "",
    env,
    "",
    "Protocol: the base optimiser is AdamW with warmup and cosine decay for every method. "
    "AdamW first tunes its weight decay x dropout (4 runs); SAM and NRS (full batch, and with "
    "the neighbours on a strided quarter of the batch, `neighbor_batch_size` = B/4) then tune "
    "their radius on top of AdamW's choice, 4 runs each, so every method gets the same 4 "
    "tuning runs. Tuning reads the validation split (the ViT: accuracy; the LM: loss); the "
    "chosen settings then run with every seed, and test metrics are read once, at the end. "
    "The LM's loss is over the valid (non-padding) characters only, and so is NRS's penalty "
    "(`where`). Cost per epoch: each method's step time over AdamW's (every method takes "
    "the same steps per epoch), measured side by side in one process, with the forward/"
    "backward passes per step beside it. A run with a non-finite loss (or, on mnist1d, "
    "chance accuracy) is reported as diverged and left out of the mean.",
    "",
  ]
  for tname, r in results.items():
    lm = tname == "stdlib_lm"
    lines += [f"## {tname}", ""]
    if lm:
      head = "| test bits/char (mean +- std) | 95% CI | test next-char acc |"
    else:
      head = "| test acc % (mean +- std) | 95% CI |"
    lines += [
      "| method | passes / step | cost per epoch x AdamW | chosen (validation) | grid position "
      + head
      + " seeds (diverged) |",
      "|---|---|---|---|---|" + "---|" * (3 if lm else 2) + "---|",
    ]
    vals = {}
    for m, recs in r["runs"].items():
      ok = [x for x in recs if not collapsed(tname, x)]
      v = [x["test_loss"] / np.log(2) if lm else 100 * x["test_accuracy"] for x in ok]
      vals[m] = v
      mean, std, half = ci95(v) if v else (float("nan"),) * 3
      digits = 3 if lm else 2
      ci = "" if np.isnan(half) else f"[{mean - half:.{digits}f}, {mean + half:.{digits}f}]"
      chosen = r["chosen"][m]
      grid = grids[m][: len(r["tuning"][m])]
      own = {k: v2 for k, v2 in chosen.items() if k in grid[0]}
      pos = _edge(grid, own) if len(grid[0]) == 1 else f"{len(grid)}-point grid"
      cost = costs.get(tname, {}).get(m, float("nan"))
      row = f"| {m} | {passes[m]:.2f} | {cost:.2f} | {_fmt_setting(chosen)} | {pos} | "
      if lm:
        acc = np.mean([100 * x["test_accuracy"] for x in ok]) if ok else float("nan")
        row += f"{mean:.3f} +- {std:.3f} | {ci} | {acc:.2f}% |"
      else:
        row += f"{mean:.2f} +- {std:.2f} | {ci} |"
      lines.append(row + f" {len(recs)} ({len(recs) - len(ok)}) |")
    lines.append("")
    unit = "bits/char" if lm else "pp"
    for a, b in (
      ("nrs", "adamw"),
      ("nrs", "sam"),
      ("nrs_b4", "adamw"),
      ("nrs_b4", "nrs"),
      ("sam", "adamw"),
    ):
      if len(vals.get(a, [])) > 1 and len(vals.get(b, [])) > 1:
        d, lo, hi = diff_ci(vals[a], vals[b])
        better = "lower is better" if lm else "higher is better"
        lines.append(f"- {a} - {b}: {d:+.3f} {unit}, 95% CI [{lo:+.3f}, {hi:+.3f}] ({better}).")
    metric = "validation loss" if lm else "validation accuracy %"
    lines += ["", f"Tuning ({metric} of each setting; * diverged):", ""]
    for m, rows in r["tuning"].items():
      cells = "; ".join(
        f"{_fmt_setting(ov)}: {(v if lm else 100 * v):.3f}{'*' if div else ''}"
        for ov, v, div in rows
      )
      lines.append(f"- {m}: {cells}")
    lines.append("")
  _write(path, lines, reading)
