"""The study's declarations, shared by the runner (study.py) and the report (study_report.py):
tasks, methods and their grids, seeds, the records' columns, and the selection rules (a
setting's score, the chosen setting, the pilot's noise family)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os


def tidy(v: float) -> float:
  """A grid value without binary noise (six significant digits)."""
  return float(f"{v:.6g}")


def _check_grid(owner: str, field: str, grid) -> None:
  if not isinstance(grid, tuple) or not all(
    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in grid
  ):
    raise ValueError(f"{owner}.{field}={grid!r} must be a tuple of positive numbers.")


@dataclasses.dataclass(frozen=True)
class Method:
  harness: str  # the experiments.steps method it runs
  strength: str  # the config key it tunes
  grid: tuple  # the strength's base grid (geometric: extensions continue its ratio)
  passes: float  # forward/backward passes per run, in units of one SGD run's
  fixed: dict = dataclasses.field(default_factory=dict)
  epochs: int = 1  # times the task's epochs (sgd_2x: the passes of SAM and NRS as SGD steps)
  unlabeled: bool = False  # its passes are over the labelled and unlabeled batches together
  # On the transformer tasks (at AdamW's weight decay): a grid that replaces ``grid``, or a
  # factor on it (the NRS family's radii, a decade lower); neither: the base grid.
  transformer_grid: tuple = ()
  transformer_scale: float = 1.0

  def __post_init__(self):
    _check_grid(f"Method({self.harness!r})", "grid", self.grid)
    _check_grid(f"Method({self.harness!r})", "transformer_grid", self.transformer_grid)
    scale = self.transformer_scale
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
      raise ValueError(f"Method({self.harness!r}).transformer_scale={scale!r} must be > 0.")

  def on(self, kind: str) -> Method:
    """This method's grid on a task of ``kind``."""
    if kind != "transformer":
      return self
    if self.transformer_grid:
      return dataclasses.replace(self, grid=self.transformer_grid)
    return dataclasses.replace(
      self, grid=tuple(tidy(v * self.transformer_scale) for v in self.grid)
    )


