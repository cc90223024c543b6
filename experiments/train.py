"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and ``compare``."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from experiments import input_pipeline
from experiments import measures
from experiments import models
from experiments import optimizers
from experiments import parallel
from experiments import records
from experiments import steps
from experiments.tables import markdown_table


class Model:
  """A model as pure functions: NNX (or Linen) behind one interface."""

  def __init__(self, config, ds: input_pipeline.Dataset):
    name = config.model
    kwargs = dict(config.get("model_kwargs", {}))
    self.linen = name in models.LINEN_MODELS
    if self.linen:
      module = models.LINEN_MODELS[name](num_classes=ds.num_classes, **kwargs)
      x0 = jnp.zeros((1, *ds.input_shape), jnp.float32)
      self.params = module.init(jax.random.key(config.seed), x0)["params"]
      self.batch_stats = {}

      def apply(params, bs, x, train, dropout_key):
        return module.apply({"params": params}, x, train=train), bs

    else:
      model = models.create_model(name, ds.input_shape, ds.num_classes, config.seed, **kwargs)
      graphdef, self.params, self.batch_stats, rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, ...
      )

      def apply(params, bs, x, train, dropout_key):
        m = nnx.merge(graphdef, params, bs, rest, copy=True)
        logits = m(x, train=train, dropout_key=dropout_key)
        return logits, nnx.state(m, nnx.BatchStat)

    self.apply = apply


def make_eval_step(apply):
  """One jitted (params, bs, x, y, w) -> (summed loss, correct, count), compiled once per run.
  ``w`` weights each example (0 for the padding that makes a batch divide the devices).
  Token-level labels ``[B, T]`` count each valid token (label >= 0) once, so the means are per
  token (per character for the byte-level LM)."""

  @jax.jit
  def step(params, bs, x, y, w):
    logits, _ = apply(params, bs, x, False, None)
    weight = w.reshape(w.shape + (1,) * (y.ndim - 1)) * (y >= 0)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
    correct = jnp.argmax(logits, -1) == y
    return jnp.sum(per_token * weight), jnp.sum(correct * weight), jnp.sum(weight)

  return step


