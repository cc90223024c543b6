"""The study runner under faults: no orphans after a SIGKILL, one runner at a time, rows that
say where they were made and that a kill and a rerun reproduce bit for bit, --help."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid: int) -> set:
  """Live processes whose parent is ``pid`` (from /proc; zombies excluded)."""
  out = set()
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    if int(ppid) == pid and state != "Z":
      out.add(int(d))
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _wait(cond, timeout, what):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return
    time.sleep(0.1)
  raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _runner(tmp_path, name):
  cmd = [sys.executable, "-m", "experiments.study", "--quick", "--workers=2", "--train_only"]
  cmd += ["--tasks=mnist1d_mlp", f"--records={tmp_path / 'runs.csv'}"]
  cmd += [f"--workdir={tmp_path / 'w'}"]
  log = open(tmp_path / f"{name}.log", "w")
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _files(root) -> dict:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      try:
        out[p] = os.stat(p).st_mtime_ns
      except OSError:
        pass
  return out


def test_sigkill_leaves_no_orphans_and_one_runner_holds_the_records(tmp_path):
  """The bugs: pool workers (and the resource tracker) that outlive a SIGKILLed runner and
  go on training in its workdir; a second runner on the same records that appends beside the
  first; a lock left by a dead runner that blocks every later one."""
  a = _runner(tmp_path, "a")
  try:
    runs = lambda: [p for p in _files(tmp_path / "w") if p.endswith("config.json")]
    _wait(lambda: len(_children(a.pid)) >= 2 and runs(), 240, "runner a's workers to train")
    kids = _children(a.pid)

    b = _study_cli(
      "--quick",
      "--train_only",
      f"--records={tmp_path / 'runs.csv'}",
      f"--workdir={tmp_path / 'other'}",
    )
    assert b.returncode != 0
    assert f"another study runner (pid {a.pid}) is using --records" in b.stderr, b.stderr[-2000:]

    a.send_signal(signal.SIGKILL)
    a.wait()
    _wait(lambda: not any(_alive(k) for k in kids), 15, f"workers {kids} to die with runner a")
    before = _files(tmp_path / "w")
    time.sleep(1.5)
    assert _files(tmp_path / "w") == before  # nothing writes to the run directory any more

    c = _runner(tmp_path, "c")
    try:
      log = tmp_path / "c.log"
      _wait(lambda: "taking over the lock" in log.read_text(), 120, "runner c's takeover")
      assert f"of runner pid {a.pid}, which is gone" in log.read_text()
    finally:
      c_kids = _children(c.pid)
      c.send_signal(signal.SIGKILL)
      c.wait()
    _wait(lambda: not any(_alive(k) for k in c_kids), 15, "runner c's workers to die")
  finally:
    if a.poll() is None:
      a.kill()


_TRAIN = (
  "import json, sys; from experiments import study; study.use_study_xla_flags(); "
  "[print('ROW ' + json.dumps(study.train_one(tuple(j)))) for j in json.loads(sys.argv[1])]"
)


def _train(*jobs, wait=True):
  """Trains the jobs one after another in one fresh process; their rows."""
  cmd = [sys.executable, "-c", _TRAIN, json.dumps(jobs)]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
  return [json.loads(part.splitlines()[0]) for part in out.stdout.split("ROW ")[1:]]


def test_a_run_is_bit_for_bit_the_same_twice_and_through_a_kill_and_rerun(tmp_path):
  """A quick study run trained twice, and once more killed mid-run and run again in the same
  directory (as the runner resumes), gives the same row values and final weights bit for
  bit. The bugs: a draw from the wall clock or the process, state a killed run leaves in its
  directory that the rerun picks up, a row whose machine column is missing."""
  setting = {"learning_rate": 0.4, "weight_decay": 5e-4}
  job = lambda d: ["mnist1d_mlp", "sgd", "tune", 100, setting, "absolute", True, str(d)]
  rows = _train(job(tmp_path / "one"), job(tmp_path / "two"))  # (one process: twice)
  killed = tmp_path / "killed"
  p = _train(job(killed), wait=False)
  _wait(lambda: (killed / "metrics.jsonl").exists() or p.poll() is not None, 240, "training")
  p.send_signal(signal.SIGKILL)
  p.wait()
  rows += _train(job(killed))  # a fresh process, as the runner's next invocation
  for r in rows[1:]:
    assert (r["val"], r["test"], r["diverged"]) == (rows[0]["val"], rows[0]["test"], 0)
  machine = rows[0]["machine"]  # the study's flags are spelled out after the versions
  assert machine.startswith(study.machine()) and machine.endswith(
    " ".join(study.STUDY_XLA_FLAGS).replace(" ", "; ")
  )
  ref = np.load(tmp_path / "one" / "final_state.npz")
  for d in ("two", "killed"):
    other = np.load(tmp_path / d / "final_state.npz")
    assert sorted(other.files) == sorted(ref.files)
    for k in ref.files:
      np.testing.assert_array_equal(other[k], ref[k])


def test_a_resumed_run_counts_the_cpu_seconds_spent_before_its_kill(monkeypatch):
  """The bug: a run killed and resumed recorded only the resumed process's CPU seconds."""
  from experiments import train

  rec = dict(val_accuracy=0.5, test_accuracy=0.5, train_loss=0.1)
  monkeypatch.setattr(
    train, "train_and_evaluate", lambda *a: {**rec, "cpu_seconds_before_resume": 1e3}
  )
  setting = {"learning_rate": 0.4, "weight_decay": 5e-4}
  row = study.train_one(("mnist1d_mlp", "sgd", "tune", 100, setting, "absolute", True, "unused"))
  assert 1e3 <= row["seconds"] < 1e3 + 60 and row["val"] == 0.5


