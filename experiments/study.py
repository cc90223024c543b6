"""The evidence study: every method tuned the same way, paired final seeds, one report.

  python -m experiments.study --workdir workdir/study     # train (or resume), then report
  python -m experiments.study --report_only              # the report from the records alone
  python -m experiments.study --tasks=T --methods=M,...   # only some methods of task T

Every method tunes the same way (:func:`tune_task`; a choice at an edge extends its axis), then
trains on final seeds shared by every method, so that differences pair by seed; NRS's noise
family is chosen first, on a pilot task. Every run is one row of ``--records``: a run with a
row is never trained again, and the report (study_report.py) is written from them alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import ctypes
import fcntl
import importlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging

from experiments import study_spec as spec  # the declarations (the report imports them too)

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "workdir/study", "Where the runs train (checkpoints).")
  flags.DEFINE_string("records", "experiments/results/study_runs.csv", "One row per run.")
  flags.DEFINE_string("report", "experiments/RESULTS_STUDY.md", "The report to write.")
  flags.DEFINE_list("tasks", [], "A declared subset of tasks (default: all; pilot: only it).")
  flags.DEFINE_list(
    "methods",
    [],
    "Train only these declared methods (and the ones they tune at or on top of; default: all). "
    "Step costs are then read from the stored timing, not timed again.",
  )
  flags.DEFINE_integer("workers", 2, "Runs in parallel (one CPU core each).")
  flags.DEFINE_bool("quick", False, "Two epochs, two values per axis (the test suite's runs).")
  flags.DEFINE_bool("report_only", False, "Write the report from the records; train nothing.")
  flags.DEFINE_bool("train_only", False, "Train (or resume) and stop before the report.")


def make_config(task: spec.Task, method: str, setting: dict, seed: int, quick: bool, family=""):
  """The run's config: the task's, the method's fixed values, then the tuned ones."""
  config = importlib.import_module(f"experiments.configs.{task.config}").get_config()
  m = spec.method_of(method, family, task)
  with config.unlocked():
    config.compare_methods, config.seed, config.progress = (), seed, False
    config.method = m.harness
    values = {**task.overrides, **m.fixed, **spec.ABLATIONS.get(method, {}), **setting}
    for key, v in values.items():
      if key == "nrs.neighbor_batch_size" and isinstance(v, float):
        v = int(config.batch_size * v)
      *path, last = key.split(".")
      obj = config
      for p in path:
        obj = obj[p]
      obj[last] = v
    config.checkpoint_every_steps = 100_000
    # (the measures of a final solution are taken once, by experiments.measures)
    config.hessian = dict(num_examples=0, batch_size=64, num_iters=0, num_samples=0, every_evals=0)
    if quick:
      config.num_epochs = 2
      config.max_examples = min(config.get("max_examples") or 512, 512)
    config.num_epochs *= m.epochs
    config.eval_every_epochs = 1 if quick else max(config.num_epochs // 2, 1)  # the last counts
  return config


def _append(path: str, row: dict) -> None:
  new = not os.path.exists(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, spec.COLUMNS, lineterminator="\n")
    if new:
      w.writeheader()
    w.writerow({k: row[k] for k in spec.COLUMNS})


def train_one(job: tuple) -> dict:
  """Worker: trains one run and returns its row; a non-finite loss or a spec.chance-level
  validation spec.score is a divergence, counted at :func:`spec.chance` (test data never decides)."""
  task_name, method, phase, seed, setting, family, quick, workdir = job
  from experiments import train

  task = spec.task_of(task_name)
  config = make_config(task, method, setting, seed, quick, family)
  t0 = time.process_time()
  finish = None
  if phase == "final":
    finish = lambda model, state, ds: _measure(model, state, ds, seed, workdir)
  try:
    rec = train.train_and_evaluate(config, workdir, finish)
  except FloatingPointError:
    rec = {}
  nan = float("nan")
  if task.metric == "bits_per_char":
    val, test = (rec.get(k, nan) / math.log(2) for k in ("val_loss", "test_loss"))
    bad = not (math.isfinite(val) and val <= spec.chance(task))
  else:
    val, test = rec.get("val_accuracy", nan), rec.get("test_accuracy", nan)
    bad = not (math.isfinite(val) and val >= 2.0 / task.num_classes)
  bad = bad or not math.isfinite(rec.get("train_loss", nan))
  if bad:
    val = test = spec.chance(task)
  row = dict(task=task_name, method=method, phase=phase, seed=seed, metric=task.metric)
  row.update(setting=json.dumps(setting, sort_keys=True), val=val, test=test, diverged=int(bad))
  # measures: "" on tuning rows; NaN where a final run diverged or a measure failed
  row.update({k: rec.get(k, nan) if phase == "final" else "" for k in spec.MEASURES})
  row.update({k: rec.get(k, nan) if phase == "final" else "" for k in spec.DIAGNOSTICS[:2]})
  row["failed_measures"] = rec.get("failed_measures", "")
  seconds = time.process_time() - t0 + rec.get("cpu_seconds_before_resume", 0.0)
  return {**row, "seconds": seconds, "machine": machine()}


def _measure(model, state, ds, seed: int, run: str) -> dict:
  """The final solution's flatness and calibration (experiments.measures), with keys fixed
  by the run's seed: every method of a seed measures with the same probes and neighbours."""
  import jax

  from experiments import measures

  key = jax.random.fold_in(jax.random.key(seed), 2**30)
  train, test = (ds.train.x, ds.train.y), (ds.test.x, ds.test.y)
  return measures.measure(
    model.apply, state["params"], state["batch_stats"], train, test, key, run=run
  )


# The XLA flags a row's machine column spells out: those that decide the compiled code.
REPRODUCIBLE_PREFIXES = ("--xla_cpu_max_isa", "--xla_cpu_use_xnnpack", "--xla_cpu_enable_platform")
# Every study run compiles for AVX2 with FMA (what these machines share; on the AMD EPYC, the
# default code bit for bit) with XNNPACK, which picks kernels by the host, off. Rows still differ
# across CPUs (docs/evidence.md). Set before JAX starts; the workers inherit it.
STUDY_XLA_FLAGS = ("--xla_cpu_max_isa=AVX2", "--xla_cpu_use_xnnpack=false")


def use_study_xla_flags() -> None:
  """Adds :data:`STUDY_XLA_FLAGS` to ``XLA_FLAGS`` (before JAX's backend starts)."""
  have = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in have}
  add = [f for f in STUDY_XLA_FLAGS if f.split("=")[0] not in names]
  os.environ["XLA_FLAGS"] = " ".join(have + add)


