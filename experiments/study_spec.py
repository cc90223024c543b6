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
  "pi_model": Method("pi_model", "pi_model.noise", (0.05, 0.1, 0.2, 0.4), 2.0, unlabeled=True),
}
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
IMAGE = ("sgd", "sgd_2x", "sam", "asam", "sam_half", "saf", "mesa", *NRS_FAMILY)
TRANSFORMER = ("adamw", "sam", *NRS_FAMILY)
SEMI = ("sgd", "sam", "nrs", "nrs_unlabeled", "vat", "pi_model")  # 10% of the labels kept


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
  return PILOT if name == "pilot" else TASKS[name]


def method_of(name: str, family: str = "", task: Task | None = None) -> Method:
  """A method by name on a task: METHODS, an ablation of nrs, or the pilot's ``nrs_<family>``;
  nrs and nrs_cheap perturb with ``family``'s scale (its grid a decade lower on transformers)."""
  if name in ABLATIONS:
    k = ABLATIONS[name].get("nrs.num_neighbors", 1)
    return dataclasses.replace(method_of("nrs", family, task), passes=1.0 + k)
  if name.removeprefix("nrs_") in FAMILIES:
    name, family = "nrs", name.removeprefix("nrs_")
  if name not in METHODS:
    raise ValueError(f"method={name!r} is not known: choose from {[*METHODS, *ABLATIONS]}.")
  m = METHODS[name]
  if name.startswith("nrs"):
    if family not in FAMILIES:
      raise ValueError(f"NRS needs a noise family from {list(FAMILIES)}, got {family!r}.")
    m = dataclasses.replace(m, grid=FAMILIES[family], fixed={**m.fixed, "nrs.scale": family})
  if task is not None:
    m = m.on(task.kind)
  if task is not None and m.unlabeled:  # in SGD passes: its batch is (B + U) / B times SGD's
    o = task.overrides
    m = dataclasses.replace(m, passes=m.passes * (1 + o["unlabeled_batch_size"] / o["batch_size"]))
  return m


def machine_kind(machine: str) -> str:
  """The kind of machine a row ran on: its CPU model and ISA (the machine column's first two
  fields); a clear error for a row without one."""
  parts = (machine or "").split("; ")
  if len(parts) < 3 or not parts[0] or not parts[1]:
    raise ValueError(
      f"records: a final row's machine field {machine!r} does not read 'CPU model; ISA; "
      "versions': pairs cannot be matched to machine kinds. Fix or rerun that row."
    )
  return "; ".join(parts[:2])


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


def final_seeds(task: Task, quick: bool, ablation: bool = False) -> list:
  """The final seeds (shared by every method); an ablation's are the first 10 of them."""
  n = 2 if quick else (min(ABLATION_SEEDS, task.final_seeds) if ablation else task.final_seeds)
  return list(range(FINAL_SEED0, FINAL_SEED0 + n))
