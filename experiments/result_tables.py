"""Markdown tables from the committed result JSON (``experiments/results/``): the benchmarks'
and the study's machine-readable summary (``study_summary.json``, written with its report).
The documentation renders these at build time and ``python -m experiments.result_tables``
writes the README's study table, so every table is the measured numbers, never a copy. Each
function takes a JSON path (relative to ``experiments/results/`` unless absolute)."""

from __future__ import annotations

import json
import os

from experiments.tables import markdown_table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "results")
MiB = 2**20


def load(name: str) -> dict:
  path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
  with open(path) as f:
    return json.load(f)


def _fmt(x: float | None) -> str:
  if x is None:
    return ""
  return f"{x:.2f}" if x < 10 else f"{x:.3g}"


def gpu_rows(name: str = "benchmark_gpu_nvidia_h200.json") -> str:
  """Every row of an accelerator run: step time over SGD and SAM, images/s, temp memory."""
  d = load(name)
  rows = d["rows"] if "rows" in d else next(iter(d["models"].values()))["raw"]
  out = []
  for label, r in rows.items():
    if "seconds" not in r:
      continue
    out.append(
      [
        f"`{label}`",
        r.get("dtype", ""),
        _fmt(r["vs_sgd"]),
        _fmt(r["vs_sam"]),
        f"{r['images_per_second']:,.0f}",
        f"{r['temp_bytes'] / MiB:,.0f}",
      ]
    )
  return markdown_table(["row", "dtype", "x SGD", "x SAM", "images/s", "XLA temp MiB"], out)


def _raw(result: dict, model: str) -> dict:
  return result["models"][model]["raw"]


def _x(raw: dict, label: str, base: str) -> float | None:
  if label not in raw or "seconds" not in raw[label]:
    return None
  return raw[label]["seconds"] / raw[base]["seconds"]


def _rows_with(result: dict, row: str, ks=(1, 2, 4, 8)):
  """(model, raw rows, K) for every model and K whose run has ``nrs_k{K}_{row}``."""
  for model in result["models"]:
    raw = _raw(result, model)
    for k in ks:
      if f"nrs_k{k}_{row}" in raw:
        yield model, raw, k


def cpu_strategies(name: str = "benchmark_cpu_strategies_after.json") -> str:
  """NRS steps in SAM steps per strategy and K, with the XLA temp memory."""
  out = []
  for model, raw, k in _rows_with(load(name), "auto"):
    cells = [model, str(k), _fmt(0.5 * (1 + k))]
    for s in ("auto", "loop", "chunked", "vmap", "chunked2"):
      cells.append(_fmt(_x(raw, f"nrs_k{k}_{s}", "sam")))
    temps = [
      f"{raw[f'nrs_k{k}_{s}']['temp_bytes'] / MiB:.1f}" if f"nrs_k{k}_{s}" in raw else "-"
      for s in ("loop", "chunked", "chunked2")
    ]
    out.append(cells + [" / ".join(temps)])
  header = ["model", "K", "floor 0.5(1+K)", "auto", "loop", "chunked (chunks of 1)", "vmap"]
  header += ["chunked, chunks of 2", "temp MiB: loop / chunked / chunks of 2"]
  return markdown_table(header, out)


def cpu_transform(name: str = "benchmark_cpu_strategies_after.json") -> str:
  """The optax transform over the fused loss, differentiable and fixed centre."""
  out = []
  for model, raw, k in _rows_with(load(name), "transform"):
    diff = _x(raw, f"nrs_k{k}_transform", f"nrs_k{k}_auto")
    sg = _x(raw, f"nrs_k{k}_transform_sg", f"nrs_k{k}_fused_sg")
    out.append([model, str(k), f"{_fmt(diff)} ({(2 + k) / (1 + k):.2f})", _fmt(sg)])
  header = ["model", "K", "differentiable centre (work bound (2+K)/(1+K))"]
  return markdown_table(header + ["fixed centre + `center_logits`"], out)