FAMILIES = {"absolute": (0.0125, 0.025, 0.05, 0.1), "filter": (0.125, 0.25, 0.5, 1.0)}
CHEAP = {"nrs.neighbor_batch_size": 0.25, "nrs.stop_gradient_center": True}  # B/4, fixed centre
B8 = {"nrs.neighbor_batch_size": 0.125, "nrs.stop_gradient_center": True}  # B/8, fixed centre
HALF = {"nrs.probability": 0.5, "nrs.implementation": "loss"}  # full NRS on a random half
WD = (1.25e-4, 5e-4, 2e-3, 8e-3)
METHODS = {
  "sgd": Method("sgd", "weight_decay", WD, 1.0),
  "sgd_2x": Method("sgd", "weight_decay", WD, 2.0, epochs=2),
  "sam": Method(
    "sam", "sam.rho", (0.1, 0.2, 0.4, 0.8), 2.0, transformer_grid=(0.0025, 0.005, 0.01, 0.02)
  ),
  "asam": Method("asam", "asam.rho", (0.25, 0.5, 1.0, 2.0), 2.0),
  # LookSAM (k = 5, alpha 0.7): SAM's grids, a SAM step every fifth step.
  "looksam": Method(
    "looksam",
    "looksam.rho",
    (0.1, 0.2, 0.4, 0.8),
    1.2,
    transformer_grid=(0.0025, 0.005, 0.01, 0.02),
  ),
  "sam_half": Method("sam", "sam.rho", (0.2, 0.4, 0.8, 1.6), 1.5, {"sam.probability": 0.5}),
  "saf": Method("saf", "saf.lam", (1.0, 2.0, 4.0, 8.0), 1.0),
  "mesa": Method("mesa", "mesa.lam", (0.5, 1.0, 2.0, 4.0), 1.5),
  # Their grid: the pilot's noise family (a decade lower on the transformers).
  "nrs": Method("nrs", "nrs.radius", (), 2.0, transformer_scale=0.1),
  "nrs_cheap": Method("nrs", "nrs.radius", (), 1.5, CHEAP, transformer_scale=0.1),
  "nrs_b8": Method("nrs", "nrs.radius", (), 1.25, B8, transformer_scale=0.1),
  "nrs_half": Method("nrs", "nrs.radius", (), 1.5, HALF, transformer_scale=0.1),
  "adamw": Method("sgd", "weight_decay", (0.01, 0.03, 0.1, 0.3), 1.0),  # the task's AdamW
  # With unlabeled data (consistency weight 1): NRS's radius, VAT's eps, the Pi-model's noise.
  "nrs_unlabeled": Method("nrs_unlabeled", "nrs.radius", (), 2.0, unlabeled=True),
  "vat": Method("vat", "vat.eps", (0.5, 1.0, 2.0, 4.0), 3.0, unlabeled=True),
  # The Pi-model as Laine and Aila's (issue 51): squared error, Gaussian ramp-up, its maximum
  # weight tuned (their 100 at the top), input noise 0.15 fixed.
  "pi_model": Method("pi_model", "pi_model.weight", (12.5, 25.0, 50.0, 100.0), 2.0, unlabeled=True),
  # VAT plus NRS's penalty: the radius tuned on top of VAT's chosen setting (ON_TOP_OF).
  "vat_nrs": Method("vat_nrs", "nrs.radius", (), 4.0, unlabeled=True),
}
# Issue 52's cheap path: the reuse pilot's choice (NRS_LOOK, below) and full NRS with the
# cheaper Rademacher draw (a declared option of its own distribution: its own rows).
METHODS["nrs_look"] = Method(
  "nrs",
  "nrs.radius",
  (),
  2.0,
  {"nrs.implementation": "transform", "nrs.reuse": "orthogonal", "nrs.refresh_every": 2},
  transformer_scale=0.1,
)  # (its passes: 1 + 2 / 2, the transform's refresh recomputing the centre)
METHODS["nrs_rademacher"] = Method(
  "nrs", "nrs.radius", (), 2.0, {"nrs.noise": "rademacher"}, transformer_scale=0.1
)
# Issue 51 changed ASAM, SAF and the Pi-model; each is re-run on its tasks, its old rows then
# removed. A task listed here keeps the earlier implementation's rows, and the report says so
# (none now: every re-run has landed).
RERUN = {
  "asam": "weights-only rescaling",
  "saf": "no stale targets",
  "pi_model": "Laine and Aila's",
}
OLD_IMPLEMENTATION: dict[str, tuple[str, ...]] = {}
# Methods that tune their strength alone, at another method's chosen setting.
ON_TOP_OF = {"vat_nrs": "vat"}
# The methods that tune the weight decay themselves (first); every other method then tunes at
# the first one's choice (SGD's on the image tasks, AdamW's on the transformers).
TUNES_WD = ("sgd", "sgd_2x", "adamw")
NRS_FAMILY = ("nrs", "nrs_cheap", "nrs_b8", "nrs_half")
# Ablations of NRS, one option changed, each retuning the radius (base grid, at NRS's chosen
# learning rate and weight decay) on the tuning seeds; trained on the first 10 final seeds.
ABLATIONS = {
  **{f"nrs_k{k}": {"nrs.num_neighbors": k} for k in (2, 4, 8)},
  **{f"nrs_alpha{a:g}": {"nrs.alpha": a} for a in (0.25, 4.0)},
  **{f"nrs_{d}": {"nrs.divergence": d} for d in ("reverse_kl", "symmetric_kl", "js")},
  "nrs_max_k4": {"nrs.num_neighbors": 4, "nrs.aggregation": "max"},
}
CHEAP_PATH = ("looksam", "nrs_look", "nrs_rademacher")  # issue 52: declared after the rest
IMAGE = ("sgd", "sgd_2x", "sam", "asam", "sam_half", "saf", "mesa", *NRS_FAMILY, *CHEAP_PATH)
TRANSFORMER = ("adamw", "sam", *NRS_FAMILY, *CHEAP_PATH)
SEMI = ("sgd", "sam", "nrs", "nrs_unlabeled", "vat", "pi_model", "vat_nrs")  # 10% labelled


KINDS = ("image", "transformer", "semi")  # image: SGD's recipe; transformer: AdamW's


@dataclasses.dataclass(frozen=True)
class Task:
  config: str
  overrides: dict
  methods: tuple
  final_seeds: int
  kind: str  # one of KINDS: which recipe and grids its methods use
  metric: str = "accuracy"  # or "bits_per_char" (lower is better)
  num_classes: int = 10
  subject: str = "nrs"  # the method the report pairs every other one with

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Task({self.config!r}).kind={self.kind!r} must be one of {KINDS}.")