# The CPU extensions XLA:CPU and XNNPACK choose code by (in /proc/cpuinfo's spelling).
ISA_FLAGS = (
  "sse4_2",
  "avx",
  "avx2",
  "fma",
  "avx512f",
  "avx512bw",
  "avx512vl",
  "avx512_vnni",
  "avx512_bf16",
  "amx_bf16",
)


def machine(cpuinfo: str | None = None) -> str:
  """Where a row was made: the CPU model, the ISA extensions that XLA:CPU compiles for, the
  jax and jaxlib versions, and the XLA flags that fix the code (docs/evidence.md: rows are
  bit-for-bit reproducible on one machine, not across CPUs). ``cpuinfo``: the text of
  /proc/cpuinfo (read from there when None and it exists)."""
  import jax
  import jaxlib

  if cpuinfo is None and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  model = platform.processor() or platform.machine()
  flags: set = set()
  if cpuinfo:
    first = cpuinfo.split("\n\n")[0].splitlines()
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first if ":" in ln)}
    model = info.get("model name", model)
    flags = set(info.get("flags", "").split())
  isa = " ".join(f for f in ISA_FLAGS if f in flags) or "unknown ISA"
  xla = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith(REPRODUCIBLE_PREFIXES)]
  return "; ".join([model, isa, f"jax {jax.__version__} jaxlib {jaxlib.__version__}", *xla])