def cpu_subbatch(name: str = "benchmark_cpu_subbatch.json") -> str:
  """Neighbours on B/4 and B/8 examples, in SGD steps."""
  out = []
  for model, raw, k in _rows_with(load(name), "sub4", ks=(1, 2)):
    cells = [model, str(k), _fmt(_x(raw, f"nrs_k{k}_auto", "sgd"))]
    for frac in (4, 8):
      for reuse in ("", "_reuse"):
        cells.append(_fmt(_x(raw, f"nrs_k{k}_sub{frac}{reuse}", "sgd")))
    out.append(cells)
  header = ["model", "K", "full NRS", "B/4", "B/4 reuse", "B/8", "B/8 reuse"]
  return markdown_table(header, out)


def step_profile(name: str = "step_profile_cpu.json", table: str = "parts") -> str:
  """``experiments.step_profile``'s JSON: where an NRS step's time goes (``table="parts"``), or
  each method's step (``"steps"``), per study model, in units of one base step."""
  d = load(name)
  tasks = d["tasks"]
  if table == "parts":
    parts = list(next(iter(tasks.values()))["parts"])
    out = []
    for t in tasks.values():
      total = sum(t["parts"].values())
      out.append(
        [t["model"], str(t["batch_size"]), *(_fmt(t["parts"][p]) for p in parts), _fmt(total)]
      )
    return markdown_table(["model", "batch", *parts, "NRS gradient"], out)
  base = {name: next(iter(t["steps"])) for name, t in tasks.items()}  # sgd, or adamw
  labels = list(dict.fromkeys(k for n, t in tasks.items() for k in t["steps"] if k != base[n]))
  out = [
    [t["model"], f"`{base[n]}`", *(_fmt(t["steps"].get(k)) for k in labels)]
    for n, t in tasks.items()
  ]
  return markdown_table(["model", "base (1.00)", *(f"`{k}`" for k in labels)], out)


def strategies_before_after(
  before: str = "benchmark_cpu_strategies_before.json",
  after: str = "benchmark_cpu_strategies_after.json",
) -> str:
  """The strategy rows of two runs side by side (``accumulate`` became ``chunked``)."""
  b, a = load(before)["models"], load(after)["models"]
  out = []
  for model in a:
    rb, ra = b[model]["raw"], a[model]["raw"]
    for k in (1, 2, 4, 8):
      pairs = [("auto", "auto"), ("loop", "loop"), ("vmap", "vmap"), ("accumulate", "chunked")]
      if k == 8:
        pairs.append(("chunked", "chunked2"))
      for pb, pa in pairs:
        lb, la = f"nrs_k{k}_{pb}", f"nrs_k{k}_{pa}"
        if lb not in rb or la not in ra:
          continue
        out.append(
          [
            model,
            str(k),
            f"{pb} -> {pa}",
            _fmt(_x(rb, lb, "sam")),
            _fmt(_x(ra, la, "sam")),
            _fmt(rb[lb]["compile_seconds"] / rb["sgd"]["compile_seconds"]),
            _fmt(ra[la]["compile_seconds"] / ra["sgd"]["compile_seconds"]),
            f"{rb[lb]['temp_bytes'] / MiB:.2f}",
            f"{ra[la]['temp_bytes'] / MiB:.2f}",
          ]
        )
  header = ["model", "K", "row", "x SAM before", "after", "compile x SGD before", "after"]
  return markdown_table(header + ["temp MiB before", "after"], out)


def cpu_tokens(name: str = "benchmark_cpu_tokens.json") -> str:
  """Token-level NRS (K = 4, [B, T, V] logits with a padding mask) per vocab size."""
  out = []
  for vocab, rows in load(name)["tokens"].items():
    for label, r in rows.items():
      out.append([vocab[1:], label, _fmt(r["vs_ce"]), f"{r['temp_mib']:.1f}"])
  return markdown_table(["vocab", "row", "step x cross-entropy step", "XLA temp MiB"], out)