# mnist1d, 5,750 samples: 1,150 to test, 1,000 to validate, 3,600 to train (the default's).
_M1D = {"mnist1d_samples": 5750, "validation_fraction": 1000 / 4600, "num_epochs": 100}
_CNN5K = {"dataset": "mnist5k", "model": "cnn", "model_kwargs": {"channels": (16, 32), "kernel": 3}}
TASKS = {
  "mnist1d_mlp": Task("default", _M1D, IMAGE, 20, "image"),
  "mnist1d_mlp_noise20": Task("default", {**_M1D, "label_noise": 0.2}, IMAGE, 20, "image"),
  "mnist1d_cnn": Task("mnist1d_cnn", {**_M1D, "num_epochs": 60}, IMAGE, 20, "image"),
  # 5,000 real MNIST digits: 1,000 test, 1,000 clean validation, 3,000 to train (20% flipped).
  "mnist5k_cnn_noise20": Task(  # one SGD run: about 20 s on one core
    "mnist1d_cnn",
    {**_CNN5K, "validation_fraction": 0.25, "label_noise": 0.2, "num_epochs": 20},
    IMAGE,
    20,
    "image",
  ),
  "mnist1d_vit": Task("mnist1d_vit", {"num_epochs": 30}, TRANSFORMER, 10, "transformer"),
  "stdlib_lm": Task(
    "stdlib_lm",
    {"num_epochs": 8, "max_examples": 2048},
    TRANSFORMER,
    10,
    "transformer",
    "bits_per_char",
    256,
  ),
}
# Semi-supervised: 10% of the training labels kept (balanced per class); each step draws 32
# labelled examples and 96 unlabeled ones (the supervised tasks' 128 rows in all).
_SEMI = {"labeled_fraction": 0.1, "batch_size": 32, "unlabeled_batch_size": 96}
TASKS["mnist1d_mlp_semi10"] = Task(
  "default", {**_M1D, **_SEMI, "learning_rate": 0.05}, SEMI, 20, "semi", subject="nrs_unlabeled"
)
TASKS["mnist5k_cnn_semi10"] = Task(
  "mnist1d_cnn",
  {**_CNN5K, **_SEMI, "validation_fraction": 0.25, "learning_rate": 0.05, "num_epochs": 60},
  SEMI,
  20,
  "semi",
  subject="nrs_unlabeled",
)
PILOT = Task("default", {**_M1D, "mnist1d_seed": 7}, ("nrs_absolute", "nrs_filter"), 0, "image")
# The reuse pilot (issue 52): NRS's penalty gradient reused between refreshes, every candidate
# rule at NRS's chosen setting of the clean mnist1d tasks (learning rate, weight decay,
# radius), on the pilot's data, with an MLP and a 1-D CNN (a rule stable on one can diverge
# on the other); full NRS and SGD beside them. Seeds REUSE_PILOT_SEEDS, validation decides.
REUSE = {"nrs.implementation": "transform"}
REUSE_CANDIDATES = {
  **{
    f"look_{rule}_k{k}": {**REUSE, "nrs.reuse": rule, "nrs.refresh_every": k}
    for rule in ("plain", "orthogonal")
    for k in (2, 5, 10)
  },
  **{
    f"look_{rule}_k5_b8": {**REUSE, **B8, "nrs.reuse": rule, "nrs.refresh_every": 5}
    for rule in ("plain", "orthogonal")
  },
  "rademacher": {"nrs.noise": "rademacher"},  # full NRS, the declared cheaper draw
  # (a second round: the centre a fixed target shared with the task pass, so that a refresh
  # costs NRS's two passes, not the transform's three)
  **{
    f"look_{rule}_k{k}_fixed": {
      **REUSE,
      "nrs.reuse": rule,
      "nrs.refresh_every": k,
      "nrs.stop_gradient_center": True,
    }
    for rule in ("plain", "orthogonal")
    for k in (2, 5)
  },
}
REUSE_PILOTS = {
  "reuse_pilot_mlp": (
    Task("default", {**_M1D, "mnist1d_seed": 7}, (), 0, "image"),
    {"learning_rate": 0.4, "weight_decay": 0.002, "nrs.radius": 0.05},
  ),
  "reuse_pilot_cnn": (
    Task("mnist1d_cnn", {**_M1D, "num_epochs": 60, "mnist1d_seed": 7}, (), 0, "image"),
    {"learning_rate": 0.2, "weight_decay": 7.8125e-06, "nrs.radius": 0.05},
  ),
}
REUSE_PILOT_METHODS = ("sgd", "nrs", *(f"nrs_{c}" for c in REUSE_CANDIDATES))
REUSE_PILOT_SEEDS = (0, 1, 2, 3, 4)
# The pilot's choice (reuse_choice over its records: one candidate passed the rule), declared
# once, before any study row of it, and never changed: study method -> pilot candidate.
NRS_LOOK = {"nrs_look": "nrs_look_orthogonal_k2"}
ABLATION_TASK = "mnist1d_mlp"
TUNE_SEEDS, FINAL_SEED0, ABLATION_SEEDS = (0, 1), 100, 10
LR_FACTORS = (0.5, 1.0, 2.0)
MAX_EXTENSIONS = 4  # per axis, while the chosen value sits at an edge
# Each final solution's flatness and calibration (experiments/measures.py): empty on tuning rows.
MEASURES = (
  "lambda_max",
  "hessian_trace",
  "sharpness",
  "neighborhood_kl",
  "test_nll",
  "test_ece",
  "weight_norm",
)
# How far to trust them (rows made before these columns existed hold ""): the Lanczos
# residual, Hutchinson's standard error; and the measures that failed (';'-joined names).
DIAGNOSTICS = ("lanczos_residual", "hessian_trace_se", "failed_measures")
# machine: where the row was made (study.machine(): CPU model, ISA, jax and jaxlib, XLA flags).
COLUMNS = (
  "task",
  "method",
  "phase",
  "seed",
  "setting",
  "metric",
  "val",
  "test",
  "diverged",
  "step_cost",
  "passes",
  "seconds",
  "machine",
  *MEASURES,
  *DIAGNOSTICS,
)


