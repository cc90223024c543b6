"""The evidence study: every method tuned the same way, paired final seeds, one report.

  python -m experiments.study --workdir workdir/study     # train (or resume), then report
  python -m experiments.study --report_only              # the report from the records alone

On each task every method tunes a grid of the same size (image tasks: the learning rate x its
own strength; transformers: AdamW's learning rate x weight decay, the others their strength on
top of AdamW's choice), scored by the mean validation value over the tuning seeds. A chosen
value at an edge of its axis extends that axis outward, up to twice. The chosen settings then
train on the final seeds, disjoint from the tuning seeds and shared by every method (same
initialisation, data order and split), so that differences are paired. NRS's noise family is
chosen first, on a pilot task outside the tables. Every run is one row of ``--records``: a run
with a row is never trained again, and the report (study_report.py) is written from them alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import importlib
import itertools
import json
import math
import multiprocessing
import os
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", "workdir/study", "Where the runs train (checkpoints).")
  flags.DEFINE_string("records", "experiments/results/study_runs.csv", "One row per run.")
  flags.DEFINE_string("report", "experiments/RESULTS_STUDY.md", "The report to write.")
  flags.DEFINE_list("tasks", [], "A declared subset of tasks (default: all, in order).")
  flags.DEFINE_integer("workers", 2, "Runs in parallel (one CPU core each).")
  flags.DEFINE_bool("quick", False, "Two epochs, two values per axis (the test suite's runs).")
  flags.DEFINE_bool("report_only", False, "Write the report from the records; train nothing.")
  flags.DEFINE_bool("train_only", False, "Train (or resume) and stop before the report.")


@dataclasses.dataclass(frozen=True)
class Method:
  harness: str  # the experiments.methods step
  strength: str  # the config key it tunes
  grid: tuple  # the strength's base grid (geometric: extensions continue its ratio)
  passes: float  # forward/backward passes per step
  fixed: dict = dataclasses.field(default_factory=dict)


FAMILIES = {"absolute": (0.0125, 0.025, 0.05, 0.1), "filter": (0.125, 0.25, 0.5, 1.0)}
CHEAP = {"nrs.neighbor_batch_size": 0.25, "nrs.stop_gradient_center": True}  # B/4, fixed centre
METHODS = {
  "sgd": Method("sgd", "weight_decay", (1.25e-4, 5e-4, 2e-3, 8e-3), 1.0),
  "sam": Method("sam", "sam.rho", (0.1, 0.2, 0.4, 0.8), 2.0),
  "asam": Method("asam", "asam.rho", (0.25, 0.5, 1.0, 2.0), 2.0),
  "sam_half": Method("sam", "sam.rho", (0.2, 0.4, 0.8, 1.6), 1.5, {"sam.probability": 0.5}),
  "saf": Method("saf", "saf.lam", (1.0, 2.0, 4.0, 8.0), 1.0),
  "mesa": Method("mesa", "mesa.lam", (0.5, 1.0, 2.0, 4.0), 1.5),
  "nrs": Method("nrs", "nrs.radius", (), 2.0),  # its grid: the pilot's noise family
  "nrs_cheap": Method("nrs", "nrs.radius", (), 1.5, CHEAP),
  "adamw": Method("sgd", "weight_decay", (0.01, 0.03, 0.1, 0.3), 1.0),  # the task's AdamW
}
# On the transformers (on top of AdamW's choice): below the previous study's low edges.
TRANSFORMER_GRIDS = {"sam": (0.0025, 0.005, 0.01, 0.02), "nrs": 0.1, "nrs_cheap": 0.1}
# Ablations of NRS at its chosen setting, one option changed, on the final seeds.
ABLATIONS = {
  **{f"nrs_k{k}": {"nrs.num_neighbors": k} for k in (2, 4, 8)},
  **{f"nrs_alpha{a:g}": {"nrs.alpha": a} for a in (0.25, 4.0)},
  **{f"nrs_{d}": {"nrs.divergence": d} for d in ("reverse_kl", "symmetric_kl", "js")},
  "nrs_max_k4": {"nrs.num_neighbors": 4, "nrs.aggregation": "max"},
}
IMAGE = ("sgd", "sam", "asam", "sam_half", "saf", "mesa", "nrs", "nrs_cheap")
TRANSFORMER = ("adamw", "sam", "nrs", "nrs_cheap")


@dataclasses.dataclass(frozen=True)
class Task:
  config: str
  overrides: dict
  methods: tuple
  final_seeds: int
  metric: str = "accuracy"  # or "bits_per_char" (lower is better)
  num_classes: int = 10


# mnist1d, 5,750 samples: 1,150 to test, 1,000 to validate, 3,600 to train (the default's).
_M1D = {"mnist1d_samples": 5750, "validation_fraction": 1000 / 4600, "num_epochs": 100}
TASKS = {
  "mnist1d_mlp": Task("default", _M1D, IMAGE, 10),
  "mnist1d_mlp_noise20": Task("default", {**_M1D, "label_noise": 0.2}, IMAGE, 10),
  "mnist1d_cnn": Task("mnist1d_cnn", {**_M1D, "num_epochs": 60}, IMAGE, 10),
  # 5,000 real MNIST digits: 1,000 test, 1,000 clean validation, 3,000 to train (20% flipped).
  "mnist5k_cnn_noise20": Task(
    "mnist1d_cnn",
    {
      "dataset": "mnist5k",
      "model": "cnn",
      "model_kwargs": {"channels": (16, 32), "kernel": 3},
      "validation_fraction": 0.25,
      "label_noise": 0.2,
      "num_epochs": 20,  # one SGD run: about 20 s on one core
    },
    IMAGE,
    10,
  ),
  "mnist1d_vit": Task("mnist1d_vit", {"num_epochs": 30}, TRANSFORMER, 5),
  "stdlib_lm": Task(
    "stdlib_lm", {"num_epochs": 8, "max_examples": 2048}, TRANSFORMER, 5, "bits_per_char", 256
  ),
}
PILOT = Task("default", {**_M1D, "mnist1d_seed": 7}, ("nrs_absolute", "nrs_filter"), 0)
ABLATION_TASK = "mnist1d_mlp"
TUNE_SEEDS, FINAL_SEED0 = (0, 1), 100
LR_FACTORS = (0.5, 1.0, 2.0)
COLUMNS = "task method phase seed setting metric val test diverged step_cost passes seconds"
COLUMNS = tuple(COLUMNS.split())


def task_of(name: str) -> Task:
  return PILOT if name == "pilot" else TASKS[name]


def method_of(name: str, family: str = "", task: Task | None = None) -> Method:
  """A method by name on a task: METHODS, an ablation of nrs, or the pilot's ``nrs_<family>``;
  nrs and nrs_cheap perturb with ``family``'s scale (its grid a decade lower on transformers)."""
  if name in ABLATIONS:
    k = ABLATIONS[name].get("nrs.num_neighbors", 1)
    return dataclasses.replace(method_of("nrs", family, task), passes=1.0 + k, grid=())
  if name.removeprefix("nrs_") in FAMILIES:
    name, family = "nrs", name.removeprefix("nrs_")
  if name not in METHODS:
    raise ValueError(f"method={name!r} is not known: choose from {[*METHODS, *ABLATIONS]}.")
  m = METHODS[name]
  if name.startswith("nrs"):
    if family not in FAMILIES:
      raise ValueError(f"NRS needs a noise family from {list(FAMILIES)}, got {family!r}.")
    m = dataclasses.replace(m, grid=FAMILIES[family], fixed={**m.fixed, "nrs.scale": family})
  if task is not None and task.methods == TRANSFORMER and name in TRANSFORMER_GRIDS:
    g = TRANSFORMER_GRIDS[name]
    m = dataclasses.replace(m, grid=tuple(_tidy(v * g) for v in m.grid) if g == 0.1 else g)
  return m