SUMMARY = "study_summary.json"  # written by experiments.study_report beside its report
README = os.path.join(RESULTS, "..", "..", "README.md")
BEGIN = (
  "<!-- study summary: `python -m experiments.result_tables` writes this table; do not edit -->"
)
END = "<!-- end of study summary -->"
SHORT_UNITS = {"test accuracy, %": "%", "bits per character, lower is better": "bits/char"}


def study_tasks(name: str = SUMMARY) -> dict:
  """The study's machine-readable summary, task by task (empty while no task has finished)."""
  path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
  return load(path)["tasks"] if os.path.exists(path) else {}


def study_section(task: str, name: str = SUMMARY) -> str | None:
  """The main table of ``task`` in the study's report, or None if it has not finished."""
  t = study_tasks(name).get(task)
  return None if t is None else markdown_table(t["head"], t["rows"])


def _summary_row(name: str, t: dict) -> list[str]:
  by: dict[str, list] = {k: [] for k in ("tie", "ahead", "behind", "inconclusive")}
  for m, r in t["methods"].items():
    if m == t["subject"]:
      continue
    if r["verdict"] == "inconclusive":
      by["inconclusive"].append(f"{m} (MDD {r['mdd']})")
    elif r["verdict"] == "too few pairs":
      by["inconclusive"].append(f"{m} (too few pairs)")
    else:
      notes = [
        n for n, on in (("difference detected", r["detected"]), ("fragile", not r["robust"])) if on
      ]
      by[r["verdict"].split(" ")[-1]].append(m + (f" ({', '.join(notes)})" if notes else ""))
  subject = t["methods"][t["subject"]]["mean_ci"]
  subject = f"{t['subject']} {subject} {SHORT_UNITS.get(t['unit'], t['unit'])}"
  f = t["flatness"]
  flat = f"{f['vs_base']} / {f['vs_sam']}; tau {f['tau']:+.2f}"
  return [f"`{name}`", subject] + [", ".join(by[k]) or "none" for k in by] + [flat]


def study_summary(name: str = SUMMARY) -> str:
  """One row per finished task of the study: the subject's mean [95% CI], which methods it
  ties (the equivalence test passed), is ahead of or behind (exact signed-rank test, Holm),
  each marked where it is fragile (not under the other test or without some seed) or an
  equivalence with a detected difference, the inconclusive comparisons with their minimum
  detectable difference, and the flatness answer (the within-method tau); then a line naming every chosen value still at an edge of its grid. Every cell is
  read from the report's summary (study_summary.json), nothing computed here."""
  tasks = study_tasks(name)
  if not tasks:
    return "No task has finished yet: the report holds no result."
  out = [_summary_row(t, v) for t, v in tasks.items()]
  edges = [f"`{t}`: {', '.join(v['edges'])}" for t, v in tasks.items() if v["edges"]]
  head = ["task", "NRS row, mean [95% CI]", "tied with (equivalence)"]
  head += ["ahead of (exact test, Holm)", "behind", "inconclusive (MDD)"]
  head += ["flatter than the base / SAM; within-method tau"]
  table = markdown_table(head, out)
  edge = "\n\nChosen values still at an edge of their grid after the extensions (the best may "
  return table + (f"{edge}lie beyond): {'; '.join(edges)}." if edges else "")


def readme_with_summary(readme: str, name: str = SUMMARY) -> str:
  """``readme`` with the block between BEGIN and END replaced by :func:`study_summary`."""
  start, stop = readme.index(BEGIN) + len(BEGIN), readme.index(END)
  return readme[:start] + "\n" + study_summary(name) + "\n" + readme[stop:]


if __name__ == "__main__":  # python -m experiments.result_tables: rewrites the README's table
  with open(README) as f:
    text = readme_with_summary(f.read())
  with open(README, "w") as f:
    f.write(text)