def _die_with(parent: int) -> None:
  """Ends this worker when the runner ends, however it ends (SIGKILL included): Linux sends
  it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), and a watchdog thread exits it
  within a second of its parent changing, where that is not available. Nothing is written
  to the run directory after the runner is gone."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent:  # the runner died before the line above
    os._exit(1)

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, daemon=True).start()


def _init_worker(cores, parent):
  """Dies with the runner; one core per worker (XLA:CPU sizes its threads by usable CPUs)."""
  _die_with(parent)
  use_study_xla_flags()
  os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"  # (set by the line above)
  if cores is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores.get()})


class RunnerLock:
  """One runner at a time on a records file and on a workdir: an exclusive ``flock`` on
  ``<records>.lock`` and ``<workdir>/.study.lock``, each holding the owner's pid. The kernel
  drops a lock with its process, so a lock file left by a dead runner is taken over (and
  said so); one held by a live runner is a RuntimeError naming it."""

  def __init__(self, records: str, workdir: str):
    self.files, wd_lock = [], os.path.join(workdir, ".study.lock")
    for path, what in ((records + ".lock", "--records"), (wd_lock, "--workdir")):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      f = open(path, "a+")
      f.seek(0)
      owner = f.read().strip()
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        f.close()
        self.release()
        target = records if what == "--records" else workdir
        raise RuntimeError(
          f"another study runner (pid {owner or '?'}) is using {what} {target}; wait for it "
          f"to finish, stop it, or give this one another {what}."
        ) from None
      if owner and owner != str(os.getpid()):
        msg = f"study: taking over the lock {path} of runner pid {owner}, which is gone."
        print(msg, file=sys.stderr, flush=True)
      f.truncate(0)  # ("a+": the write lands at the end, now 0)
      f.write(str(os.getpid()))
      f.flush()
      self.files.append(f)

  def release(self) -> None:
    for f in self.files:
      f.close()  # (closing the file drops the flock)
    self.files = []


def _failed(job: tuple, e: BaseException) -> RuntimeError:
  task, method, phase, seed, setting, *_ = job
  return RuntimeError(
    f"study: the {phase} run of {method} on {task} (seed {seed}, setting "
    f"{json.dumps(setting, sort_keys=True)}) failed: {type(e).__name__}: {e}. The rows of the "
    "runs that finished are kept; fix the cause and rerun the same command to resume."
  )


class Study:
  """Runs jobs that have no row yet, appending each row as it finishes."""

  def __init__(self, records: str, workdir: str, workers: int, quick: bool, trainer=train_one):
    self.path, self.workdir, self.workers, self.quick = records, workdir, workers, quick
    self.rows, self.trainer, self.costs, self.family = spec.read_records(records), trainer, {}, ""
    self.grow_limit = 1 if quick else spec.MAX_EXTENSIONS

  def _results(self, jobs: list):
    """Each job's row as it ends. A job that raises cancels the jobs not yet started; the
    running ones finish (their rows are kept), then a RuntimeError names the job."""
    if self.workers <= 1:
      for j in jobs:
        try:
          yield self.trainer(j)
        except Exception as e:  # noqa: BLE001
          raise _failed(j, e) from e
      return
    ctx = multiprocessing.get_context("spawn")
    cores = ctx.Queue()
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    for i in range(self.workers):
      cores.put(avail[i % len(avail)])
    failed = None
    with cf.ProcessPoolExecutor(self.workers, ctx, _init_worker, (cores, os.getpid())) as pool:
      futures = {pool.submit(self.trainer, j): j for j in jobs}
      for f in cf.as_completed(futures):
        if not f.cancelled() and f.exception() is None:
          yield f.result()
        elif not f.cancelled():
          failed = failed or (futures[f], f.exception())
          for g in futures:
            g.cancel()
    if failed:
      raise _failed(*failed) from failed[1]

  def run(self, jobs: list) -> None:
    """``jobs``: (task, method, phase, seed, setting) tuples; one row each, kept as it ends."""
    todo = list({spec.key_of(*j): j for j in jobs if spec.key_of(*j) not in self.rows}.values())
    self._warn_of_straddles(todo)
    tag = lambda st: "_".join(f"{k}={v}" for k, v in sorted(st.items())) or "base"
    path = lambda j: os.path.join(self.workdir, *j[:3], tag(j[4]), f"seed{j[3]}")
    for row in self._results([(*j, self.family, self.quick, path(j)) for j in todo]):
      m = spec.method_of(row["method"], self.family, spec.task_of(row["task"]))
      cost = self.costs.get(row["task"], {}).get(row["method"], float("nan"))
      row.update(passes=m.passes, step_cost=cost)
      row["machine"] = row.get("machine") or machine()  # (a worker's row names its own)
      self.rows[spec.key_of(*[row[k] for k in spec.COLUMNS[:4]], json.loads(row["setting"]))] = row
      _append(self.path, row)

  def _warn_of_straddles(self, jobs: list) -> None:
    """A warning before a final run whose seed's other final rows ran on another machine
    kind: its pairs would straddle kinds (a run moves across CPUs as across seeds), and the
    report would compare them unpaired."""
    here = spec.machine_kind(machine())
    for task, method, phase, seed, _ in jobs:
      if phase != "final":
        continue
      kinds = {
        spec.machine_kind(r["machine"])
        for r in self.rows.values()
        if (r["task"], r["phase"], r["seed"]) == (task, "final", seed) and r["machine"]
      }
      if kinds - {here}:
        logging.warning(
          "%s/%s seed %d runs on %s, but this seed's other final rows ran on %s: its pairs "
          "will straddle machine kinds (compared unpaired in the report).",
          task,
          method,
          seed,
          here,
          "; ".join(sorted(kinds - {here})),
        )

  def tune(self, task: str, axes: dict, base: dict | None = None) -> dict:
    """Tunes ``{method: [(key, values), ...]}`` (on top of ``base``, whose values each setting
    records); returns the chosen settings, each axis extended outward (up to
    ``spec.MAX_EXTENSIONS`` times) while its choice sits at an edge."""
    axes = {m: [(k, list(v)) for k, v in ax] for m, ax in axes.items()}
    base = base or {}
    grown = {(m, k): 0 for m, ax in axes.items() for k, _ in ax}
    prod = lambda ax: itertools.product(*dict(ax).values())
    while True:
      grids = {m: [{**base, **dict(zip(dict(ax), v))} for v in prod(ax)] for m, ax in axes.items()}
      self.run(
        [(task, m, "tune", s, st) for m, g in grids.items() for st in g for s in spec.TUNE_SEEDS]
      )
      chosen, more = {}, False
      for m, g in grids.items():
        chosen[m] = spec.select(self.rows, task, m, g)
        for k, vals in axes[m]:
          i = vals.index(chosen[m][k])
          if len(vals) > 1 and i in (0, len(vals) - 1) and grown[m, k] < self.grow_limit:
            r = vals[1] / vals[0]
            vals.insert(0 if i == 0 else i + 1, spec.tidy(vals[0] / r if i == 0 else vals[i] * r))
            grown[m, k], more = grown[m, k] + 1, True
      if not more:
        return chosen


def tuning_axes(task_name: str, method: str, family: str, quick: bool, lr=None) -> list:
  """A method's tuning axes: the learning rate (``spec.LR_FACTORS`` around ``lr``, the config's where
  None; none for an ablation) and its own strength."""
  task = spec.task_of(task_name)
  m = spec.method_of(method, family, task)
  if not m.grid:
    raise ValueError(f"method={method!r} has an empty grid on task {task_name!r}.")
  cut = (lambda v: v[1:3]) if quick else (lambda v: v)
  if method in spec.ABLATIONS or method in spec.ON_TOP_OF:
    return [(m.strength, cut(list(m.grid)))]
  lr = lr or float(make_config(task, "sgd", {}, 0, False).learning_rate)
  return [
    ("learning_rate", cut([spec.tidy(lr * f) for f in spec.LR_FACTORS])),
    (m.strength, cut(list(m.grid))),
  ]


def pilot_family(study: Study) -> str:
  """NRS's noise family for the whole study: :func:`study_spec.pilot_choice` of the pilot (at
  the config's weight decay, which its settings record)."""
  axes = {m: tuning_axes("pilot", m, "", study.quick) for m in spec.PILOT.methods}
  wd = float(make_config(spec.PILOT, "sgd", {}, 0, False).weight_decay)
  chosen = study.tune("pilot", axes, {"weight_decay": wd})
  best = {m: spec.score(study.rows, "pilot", m, chosen[m]) for m in spec.PILOT.methods}
  return spec.pilot_choice(best)


