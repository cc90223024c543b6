"""Where an NRS step's time goes (issue 52), per study model at its study batch size and chosen
setting: the task pass, the neighbour draw, the neighbour pass, the divergence and the backward
pass, timed side by side with the base method's (SGD's or AdamW's), SAM's, LookSAM's and the
cheap variants' steps, in units of one base step.

  python -m experiments.step_profile [--tasks=mnist1d_mlp,...] [--repeats=15]

writes ``experiments/results/step_profile_<backend>.json``; ``docs/benchmarks.md`` renders it
(``experiments.result_tables.step_profile``). A part is its own jitted program: the task pass
is the task loss's forward pass, then each part is what one more part adds to a program (the
neighbour pass at a given ``w + delta``, the divergence, the draw, and the backward pass of
the full NRS gradient), so that no part pays a program's fixed cost twice.
A step row is a run of ``STEPS`` steps (optimiser included) as training runs them, reuse steps
and refreshes in turn, over the same run of base steps.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import nrs_jax
from experiments import losses
from experiments import optimizers
from experiments import study
from experiments import study_spec as spec
from experiments import timing
from experiments import train

TASKS = ("mnist1d_mlp", "mnist1d_cnn", "mnist5k_cnn_noise20", "mnist1d_vit", "stdlib_lm")
MODEL = {
  "mnist1d_mlp": "MLP",
  "mnist1d_cnn": "1-D CNN",
  "mnist5k_cnn_noise20": "2-D CNN",
  "mnist1d_vit": "ViT",
  "stdlib_lm": "LM",
}
PARTS = ("task pass", "draw", "neighbour pass", "divergence", "backward")
PARTS_IN_ORDER = ("task pass", "neighbour pass", "divergence", "draw", "backward")  # (cumulative)
STEPS = 10  # a step row's run: two LookSAM / k=5 cycles
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _chosen(task: str) -> dict:
  """The study's chosen setting of each method on ``task`` (from the committed records)."""
  from experiments import study_report

  rows = spec.read_records(os.path.join(RESULTS, "study_runs.csv"))
  names = ("adamw" if spec.TASKS[task].kind == "transformer" else "sgd", "sam", "nrs")
  return {m: study_report.chosen(rows, task, m)[0] for m in names}


def step_rows(task: str, chosen: dict) -> dict:
  """``label: (config, run_of_steps, args)``: the base, SAM, LookSAM, NRS and its cheap forms."""
  t = spec.TASKS[task]
  base, nrs = next(iter(chosen)), chosen["nrs"]
  looksam = {k: v for k, v in chosen["sam"].items() if k != "sam.rho"}
  looksam["looksam.rho"] = chosen["sam"]["sam.rho"]  # (SAM's radius, until its own is tuned)
  rows = {
    base: (base, chosen[base]),
    "sam": ("sam", chosen["sam"]),
    "looksam": ("looksam", looksam),
    "nrs": ("nrs", nrs),
    "nrs rademacher": ("nrs", {**nrs, "nrs.noise": "rademacher"}),
  }
  for name in spec.NRS_LOOK:  # (at NRS's radius, until their own is tuned)
    rows[name] = (name, nrs)
  out = {}
  for label, (method, setting) in rows.items():
    out[label] = study.make_config(t, method, setting, 0, False, "absolute")
  return out


def part_fns(config, ds, batch) -> dict:
  """Five programs, each the one before with one more part (K = 1, the study's options), so
  that every difference shares the same fixed cost of running a program: the task pass; with
  the neighbour pass (its logits returned, at a given delta); with the divergence; with the
  draw; the full NRS gradient (``jax.value_and_grad`` of ``make_nrs_loss``)."""
  model = train.Model(config, ds)
  params, bs, x, y = model.params, model.batch_stats, batch["x"], batch["y"]
  key = jax.random.key(0)
  apply = lambda p, inputs: model.apply(p, bs, inputs, True, key)[0]
  task = losses.task_loss(config)
  opts = optimizers.nrs_options(config)
  alpha = opts.pop("alpha")
  sampler = nrs_jax._neighbors.Sampler(
    params, radius=opts["radius"], noise=opts["noise"], scale=opts["scale"], mask=None
  )
  draw = lambda p, k: [None if d is None else d[0] for d in sampler.draw(p, jax.random.split(k, 1))]
  given = draw(params, key)
  shifted = nrs_jax._neighbors.apply_perturbation
  where = losses.valid_tokens(y) if losses.is_token_level(y) else None

  def divergence(c, z):
    d = nrs_jax.kl(c, z)
    return jnp.mean(d) if where is None else jnp.sum(jnp.where(where, d, 0)) / jnp.sum(where)

  def value(p, d):
    centre = apply(p, x)
    z = apply(shifted(p, d), x)
    return task(centre, y) + alpha * divergence(jax.lax.stop_gradient(centre), z)

  loss = nrs_jax.make_nrs_loss(
    lambda p, b: apply(p, b["x"]),
    lambda z, b: task(z, b["y"]),
    alpha=alpha,
    where_fn=None if where is None else (lambda b: losses.valid_tokens(b["y"])),
    **opts,
  )
  return {
    "+task": (jax.jit(lambda p: task(apply(p, x), y)), (params,)),
    "+neighbour": (
      jax.jit(lambda p, d: (task(apply(p, x), y), apply(shifted(p, d), x))),
      (params, given),
    ),
    "+divergence": (jax.jit(value), (params, given)),
    "+draw": (jax.jit(lambda p, k: value(p, draw(p, k))), (params, key)),
    "+backward": (jax.jit(jax.value_and_grad(lambda p: loss(p, batch, key)[0])), (params,)),
  }


def profile(task: str, repeats: int) -> dict:
  """One task's parts and step rows, in units of one base step (its run of steps / STEPS); the
  parts in PARTS's order."""
  configs = step_rows(task, _chosen(task))
  first = next(iter(configs.values()))
  ds = train.load_data(first)
  batch = study.timing_batch(first, ds)
  fns = {label: study.run_of_steps(c, ds, batch, STEPS) for label, c in configs.items()}
  fns.update(part_fns(configs["nrs"], ds, batch))
  secs = timing.interleaved_medians(fns, repeats)
  unit = secs[next(iter(configs))] / STEPS
  cumulative = [secs[f"+{p.split()[0]}"] / unit for p in PARTS_IN_ORDER]
  parts = {
    p: cumulative[0] if i == 0 else cumulative[i] - cumulative[i - 1]
    for i, p in enumerate(PARTS_IN_ORDER)
  }
  return {
    "model": MODEL[task],
    "batch_size": first.batch_size,
    "steps": {label: round(secs[label] / (STEPS * unit), 3) for label in configs},
    "parts": {p: round(parts[p], 3) for p in PARTS},
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=list(TASKS))
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  study.use_study_xla_flags()
  out = {"machine": study.machine(), "backend": jax.default_backend(), "tasks": {}}
  for task in a.tasks:
    out["tasks"][task] = profile(task, a.repeats)
    print(task, json.dumps(out["tasks"][task]), flush=True)
  path = a.out or os.path.join(RESULTS, f"step_profile_{jax.default_backend()}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {path}")
  return out


if __name__ == "__main__":
  main()
