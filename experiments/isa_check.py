"""Does a committed study row reproduce on this machine? (issue 51, item 6.) Trains committed
final runs again here, under the study's XLA flags, with their measures, and writes the
committed and the new values side by side to ``experiments/results/isa_check_machines.json``
(one entry per machine, this machine's replacing an earlier one of the same name).

  python -m experiments.isa_check [--runs=mnist1d_mlp/sgd/100,mnist1d_mlp/nrs/100]

Run on an AMD EPYC with AVX-512, it reproduced rows made on an Intel Xeon with AVX-512 to the
last digit of every measure; an AMD EPYC without AVX-512 had given other numbers for the same
run under the same flags (``isa_check.json``). So the study's machine kind
(``study_spec.machine_kind``) is the vector ISA class, not the vendor or the model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from experiments import study
from experiments import study_spec as spec

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "isa_check_machines.json")
COMPARED = ("val", "test", "lambda_max", "hessian_trace", "sharpness", "weight_norm", "test_nll")


def check(run: str, rows: dict, workdir: str) -> dict:
  """``task/method/seed``: the committed final row and the same run trained here."""
  task, method, seed = run.split("/")
  key = next(k for k in rows if k[:4] == (task, method, "final", int(seed)))
  old = rows[key]
  job = (task, method, "final", int(seed), json.loads(old["setting"]), "absolute", False)
  new = study.train_one((*job, os.path.join(workdir, run.replace("/", "_"))))
  return {
    "run": run,
    "committed_machine": old["machine"],
    "committed": {k: old[k] for k in COMPARED},
    "here": {k: new[k] for k in COMPARED},
    "identical": all(old[k] == new[k] for k in COMPARED),
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="mnist1d_mlp/sgd/100,mnist1d_mlp/nrs/100")
  p.add_argument("--out", default=OUT)
  a = p.parse_args(argv)
  study.use_study_xla_flags()
  if hasattr(os, "sched_setaffinity"):  # one core, as the runner's workers (threads: sums)
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
  rows = spec.read_records(os.path.join(os.path.dirname(OUT), "study_runs.csv"))
  here = study.machine()
  with tempfile.TemporaryDirectory() as workdir:
    checks = [check(r, rows, workdir) for r in a.runs.split(",")]
  data = json.load(open(a.out)) if os.path.exists(a.out) else {}
  data[here] = {"kind": spec.machine_kind(here), "checks": checks}
  with open(a.out, "w") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  print(json.dumps(data[here], indent=1))
  return data


if __name__ == "__main__":
  main()