def task_of(name: str) -> Task:
  if name in REUSE_PILOTS:
    return REUSE_PILOTS[name][0]
  return PILOT if name == "pilot" else TASKS[name]


def method_of(name: str, family: str = "", task: Task | None = None) -> Method:
  """A method by name on a task: METHODS, an ablation of nrs, or the pilot's ``nrs_<family>``;
  nrs and nrs_cheap perturb with ``family``'s scale (its grid a decade lower on transformers)."""
  if name in ABLATIONS:
    k = ABLATIONS[name].get("nrs.num_neighbors", 1)
    return dataclasses.replace(method_of("nrs", family, task), passes=1.0 + k)
  if name.removeprefix("nrs_") in REUSE_CANDIDATES:
    fixed = REUSE_CANDIDATES[name.removeprefix("nrs_")]
    k = fixed.get("nrs.refresh_every", 1)
    # A refresh's passes beyond the task's: on a sub-batch its centre and neighbour; with a
    # fixed centre (the task pass's logits) the neighbour's; else the transform recomputes
    # the centre too (its gradient arrives computed). Full NRS (the loss route): one.
    b = fixed.get("nrs.neighbor_batch_size")
    transform = fixed.get("nrs.implementation") == "transform"
    extra = (
      2.0 * b if b else (2.0 if transform and not fixed.get("nrs.stop_gradient_center") else 1.0)
    )
    passes = 1.0 + extra / k
    m = method_of("nrs", family, task)
    return dataclasses.replace(m, passes=passes, fixed={**m.fixed, **fixed})
  if name.removeprefix("nrs_") in FAMILIES:
    name, family = "nrs", name.removeprefix("nrs_")
  if name not in METHODS:
    raise ValueError(f"method={name!r} is not known: choose from {[*METHODS, *ABLATIONS]}.")
  m = METHODS[name]
  if name.startswith("nrs") or name == "vat_nrs":
    if family not in FAMILIES:
      raise ValueError(f"NRS needs a noise family from {list(FAMILIES)}, got {family!r}.")
    m = dataclasses.replace(m, grid=FAMILIES[family], fixed={**m.fixed, "nrs.scale": family})
  if task is not None:
    m = m.on(task.kind)
  if task is not None and m.unlabeled:  # in SGD passes: its batch is (B + U) / B times SGD's
    o = task.overrides
    m = dataclasses.replace(m, passes=m.passes * (1 + o["unlabeled_batch_size"] / o["batch_size"]))
  return m