def _fail_seed_101(job):
  """A pool trainer (module level: the workers import it): seed 101 raises at once, the
  others take 0.3 s; each leaves a marker, so the test counts the jobs that started."""
  task, method, phase, seed, setting, *_, workdir = job
  os.makedirs(workdir)
  if seed == 101:
    raise ValueError("--workdir holds a run with a different config")
  time.sleep(0.3)
  row = dict(task=task, method=method, phase=phase, seed=seed, metric="accuracy", val=0.5)
  row.update(setting=json.dumps(setting, sort_keys=True), test=0.5, diverged=0, seconds=0.3)
  row.update(dict.fromkeys(study.spec.MEASURES, 0.5), lanczos_residual=0.01, hessian_trace_se=0.1)
  return {**row, "failed_measures": "", "machine": "test"}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_run_stops_the_queue_names_the_job_and_keeps_the_finished_rows(workers, tmp_path):
  """The bug: one run that raised (a stale run directory) made the pool run all 218 queued
  runs, keep none of their rows, and only then fail, naming no run."""
  s = study.Study(str(tmp_path / "runs.csv"), str(tmp_path / "w"), workers, False, _fail_seed_101)
  setting = {"learning_rate": 0.4, "weight_decay": 5e-4}
  jobs = [("mnist1d_mlp", "sgd", "final", seed, setting) for seed in range(100, 120)]
  with pytest.raises(RuntimeError, match=r"final run of sgd on mnist1d_mlp \(seed 101.*ValueError"):
    s.run(jobs)
  tag = "learning_rate=0.4_weight_decay=0.0005"
  started = len(os.listdir(tmp_path / "w" / "mnist1d_mlp" / "sgd" / "final" / tag))
  kept = study.spec.read_records(str(tmp_path / "runs.csv"))
  assert started < 10 and len(kept) == started - 1 and len(kept) >= 1
  again = study.Study(str(tmp_path / "runs.csv"), str(tmp_path / "w2"), 1, False, _fail_seed_101)
  with pytest.raises(RuntimeError, match="seed 101"):  # the kept rows are not trained again
    again.run(jobs)
  assert os.listdir(tmp_path / "w2" / "mnist1d_mlp" / "sgd" / "final" / tag) == ["seed101"]