def task_methods(name: str, only=()) -> tuple[tuple, tuple]:
  """``(methods, ablations)`` the runner trains on task ``name``: every declared one, or
  those in ``only`` with what they stand on (the weight-decay methods, whose decay they tune
  at; the method each tunes on top of; NRS under an ablation)."""
  task = spec.TASKS[name]
  ablations = tuple(spec.ABLATIONS) if name == spec.ABLATION_TASK else ()
  if not only:
    return task.methods, ablations
  ablations = tuple(a for a in ablations if a in only)
  need = {*only, *spec.TUNES_WD, *(spec.ON_TOP_OF[m] for m in only if m in spec.ON_TOP_OF)}
  need |= {"nrs"} if ablations else set()
  return tuple(m for m in task.methods if m in need), ablations


def tune_task(study: Study, name: str, family: str, only=()) -> dict:
  """The task's chosen settings. First the weight-decay methods (SGD and SGD 2x, or AdamW)
  tune learning rate x weight decay; then every other method tunes learning rate x its own
  strength at the first one's weight decay (on the transformers around AdamW's learning
  rate); each ablation then retunes the radius at NRS's chosen learning rate and decay.
  ``only``: a subset of the methods (:func:`task_methods`)."""
  task, quick = spec.TASKS[name], study.quick
  methods, ablations = task_methods(name, only)
  study.family = family
  first = [m for m in methods if m in spec.TUNES_WD]
  chosen = study.tune(name, {m: tuning_axes(name, m, family, quick) for m in first})
  wd = chosen[first[0]]["weight_decay"]
  lr = chosen[first[0]]["learning_rate"] if task.kind == "transformer" else None
  later = [m for m in methods if m in spec.ON_TOP_OF]
  rest = {m: tuning_axes(name, m, family, quick, lr) for m in methods if m not in (*first, *later)}
  chosen.update(study.tune(name, rest, {"weight_decay": wd}))
  for m in later:  # the strength alone, at the other method's chosen setting
    chosen.update(
      study.tune(name, {m: tuning_axes(name, m, family, quick)}, chosen[spec.ON_TOP_OF[m]])
    )
  if ablations:
    base = {k: v for k, v in chosen["nrs"].items() if k != "nrs.radius"}
    chosen.update(
      study.tune(name, {a: tuning_axes(name, a, family, quick) for a in ablations}, base)
    )
  return chosen