# The vector ISA classes, widest first: a run's numbers follow the class, not the vendor
# (experiments/isa_check.py: an Intel Xeon and an AMD EPYC with AVX-512 gave the same rows to
# the last digit under the study's flags; an AMD EPYC with AVX2 alone did not).
ISA_CLASSES = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def machine_kind(machine: str) -> str:
  """The kind of machine a row ran on, for pairing: the widest vector ISA class of the machine
  column's ISA field (its CPU model is not part of it); a clear error for a row without one."""
  parts = (machine or "").split("; ")
  if len(parts) < 3 or not parts[0] or not parts[1]:
    raise ValueError(
      f"records: a final row's machine field {machine!r} does not read 'CPU model; ISA; "
      "versions': pairs cannot be matched to machine kinds. Fix or rerun that row."
    )
  isa = parts[1].split()
  return next((name for flag, name in ISA_CLASSES if flag in isa), parts[1])


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
    for k in ("val", "test", "step_cost", "passes", "seconds", *MEASURES, *DIAGNOSTICS[:2]):
      r[k] = float(r[k]) if r[k] != "" else float("nan")
    r["seed"], r["diverged"] = int(r["seed"]), int(r["diverged"])
    out[key_of(r["task"], r["method"], r["phase"], r["seed"], json.loads(r["setting"]))] = r
  return out


def chance(task: Task) -> float:
  """The value a diverged run is counted at: 1/C accuracy, or 8 bits per character."""
  return math.log2(task.num_classes) if task.metric == "bits_per_char" else 1.0 / task.num_classes


def score(rows: dict, task: str, method: str, setting: dict) -> float:
  """A setting's mean validation value over the tuning seeds (lower-is-better negated)."""
  sign = -1.0 if task_of(task).metric == "bits_per_char" else 1.0
  vals = [rows[key_of(task, method, "tune", s, setting)]["val"] for s in TUNE_SEEDS]
  return sign * sum(vals) / len(vals)


def select(rows: dict, task: str, method: str, settings: list) -> dict:
  """The selection rule of the runner and the report alike: the best score; a tie goes to
  the smallest values (in sorted-key order), whatever order ``settings`` come in."""
  return max(settings, key=lambda st: (score(rows, task, method, st), [-st[k] for k in sorted(st)]))


def pilot_choice(best: dict) -> str:
  """NRS's noise family for the whole study: the pilot method (``nrs_<family>``) with the
  best tuned validation score; the runner and the report both decide by this rule."""
  return max(PILOT.methods, key=lambda m: best[m]).removeprefix("nrs_")


def reuse_pilot_table(rows: dict) -> dict:
  """``{method: {task: (mean val, mean test, diverged seeds)}}`` over the reuse pilot's seeds,
  for the methods with all their pilot rows."""
  out: dict = {}
  for m in REUSE_PILOT_METHODS:
    for task, (_, setting) in REUSE_PILOTS.items():
      runs = [rows.get(key_of(task, m, "tune", s, setting)) for s in REUSE_PILOT_SEEDS]
      if all(runs):
        vals = [r["val"] for r in runs]
        tests = [r["test"] for r in runs]
        cell = (sum(vals) / len(vals), sum(tests) / len(tests), sum(r["diverged"] for r in runs))
        out.setdefault(m, {})[task] = cell
  return {m: v for m, v in out.items() if len(v) == len(REUSE_PILOTS)}


def reuse_choice(rows: dict) -> list:
  """The reuse pilot's rule (at most two configurations): a candidate that diverged on any
  pilot seed of either model is out; of the rest, the best mean validation value over both
  models, and the cheapest (fewest passes) within 0.5 pp of it if that is another."""
  table = reuse_pilot_table(rows)
  ok = {
    m: sum(v[0] for v in cells.values()) / len(cells)
    for m, cells in table.items()
    if m.startswith("nrs_look") and not any(v[2] for v in cells.values())
  }
  if not ok:
    return []
  best = max(ok, key=ok.get)
  near = [m for m in ok if ok[m] >= ok[best] - 0.005]
  cheapest = min(near, key=lambda m: (method_of(m, "absolute").passes, -ok[m]))
  return [best] if cheapest == best else [best, cheapest]


def final_seeds(task: Task, quick: bool, ablation: bool = False) -> list:
  """The final seeds (shared by every method); an ablation's are the first 10 of them."""
  n = 2 if quick else (min(ABLATION_SEEDS, task.final_seeds) if ablation else task.final_seeds)
  return list(range(FINAL_SEED0, FINAL_SEED0 + n))