def make_config(task: Task, method: str, setting: dict, seed: int, quick: bool, family=""):
  """The run's config: the task's, the method's fixed values, then the tuned ones."""
  config = importlib.import_module(f"experiments.configs.{task.config}").get_config()
  m = method_of(method, family, task)
  with config.unlocked():
    config.compare_methods, config.seed, config.progress = (), seed, False
    config.method = m.harness
    values = {**task.overrides, **m.fixed, **ABLATIONS.get(method, {}), **setting}
    for key, v in values.items():
      if key == "nrs.neighbor_batch_size" and isinstance(v, float):
        v = int(config.batch_size * v)
      *path, last = key.split(".")
      obj = config
      for p in path:
        obj = obj[p]
      obj[last] = v
    config.eval_every_epochs = max(config.num_epochs // 2, 1)  # only the last one counts
    config.checkpoint_every_steps = 100_000
    config.hessian = dict(num_examples=0, batch_size=64, num_iters=0, num_samples=0, every_evals=0)
    if quick:
      config.num_epochs, config.eval_every_epochs = 2, 1
      config.max_examples = min(config.get("max_examples") or 512, 512)
  return config


def key_of(task, method, phase, seed, setting) -> tuple:
  return (task, method, phase, int(seed), json.dumps(setting, sort_keys=True))


def read_records(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if rows and tuple(rows[0]) != COLUMNS:
    raise ValueError(f"{path} has columns {tuple(rows[0])}, expected {COLUMNS}.")
  out = {}
  for r in rows:
    for k in ("val", "test", "step_cost", "passes", "seconds"):
      r[k] = float(r[k])
    r["seed"], r["diverged"] = int(r["seed"]), int(r["diverged"])
    out[key_of(r["task"], r["method"], r["phase"], r["seed"], json.loads(r["setting"]))] = r
  return out


def _append(path: str, row: dict) -> None:
  new = not os.path.exists(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, COLUMNS, lineterminator="\n")
    if new:
      w.writeheader()
    w.writerow({k: row[k] for k in COLUMNS})


def chance(task: Task) -> float:
  """The value a diverged run is counted at: 1/C accuracy, or 8 bits per character."""
  return math.log2(task.num_classes) if task.metric == "bits_per_char" else 1.0 / task.num_classes


def train_one(job: tuple) -> dict:
  """Worker: trains one run and returns its row; a non-finite loss or a chance-level
  validation score is a divergence, counted at :func:`chance` (test data never decides)."""
  task_name, method, phase, seed, setting, family, quick, workdir = job
  from experiments import train

  task = task_of(task_name)
  config = make_config(task, method, setting, seed, quick, family)
  t0 = time.process_time()
  try:
    rec = train.train_and_evaluate(config, workdir)
  except FloatingPointError:
    rec = {}
  nan = float("nan")
  if task.metric == "bits_per_char":
    val, test = (rec.get(k, nan) / math.log(2) for k in ("val_loss", "test_loss"))
    bad = not (math.isfinite(val) and val <= chance(task))
  else:
    val, test = rec.get("val_accuracy", nan), rec.get("test_accuracy", nan)
    bad = not (math.isfinite(val) and val >= 2.0 / task.num_classes)
  bad = bad or not math.isfinite(rec.get("train_loss", nan))
  if bad:
    val = test = chance(task)
  row = dict(task=task_name, method=method, phase=phase, seed=seed, metric=task.metric)
  row.update(setting=json.dumps(setting, sort_keys=True), val=val, test=test, diverged=int(bad))
  return {**row, "seconds": time.process_time() - t0}


def _init_worker(cores):
  """One core per worker: XLA:CPU sizes its thread pool from the CPUs it may use."""
  flag = " --xla_cpu_multi_thread_eigen=false"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flag).strip()
  if cores is not None and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores.get()})