def run_reuse_pilot(study: Study, family: str) -> None:
  """The reuse pilot's runs (``spec.REUSE_PILOTS``): every candidate, full NRS and SGD at the
  declared setting, on each pilot seed; a tuning-phase row each (no measures)."""
  study.family = family
  study.run(
    [
      (task, m, "tune", s, setting)
      for task, (_, setting) in spec.REUSE_PILOTS.items()
      for m in spec.REUSE_PILOT_METHODS
      for s in spec.REUSE_PILOT_SEEDS
    ]
  )


def run_task(study: Study, name: str, family: str, only=()) -> dict:
  """Tunes every method of a task (or ``only`` some, :func:`task_methods`), times each one's
  step at its chosen setting, trains the final seeds (the ablations on the first 10 of them);
  returns the chosen settings. Under ``only`` the step costs are the stored ones: methods are
  timed side by side when the whole task runs."""
  task = spec.TASKS[name]
  methods, ablations = task_methods(name, only)
  chosen = tune_task(study, name, family, only)
  study.costs[name] = stored_costs(name) if only else step_costs(name, family, chosen, study.quick)
  seeds = spec.final_seeds(task, study.quick)
  study.run([(name, m, "final", s, chosen[m]) for m in methods for s in seeds])
  seeds = spec.final_seeds(task, study.quick, ablation=True)
  study.run([(name, a, "final", s, chosen[a]) for a in ablations for s in seeds])
  return chosen


COSTS = os.path.join(os.path.dirname(__file__), "results", "study_step_costs.json")


def timing_batch(config, ds) -> dict:
  """The first batch of the training split (and of the unlabeled one, which only the methods
  in ``experiments.steps.SEMI`` read): what a step is timed on."""
  import jax

  b = config.batch_size
  batch = {"x": ds.train.x[:b], "y": ds.train.y[:b], "idx": jax.numpy.arange(b)}
  if ds.unlabeled is not None:
    batch["u"] = ds.unlabeled.x[: config.unlabeled_batch_size]
  return batch