def _study_cli(*args: str) -> subprocess.CompletedProcess:
  """``python -m experiments.study *args`` from the repository root, its output captured."""
  cmd = [sys.executable, "-m", "experiments.study", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_exits_zero_and_lists_the_flags():
  """The bug: absl's --help exits 1 ("Try --helpfull") and lists none of the study's flags."""
  out = _study_cli("--help")
  assert out.returncode == 0, out.stderr
  flags = "records workdir tasks methods workers report_only quick train_only".split()
  for flag in flags:
    assert f"--{flag}:" in out.stdout or f"--[no]{flag}:" in out.stdout, flag


def test_an_undeclared_method_is_a_clear_error_before_anything_trains(tmp_path):
  out = _study_cli(
    "--tasks=mnist1d_vit",
    "--methods=asam,vat",
    f"--records={tmp_path / 'runs.csv'}",
    f"--workdir={tmp_path / 'w'}",
  )
  assert out.returncode != 0
  assert "--methods: ['asam', 'vat'] not declared on the tasks run (mnist1d_vit)" in out.stderr
  assert not (tmp_path / "runs.csv").exists()


def test_machine_names_the_cpu_isa_and_versions(monkeypatch):
  """The machine column from a given /proc/cpuinfo: the first processor's model, the ISA
  extensions XLA:CPU compiles for (in a fixed order), the versions, the code-fixing flags."""
  import jax
  import jaxlib

  cpuinfo = (
    "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 sse4_2 fma avx\n\n"
    "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: avx512f\n"
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2 --xla_dump_to=/tmp/x")
  versions = f"jax {jax.__version__} jaxlib {jaxlib.__version__}"
  want = f"Test CPU 9000; sse4_2 avx avx2 fma; {versions}; --xla_cpu_max_isa=AVX2"
  assert study.machine(cpuinfo) == want
  assert study.machine("").endswith(f"; unknown ISA; {versions}; --xla_cpu_max_isa=AVX2")


def test_the_reproducibility_numbers_on_the_evidence_page_are_the_measured_ones():
  """docs/evidence.md's reproducibility section quotes the committed output of the ISA check
  (experiments/results/isa_check.json, whose ``summary`` the script, now at commit 9e7edab
  with the records it read, computed), not hand-typed numbers."""
  import re

  with open(os.path.join(ROOT, "experiments", "results", "isa_check.json")) as f:
    summary = json.load(f)["summary"]
  values = {f"{v:.2f}" for v in summary.values() if isinstance(v, float)}
  values |= {f"{v:.2f}" for v in summary["study_cost"].values()}
  with open(os.path.join(ROOT, "docs", "evidence.md")) as f:
    text = f.read()
  section = re.search(r"### Reproducibility.*?(?=^### )", text, re.S | re.M).group(0)
  numbers = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\d.])", section))  # (not 0.10.2)
  assert len(numbers) >= 8
  assert numbers <= values, sorted(numbers - values)
  # what the section states in words holds in the data
  assert summary["sgd/max_isa_AVX"] != summary["sgd/default"]
  assert {"max_isa_AVX2", "no_xnnpack", "no_platform_math", "study"} <= set(
    summary["identical_to_default"]
  )


def test_the_runner_warns_before_a_final_run_that_would_straddle_machine_kinds(
  tmp_path, monkeypatch
):
  """A seed whose other final rows ran on another CPU kind: the new run's pairs would
  straddle kinds (the report then compares them unpaired); the runner says so first."""
  s = study.Study(str(tmp_path / "runs.csv"), str(tmp_path / "wd"), 1, True)
  other = "Other CPU; avx512f; jax 0 jaxlib 0"
  s.rows[study.spec.key_of("mnist1d_mlp", "sgd", "final", 100, {})] = {
    "task": "mnist1d_mlp",
    "phase": "final",
    "seed": 100,
    "machine": other,
  }
  said = []
  monkeypatch.setattr(study.logging, "warning", lambda msg, *a: said.append(msg % a))
  monkeypatch.setattr(
    study, "machine", lambda cpuinfo=None: "Here CPU; avx avx2 fma; jax 0 jaxlib 0"
  )
  s._warn_of_straddles([("mnist1d_mlp", "nrs", "final", 100, {})])
  s._warn_of_straddles(
    [("mnist1d_mlp", "nrs", "final", 101, {}), ("mnist1d_mlp", "nrs", "tune", 100, {})]
  )
  assert len(said) == 1 and "nrs seed 100 runs on AVX2" in said[0] and "on AVX-512:" in said[0]


def test_a_records_row_without_a_machine_is_a_clear_error():
  with pytest.raises(ValueError, match="machine field"):
    study.spec.machine_kind("")
  assert study.spec.machine_kind("AMD EPYC; avx2 fma; jax 0.10.2 jaxlib 0.10.2") == "AVX2"


def test_machine_kinds_are_the_vector_isa_class_the_cross_machine_check_found():
  """An Intel Xeon and an AMD EPYC with AVX-512 are one kind, an AMD EPYC with AVX2 alone
  another: what experiments/isa_check.py measured (the committed rows reproduced to the last
  digit across the first two; isa_check.json: the third gave other numbers)."""
  versions = "jax 0.10.2 jaxlib 0.10.2; --xla_cpu_max_isa=AVX2; --xla_cpu_use_xnnpack=false"
  intel = f"Intel(R) Xeon(R) Processor; sse4_2 avx avx2 fma avx512f avx512bw amx_bf16; {versions}"
  amd512 = f"AMD EPYC; sse4_2 avx avx2 fma avx512f avx512bw; {versions}"
  amd2 = f"AMD EPYC; sse4_2 avx avx2 fma; {versions}"
  kind = study.spec.machine_kind
  assert kind(intel) == kind(amd512) == "AVX-512" != kind(amd2)
  with open(os.path.join(ROOT, "experiments", "results", "isa_check_machines.json")) as f:
    checked = json.load(f)
  for machine, entry in checked.items():
    for c in entry["checks"]:
      same = kind(c["committed_machine"]) == kind(machine)
      assert c["identical"] == same or not same, (machine, c["run"])  # one kind: identical
      assert c["identical"] == all(c["committed"][k] == c["here"][k] for k in c["here"])
  assert any(kind(m) == "AVX-512" and "AMD" in m for m in checked)  # the vendor changed