class Study:
  """Runs jobs that have no row yet, appending each row as it finishes."""

  def __init__(self, records: str, workdir: str, workers: int, quick: bool, trainer=train_one):
    self.path, self.workdir, self.workers, self.quick = records, workdir, workers, quick
    self.rows, self.trainer, self.costs, self.family = read_records(records), trainer, {}, ""
    self.grow_limit = 1 if quick else 2

  def _results(self, jobs: list):
    if self.workers <= 1:
      yield from map(self.trainer, jobs)
      return
    ctx = multiprocessing.get_context("spawn")
    cores = ctx.Queue()
    avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    for i in range(self.workers):
      cores.put(avail[i % len(avail)])
    with cf.ProcessPoolExecutor(self.workers, ctx, _init_worker, (cores,)) as pool:
      for f in cf.as_completed([pool.submit(self.trainer, j) for j in jobs]):
        yield f.result()

  def run(self, jobs: list) -> None:
    """``jobs``: (task, method, phase, seed, setting) tuples; one row each, kept as it ends."""
    todo = list({key_of(*j): j for j in jobs if key_of(*j) not in self.rows}.values())
    tag = lambda st: "_".join(f"{k}={v}" for k, v in sorted(st.items())) or "base"
    path = lambda j: os.path.join(self.workdir, *j[:3], tag(j[4]), f"seed{j[3]}")
    for row in self._results([(*j, self.family, self.quick, path(j)) for j in todo]):
      m = method_of(row["method"], self.family, task_of(row["task"]))
      cost = self.costs.get(row["task"], {}).get(row["method"], float("nan"))
      row.update(passes=m.passes, step_cost=cost)
      self.rows[key_of(*[row[k] for k in COLUMNS[:4]], json.loads(row["setting"]))] = row
      _append(self.path, row)

  def tune(self, task: str, axes: dict, base: dict | None = None) -> dict:
    """Tunes ``{method: [(key, values), ...]}`` (on top of ``base``); returns the chosen
    settings, each axis extended outward (up to twice) while its choice sits at an edge."""
    axes = {m: [(k, list(v)) for k, v in ax] for m, ax in axes.items()}
    grown = {(m, k): 0 for m, ax in axes.items() for k, _ in ax}
    while True:
      grids = {
        m: [
          {**(base or {}), **dict(zip(dict(ax), vs))}
          for vs in itertools.product(*dict(ax).values())
        ]
        for m, ax in axes.items()
      }
      self.run([(task, m, "tune", s, st) for m, g in grids.items() for st in g for s in TUNE_SEEDS])
      chosen, more = {}, False
      for m, g in grids.items():
        chosen[m] = select(self.rows, task, m, g)
        for k, vals in axes[m]:
          i = vals.index(chosen[m][k])
          if len(vals) > 1 and i in (0, len(vals) - 1) and grown[m, k] < self.grow_limit:
            r = vals[1] / vals[0]
            vals.insert(0, _tidy(vals[0] / r)) if i == 0 else vals.append(_tidy(vals[-1] * r))
            grown[m, k], more = grown[m, k] + 1, True
      if not more:
        return chosen