def run_of_steps(config, ds, batch, n: int) -> tuple:
  """``(fn, args)``: ``n`` steps of ``config``'s method on ``batch`` as training runs them (its
  own step or its cheap one, chosen on the host as train.py does), from its initial state."""
  import jax

  from experiments import optimizers
  from experiments import steps
  from experiments import train

  model = train.Model(config, ds)
  tx = optimizers.make_optimizer(config, 1000, len(ds.train.y), ds.num_classes)
  own = jax.jit(steps.make_step(config.method, model.apply, tx, config, steps_per_epoch=10))
  cheap = jax.jit(steps.make_cheap_step(config.method, model.apply, tx, config))
  schedule = [own if steps.runs_own_step(config, i) else cheap for i in range(n)]

  def run(params, bs, opt_state):
    for i, step in enumerate(schedule):
      params, bs, opt_state, _ = step(params, bs, opt_state, batch, jax.random.key(i))
    return params

  return run, (model.params, model.batch_stats, tx.init(model.params))


def _timings(path: str) -> dict:
  """Every task's step costs as last timed (``task -> method -> cost``)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def stored_costs(name: str, path: str = COSTS) -> dict:
  """Task ``name``'s step costs as last timed (empty where it never was)."""
  return _timings(path).get(name, {})


def step_costs(name: str, family: str, chosen: dict, quick: bool, path: str = COSTS) -> dict:
  """Each method's time per step over a run of steps at its chosen setting, over the first
  method's (SGD or AdamW), timed side by side once and kept. A random-half method runs its
  own step or a plain one as training does, so its cost is measured, not computed."""
  stored = {} if quick else _timings(path)
  names = [m for m in chosen if m in spec.task_of(name).methods or m in spec.ABLATIONS]
  if name in stored and set(names) <= set(stored[name]):
    return stored[name]  # (a method added later: every method is timed again, side by side)
  from experiments import timing
  from experiments import train

  task = spec.TASKS[name]
  base = make_config(task, "sgd", {}, 0, quick)
  ds = train.load_data(base)
  batch = timing_batch(base, ds)
  n = 4 if quick else 32
  fns = {
    m: run_of_steps(make_config(task, m, chosen[m], 0, quick, family), ds, batch, n) for m in names
  }
  secs = timing.interleaved_medians(fns, 3 if quick else 15)
  out = {m: round(secs[m] / secs[names[0]], 3) for m in names}
  if not quick:  # (closed at once, so that a worker started next reads it whole)
    with open(path, "w") as f:
      json.dump({**stored, name: out}, f, indent=1, sort_keys=True)
  return out


def main(argv):
  del argv
  use_study_xla_flags()  # (nothing has started JAX's backend yet)
  from experiments import study_report

  extra = ("pilot", "reuse_pilot")
  unknown = [t for t in FLAGS.tasks if t not in (*spec.TASKS, *extra)]
  if unknown:
    raise ValueError(f"--tasks: {unknown} not known; choose from {[*extra, *spec.TASKS]}.")
  tasks = [t for t in FLAGS.tasks if t not in extra] if FLAGS.tasks else list(spec.TASKS)
  declared = {m for t in tasks for m in (*spec.TASKS[t].methods, *task_methods(t)[1])}
  if set(FLAGS.methods) - declared:
    raise ValueError(
      f"--methods: {sorted(set(FLAGS.methods) - declared)} not declared on the tasks run "
      f"({', '.join(tasks)}); choose from {sorted(declared)}."
    )
  for name in tasks:  # an unknown method or an empty grid fails before anything trains
    for m in [*spec.TASKS[name].methods, *spec.ABLATIONS]:
      tuning_axes(name, m, "absolute", False)
  # (the report only reads the records: it may run beside a runner)
  lock = None if FLAGS.report_only else RunnerLock(FLAGS.records, FLAGS.workdir)
  study = Study(FLAGS.records, FLAGS.workdir, FLAGS.workers, FLAGS.quick)
  if lock is not None:
    try:
      family = pilot_family(study)
      if "reuse_pilot" in FLAGS.tasks:
        run_reuse_pilot(study, family)
      for name in tasks:
        run_task(study, name, family, FLAGS.methods)
    finally:
      lock.release()
    if FLAGS.train_only:
      return
  study_report.write(study.rows, tasks, FLAGS.report, FLAGS.quick)
  print(open(FLAGS.report).read())


if __name__ == "__main__":
  from experiments import study  # one module object, which the pool's workers import too

  study.define_flags()
  if {"-h", "--help", "-help", "--helpshort"} & set(sys.argv[1:]):  # absl would exit 1
    print(__doc__.strip() + "\n\nflags:\n" + FLAGS.module_help(study))
    sys.exit(0)
  app.run(study.main)