def _eval_batches(ds, split: str, batch_size: int, mesh):
  """Global ``{"x", "y", "w"}`` evaluation batches of a split (``w`` = 0 on padding)."""
  if ds.stream is None:  # in memory on every process: each places its own rows
    for b in input_pipeline.eval_batches(getattr(ds, split), batch_size):
      yield parallel.padded_global(b, mesh)
    return
  n_dev = 1 if mesh is None else mesh.devices.size
  per_process = -(-batch_size // n_dev) * n_dev // jax.process_count()
  for b in ds.stream.eval_batches(split, per_process):
    yield parallel.global_batch(b, mesh)


def _eval_metrics(eval_step, params, bs, ds, split, batch_size, mesh=None):
  tot_l, tot_c, n = 0.0, 0.0, 0.0
  for g in _eval_batches(ds, split, batch_size, mesh):
    loss, c, count = eval_step(params, bs, g["x"], g["y"], g["w"])
    tot_l, tot_c, n = tot_l + float(loss), tot_c + float(c), n + float(count)
  return tot_l / max(n, 1), tot_c / max(n, 1)


def train_eval_view(ds, examples: int):
  """The dataset whose ``train`` split is its first ``examples`` rows (0: all of it)."""
  if not examples or ds.stream is not None or examples >= ds.num_train:
    return ds
  return dataclasses.replace(ds, train=ds.train.head(examples))


def _hessian(model, params, bs, ds, config, key, mesh=None):
  """Top eigenvalue and trace of the training loss (eval mode) on a fixed subset, by the
  study's measures (experiments.measures), on batches laid out for the run's mesh."""
  hc = config.hessian
  n = min(hc.num_examples, ds.num_train)
  bsz = min(hc.batch_size, n)
  if mesh is not None:
    bsz -= bsz % mesh.devices.size  # whole batches on every device: no padding in a Hessian
  n -= n % bsz
  data = []
  if ds.stream is None:
    for i in range(0, n, bsz):
      g = parallel.padded_global({"x": ds.train.x[i : i + bsz], "y": ds.train.y[i : i + bsz]}, mesh)
      data.append((g["x"], g["y"]))
  else:  # each process its own first examples, bsz / processes of them per batch
    per = bsz // jax.process_count()
    local = ds.stream.head(n // jax.process_count())
    for i in range(0, len(local.y) - per + 1, per):
      g = parallel.global_batch({"x": local.x[i : i + per], "y": local.y[i : i + per]}, mesh)
      data.append((g["x"], g["y"]))
  _, loss = measures.eval_fns(model.apply, bs)
  return measures.hessian(loss, params, data, key, iters=hc.num_iters, probes=hc.num_samples)


def load_data(config) -> input_pipeline.Dataset:
  """The config's dataset (``block_size`` applies to the token datasets)."""
  keys = ("block_size", "mnist1d_samples", "mnist1d_seed")
  extra = {k: int(config[k]) for k in keys if k in config}
  return input_pipeline.load(
    config.dataset,
    validation_fraction=config.validation_fraction,
    seed=config.seed,
    data_dir=config.get("data_dir") or None,
    label_noise=config.get("label_noise", 0.0),
    max_examples=config.get("max_examples") or None,
    labeled_fraction=config.get("labeled_fraction", 1.0),
    **extra,
  )


def _check_run(config, mesh, ds=None) -> None:
  """Config errors, before anything trains: the mesh's and the method's, or with ``ds``
  (once the data is loaded) the data's."""
  if ds is not None:
    if config.method == "saf" and ds.stream is not None:
      raise ValueError(
        f"method='saf' remembers each training example's outputs; {config.dataset!r} is "
        "streamed without example indices. Use it with the in-memory datasets."
      )
    u = config.get("unlabeled_batch_size", 0)
    if config.method in steps.SEMI and (ds.unlabeled is None or not 0 < u <= len(ds.unlabeled.x)):
      n = 0 if ds.unlabeled is None else len(ds.unlabeled.x)
      raise ValueError(
        f"method={config.method!r} reads an unlabeled batch each step: it needs "
        f"config.labeled_fraction < 1 (now {config.get('labeled_fraction', 1.0)}) and "
        f"config.unlabeled_batch_size in [1, {n}] (the unlabeled examples; now {u})."
      )
    return
  n_proc = jax.process_count()
  if mesh is None and n_proc > 1:
    raise ValueError(
      f"{n_proc} processes need a device mesh: set --config.sharding=replicated or fsdp."
    )
  for name in ("batch_size", "unlabeled_batch_size"):
    if mesh is not None and config.get(name, 0) % mesh.devices.size:
      raise ValueError(
        f"--config.{name}={config[name]} must be divisible by the {mesh.devices.size} "
        f"devices of the data mesh ({n_proc} process(es)); global-batch semantics."
      )
  if config.method not in steps.METHODS:
    raise ValueError(f"method={config.method!r} is not known: choose one of {steps.METHODS}.")
  steps.runs_own_step(config, 0)  # (its keys' errors: probability, refresh_every, reuse)


def _evaluate(model, eval_step, state, ds, train_view, mesh) -> dict:
  p, bs = state["params"], state["batch_stats"]
  out = {}
  for name, data, split in (("train", train_view, "train"), ("val", ds, "validation")):
    out[f"{name}_loss"], out[f"{name}_accuracy"] = _eval_metrics(
      eval_step, p, bs, data, split, 1000, mesh
    )
  out["test_loss"], out["test_accuracy"] = _eval_metrics(eval_step, p, bs, ds, "test", 1000, mesh)
  return out


def train_and_evaluate(config, workdir: str, finish=None) -> dict[str, Any]:
  """Trains ``config.method`` on ``config.dataset``; resumes from ``workdir`` if present. Writes
  ``metrics.jsonl`` (one line per evaluation), checkpoints, and ``final_state.npz``
  (:class:`experiments.records.Run`); returns the final metrics, with ``finish(model, state,
  ds)``'s dict added where given (the study's measures of the final solution). Under several
  processes every
  process runs this with the same config and workdir (a shared filesystem) and feeds its own
  rows of every global batch."""
  parallel.initialize_distributed(config)  # before any other JAX call
  run = records.Run(config, workdir, lead=parallel.is_lead())
  mesh = parallel.make_mesh(config)
  _check_run(config, mesh)
  n_proc, proc = jax.process_count(), jax.process_index()
  ds = load_data(config)
  _check_run(config, mesh, ds)
  model = Model(config, ds)
  steps_per_epoch = max(ds.num_train // config.batch_size, 1)
  total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
  tx = optimizers.make_optimizer(config, total_steps, ds.num_train, ds.num_classes)
  step_fn = steps.make_step(config.method, model.apply, tx, config, steps_per_epoch)
  state = {
    "step": jnp.zeros([], jnp.int32),
    "params": model.params,
    "batch_stats": model.batch_stats,
    "opt_state": tx.init(model.params),
  }
  base_key = jax.random.key(config.seed)
  jit_kwargs = {}
  if mesh is not None:
    shardings = parallel.state_shardings(state, mesh, config.sharding)
    state = parallel.place_state(state, shardings)
    jit_kwargs = {"out_shardings": (shardings, None)}

  def compiled_step(fn):
    @partial(jax.jit, **jit_kwargs)
    def train_step(state, batch):
      key = jax.random.fold_in(base_key, state["step"])
      params, bs, opt_state, metrics = fn(
        state["params"], state["batch_stats"], state["opt_state"], batch, key
      )
      new = {"step": state["step"] + 1, "params": params, "batch_stats": bs, "opt_state": opt_state}
      return new, metrics

    return train_step

  train_step = compiled_step(step_fn)
  # Randomized two-pass methods run a plain SGD step on the other steps, reuse methods their
  # reuse step: two programs, chosen on the host (steps.runs_own_step).
  cheap_step = compiled_step(steps.make_cheap_step(config.method, model.apply, tx, config))
  state, start = run.restore(state)
  eval_step = make_eval_step(model.apply)
  # Train metrics on the first config.train_eval_examples rows (0: the whole split).
  train_view = train_eval_view(ds, int(config.get("train_eval_examples", 0) or 0))
  eval_every = config.eval_every_epochs * steps_per_epoch
  hess_every = config.hessian.get("every_evals", 0)
  hessian_ok = not (n_proc > 1 and config.sharding == "fsdp")
  if not hessian_ok and config.hessian.num_iters > 0 and parallel.is_lead():
    logging.warning(
      "Hessian metrics are skipped: with FSDP across %d processes the parameters are "
      "sharded over hosts; run them with --config.sharding=replicated.",
      n_proc,
    )
  bar = None
  if config.get("progress", True) and parallel.is_lead():
    from tqdm import tqdm

    bar = tqdm(
      total=total_steps, initial=start, desc=config.method, dynamic_ncols=True, leave=False
    )
  pending, stream = [], None
  unlabeled = config.unlabeled_batch_size if config.method in steps.SEMI else 0
  if ds.stream is not None:  # TFDS: this process's stream, resumed at the step
    stream = ds.stream.train_batches(config.seed, start, config.batch_size // n_proc)
  for step in range(start, total_steps):
    if stream is not None:
      batch = next(stream)
    else:
      procs = {"process_index": proc, "process_count": n_proc}
      batch = input_pipeline.train_batch(ds, step, config.batch_size, config.seed, **procs)
      if unlabeled:  # (the labels of the unlabeled examples do not exist here)
        batch["u"] = input_pipeline.unlabeled_batch(ds, step, unlabeled, config.seed, **procs)
    own = steps.runs_own_step(config, step)
    state, m = (train_step if own else cheap_step)(state, parallel.global_batch(batch, mesh))
    pending.append(m)
    done = step + 1
    if bar is not None:
      bar.update(1)
    if done % eval_every == 0 or done == total_steps:
      m_host, pending = jax.device_get(pending), []
      keys = dict.fromkeys(k for x in m_host for k in x)  # plain steps lack method metrics
      train_metrics = {k: float(np.mean([x[k] for x in m_host if k in x])) for k in keys}
      if not np.isfinite(train_metrics["loss"]):
        raise FloatingPointError(
          f"training loss is {train_metrics['loss']} at step {done}: lower the learning rate "
          "(config.learning_rate) or the NRS alpha/radius; the last good checkpoint is kept."
        )
      record = {
        "step": done,
        "epoch": done / steps_per_epoch,
        **{f"train/{k}": v for k, v in train_metrics.items()},
        **_evaluate(model, eval_step, state, ds, train_view, mesh),
        "wall_seconds": run.wall(),
      }
      n_eval = done // eval_every if eval_every else 0
      want_hessian = done == total_steps or (hess_every and n_eval % hess_every == 0)
      if want_hessian and config.hessian.num_iters > 0 and hessian_ok:
        key = jax.random.fold_in(base_key, 2**31 - 1)
        record.update(_hessian(model, state["params"], state["batch_stats"], ds, config, key, mesh))
      run.append(record)
      if bar is not None:
        post = {k: f"{record[k]:.3f}" for k in ("train_loss", "train_accuracy", "val_accuracy")}
        bar.set_postfix(post)
    if done % config.checkpoint_every_steps == 0 and done != total_steps:
      run.save(state, done)
  if bar is not None:
    bar.close()
  rec = {**run.finish(state, total_steps, start), "cpu_seconds_before_resume": run.cpu_offset}
  rec["resumed_from_step"] = start
  return {**rec, **(finish(model, state, ds) if finish else {})}


SUMMARY_KEYS = {
  "test_accuracy": "test_accuracy",
  "val_accuracy": "val_accuracy",
  "train_loss": "train_loss",
  "hessian_top_eigenvalue": "hessian/lambda_max",
  "hessian_trace": "hessian/trace",
}


def compare(config, workdir: str) -> dict[str, dict[str, float]]:
  """Trains each of ``config.compare_methods`` (one seed each) and writes a table,
  summary.json and plots; a method already trained in ``workdir`` is read back, and says so."""
  parallel.initialize_distributed(config)  # once, before the first run
  lead = parallel.is_lead()
  if lead:
    print(
      f"One seed (seed {config.seed}) of each method on {config.dataset} with the "
      f"{config.model} model: a single run each, not a verdict. The study compares them over "
      "paired seeds with tests: python -m experiments.study, experiments/RESULTS_STUDY.md.",
      flush=True,
    )
  summary = {}
  for method in config.compare_methods:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.method = method
    run_dir = os.path.join(workdir, method)
    rec = train_and_evaluate(cfg, run_dir)
    summary[method] = {k: float(rec.get(src, float("nan"))) for k, src in SUMMARY_KEYS.items()}
    if lead:
      how = f"resumed from {run_dir} at step {rec['resumed_from_step']}"
      how = how if rec["resumed_from_step"] else f"trained in {run_dir}"
      print(f"{method}: test accuracy {summary[method]['test_accuracy']:.4f} ({how})", flush=True)
  if lead:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    print(format_table(summary))
    from experiments import plots

    plots.plot_runs(workdir, list(config.compare_methods))
    wrote = ", ".join(os.path.join(workdir, f) for f in PLOTS_AND_SUMMARY)
    print(f"Wrote {wrote}; per method <method>/metrics.jsonl, checkpoints/, final_state.npz.")
  return summary


PLOTS_AND_SUMMARY = ("summary.json", "accuracy.png", "hessian.png")


def format_table(summary: dict[str, dict[str, float]]) -> str:
  cols = ["test_accuracy", "val_accuracy", "train_loss", "hessian_top_eigenvalue", "hessian_trace"]
  fmt = lambda c, v: f"{v:.4f}" if "accuracy" in c or c == "train_loss" else f"{v:.3g}"
  rows = [[m, *(fmt(c, r[c]) for c in cols)] for m, r in summary.items()]
  return markdown_table(["method", *cols], rows)