def score(rows: dict, task: str, method: str, setting: dict) -> float:
  """A setting's mean validation value over the tuning seeds (lower-is-better negated)."""
  sign = -1.0 if task_of(task).metric == "bits_per_char" else 1.0
  vals = [rows[key_of(task, method, "tune", s, setting)]["val"] for s in TUNE_SEEDS]
  return sign * sum(vals) / len(vals)


def select(rows: dict, task: str, method: str, settings: list) -> dict:
  """The selection rule of the runner and the report alike: the best score; a tie goes to
  the smallest values (in sorted-key order), whatever order ``settings`` come in."""
  return max(settings, key=lambda st: (score(rows, task, method, st), [-st[k] for k in sorted(st)]))


_tidy = lambda v: float(f"{v:.6g}")  # grid values without binary noise


def _axes(task_name: str, method: str, family: str, quick: bool, with_lr: bool) -> list:
  task = task_of(task_name)
  m = method_of(method, family, task)
  if not m.grid:
    raise ValueError(f"method={method!r} has an empty grid on task {task_name!r}.")
  cut = (lambda v: v[1:3]) if quick else (lambda v: v)
  lr = float(make_config(task, "sgd", {}, 0, False).learning_rate)
  axes = [("learning_rate", cut([_tidy(lr * f) for f in LR_FACTORS]))] if with_lr else []
  return axes + [(m.strength, cut(list(m.grid)))]


def pilot_family(study: Study) -> str:
  """NRS's noise family for the whole study: the pilot's better tuned validation score."""
  chosen = study.tune("pilot", {m: _axes("pilot", m, "", study.quick, True) for m in PILOT.methods})
  best = {m: score(study.rows, "pilot", m, chosen[m]) for m in PILOT.methods}
  return max(PILOT.methods, key=lambda m: best[m]).removeprefix("nrs_")


