"""Does the instruction set XLA:CPU compiles for change a study row? One final run
(``mnist1d_mlp``, seed 100, its committed setting) trained under several XLA flags on this
machine, each in a fresh process on one core; the rows, a hash of the final weights and the
CPU seconds go to ``experiments/results/isa_check.json`` (docs/evidence.md quotes it).

  python -m experiments.isa_check
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from experiments import study_spec

OUT = os.path.join(os.path.dirname(__file__), "results", "isa_check.json")
BASE = "--xla_cpu_multi_thread_eigen=false"
FLAGS = {
  "default": "",
  "max_isa_AVX2": "--xla_cpu_max_isa=AVX2",
  "max_isa_AVX": "--xla_cpu_max_isa=AVX",
  "max_isa_SSE4_2": "--xla_cpu_max_isa=SSE4_2",
  "no_xnnpack": "--xla_cpu_use_xnnpack=false",
  "no_platform_math": "--xla_cpu_enable_platform_dependent_math=false",
  "study": "--xla_cpu_max_isa=AVX2 --xla_cpu_use_xnnpack=false",
}
# (method, flags) in the order run; default and study twice each, interleaved, for the cost.
PLAN = [("sgd", f) for f in FLAGS] + [("sgd", "default"), ("sgd", "study")]
PLAN += [("nrs", "default"), ("nrs", "study"), ("nrs", "default"), ("nrs", "study")]

_ONE = """
import hashlib, json, os, sys, time
import numpy as np
from experiments import study
job = tuple(json.loads(sys.argv[1]))
t0 = time.process_time()
row = study.train_one(job)
f = np.load(os.path.join(job[-1], "final_state.npz"))
h = hashlib.sha256(b"".join(f[k].tobytes() for k in sorted(f.files))).hexdigest()[:16]
print("ROW " + json.dumps({**row, "hash": h, "cpu_seconds": time.process_time() - t0}))
"""


def committed_row(method: str) -> dict:
  rows = study_spec.read_records(os.path.join(os.path.dirname(OUT), "study_runs.csv"))
  return rows[
    next(k for k in rows if k[:4] == ("mnist1d_mlp", method, "final", 100))  # its one setting
  ]


def main() -> None:
  out = {"runs": [], "committed": {}}
  for method in ("sgd", "nrs"):
    r = committed_row(method)
    out["committed"][method] = {"setting": json.loads(r["setting"]), "test": r["test"]}
  workdir = os.path.join("workdir", "isa_check")
  for i, (method, name) in enumerate(PLAN):
    setting = out["committed"][method]["setting"]
    job = ["mnist1d_mlp", method, "final", 100, setting, "absolute", False]
    job.append(os.path.join(workdir, f"{i:02d}_{method}_{name}"))
    env = {**os.environ, "XLA_FLAGS": f"{BASE} {FLAGS[name]}".strip()}
    cmd = [sys.executable, "-c", _ONE, json.dumps(job)]
    if hasattr(os, "sched_getaffinity"):
      cmd = ["taskset", "-c", str(max(os.sched_getaffinity(0))), *cmd]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    row = json.loads(p.stdout.split("ROW ", 1)[1])
    keep = ("method", "test", "val", "hash", "cpu_seconds", "machine")
    out["runs"].append({"flags": name, **{k: row[k] for k in keep}})
    print(out["runs"][-1], flush=True)
  with open(OUT, "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)


def summary(data: dict) -> dict:
  """The numbers docs/evidence.md quotes: test accuracy per (method, flags) in %, the
  committed rows', whether runs agree bit for bit, and the study flags' CPU-time ratio."""
  runs = data["runs"]
  by = {}
  for r in runs:
    by.setdefault((r["method"], r["flags"]), []).append(r)
  pct = lambda x: round(100 * x, 2)
  s = {f"{m}/{f}": pct(rs[0]["test"]) for (m, f), rs in by.items()}
  s.update({f"{m}/committed": pct(c["test"]) for m, c in data["committed"].items()})
  s["identical_to_default"] = sorted(
    f
    for (m, f), rs in by.items()
    if m == "sgd" and rs[0]["hash"] == by["sgd", "default"][0]["hash"]
  )
  med = lambda m, f: float(np.median([r["cpu_seconds"] for r in by[m, f]]))
  s["study_cost"] = {m: round(med(m, "study") / med(m, "default"), 2) for m in ("sgd", "nrs")}
  rows = study_spec.read_records(os.path.join(os.path.dirname(OUT), "study_runs.csv"))
  for m in ("sgd", "nrs"):
    s[f"{m}/machine_change_pp"] = round(abs(s[f"{m}/committed"] - s[f"{m}/default"]), 2)
    final = [
      r["test"]
      for r in rows.values()
      if (r["task"], r["method"], r["phase"]) == ("mnist1d_mlp", m, "final")
    ]
    s[f"{m}/seed_sd_pp"] = round(100 * float(np.std(final, ddof=1)), 2)
  s["machine"] = runs[0]["machine"]
  return s


if __name__ == "__main__":
  main()
  with open(OUT) as f:
    print(json.dumps(summary(json.load(f)), indent=1))