def run_task(study: Study, name: str, family: str) -> dict:
  """Tunes every method of a task, trains its final seeds (and the ablations); returns
  the chosen settings."""
  task, study.family = TASKS[name], family
  study.costs[name] = step_costs(name, family, study.quick)
  axes = lambda m, lr: _axes(name, m, family, study.quick, lr)
  if task.methods == TRANSFORMER:
    chosen = study.tune(name, {"adamw": axes("adamw", True)})
    chosen.update(study.tune(name, {m: axes(m, False) for m in TRANSFORMER[1:]}, chosen["adamw"]))
  else:
    chosen = study.tune(name, {m: axes(m, True) for m in task.methods})
  seeds = final_seeds(task, study.quick)
  study.run([(name, m, "final", s, chosen[m]) for m in task.methods for s in seeds])
  if name == ABLATION_TASK:
    study.run([(name, a, "final", s, chosen["nrs"]) for a in ABLATIONS for s in seeds])
  return chosen


def final_seeds(task: Task, quick: bool) -> list:
  return list(range(FINAL_SEED0, FINAL_SEED0 + (2 if quick else task.final_seeds)))


COSTS = os.path.join(os.path.dirname(__file__), "results", "study_step_costs.json")


def step_costs(name: str, family: str, quick: bool, path: str = COSTS) -> dict:
  """Each method's step time / the first method's, timed side by side once and kept."""
  stored = json.load(open(path)) if os.path.exists(path) and not quick else {}
  if name in stored:
    return stored[name]
  import jax

  from experiments import methods as harness
  from experiments import timing
  from experiments import train

  task = TASKS[name]
  base = make_config(task, "sgd", {}, 0, quick)
  ds = train.load_data(base)
  b = base.batch_size
  batch = {"x": ds.train.x[:b], "y": ds.train.y[:b], "idx": jax.numpy.arange(b)}
  names = [*task.methods, *(ABLATIONS if name == ABLATION_TASK else ())]
  fns, probs = {}, {}
  for m in names:
    meth = method_of(m, family, task)
    mid = {meth.strength: meth.grid[len(meth.grid) // 2]} if meth.grid else {}
    config = make_config(task, m, mid, 0, quick, family)
    model = train.Model(config, ds)
    tx = harness.make_optimizer(config, 1000, len(ds.train.y), ds.num_classes)
    step = jax.jit(harness.make_step(config.method, model.apply, tx, config, steps_per_epoch=10))
    args = (model.params, model.batch_stats, tx.init(model.params), batch, jax.random.key(0))
    fns[m] = (step, args)
    probs[m] = harness.step_probability(config)
  secs = timing.interleaved_medians(fns, 3 if quick else 30)
  ref = secs[names[0]]
  out = {m: round((p * secs[m] + (1 - p) * ref) / ref, 3) for m, p in probs.items()}
  if not quick:  # (closed at once, so that a worker started next reads it whole)
    with open(path, "w") as f:
      json.dump({**stored, name: out}, f, indent=1, sort_keys=True)
  return out


def main(argv):
  del argv
  from experiments import study_report

  unknown = [t for t in FLAGS.tasks if t not in TASKS]
  if unknown:
    raise ValueError(f"--tasks: {unknown} not known; choose from {list(TASKS)}.")
  tasks = FLAGS.tasks or list(TASKS)
  for name in tasks:  # an unknown method or an empty grid fails before anything trains
    [_axes(name, m, "absolute", False, True) for m in TASKS[name].methods]
  study = Study(FLAGS.records, FLAGS.workdir, FLAGS.workers, FLAGS.quick)
  if not FLAGS.report_only:
    family = pilot_family(study)
    for name in tasks:
      run_task(study, name, family)
    if FLAGS.train_only:
      return
  study_report.write(study.rows, tasks, FLAGS.report, FLAGS.quick, declared=bool(FLAGS.tasks))
  print(open(FLAGS.report).read())


if __name__ == "__main__":
  from experiments import study  # one module object: the report imports it too

  study.define_flags()
  app.run(study.main)
