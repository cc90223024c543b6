"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and ``compare``."""

from __future__ import annotations

import json
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from experiments import input_pipeline
from experiments import methods
from experiments import models
from nrs_jax import flatness


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
  """One jitted (params, batch_stats, x, y) -> (summed loss, correct), compiled once per run."""

  @jax.jit
  def step(params, bs, x, y):
    logits, _ = apply(params, bs, x, False, None)
    return methods.cross_entropy(logits, y) * y.shape[0], jnp.sum(jnp.argmax(logits, -1) == y)

  return step


def _eval_metrics(eval_step, params, bs, split, batch_size):
  tot_l, tot_c, n = 0.0, 0, 0
  for b in input_pipeline.eval_batches(split, batch_size):
    loss, c = eval_step(params, bs, jnp.asarray(b["x"]), jnp.asarray(b["y"]))
    tot_l, tot_c, n = tot_l + float(loss), tot_c + int(c), n + len(b["y"])
  return tot_l / max(n, 1), tot_c / max(n, 1)


def _hessian(model, params, bs, ds, config, key):
  """Top eigenvalue and trace of the training loss (eval mode) on a fixed subset."""
  hc = config.hessian
  n = min(hc.num_examples, ds.num_train)
  bsz = min(hc.batch_size, n)
  data = [
    (jnp.asarray(ds.train.x[i : i + bsz]), jnp.asarray(ds.train.y[i : i + bsz]))
    for i in range(0, n - n % bsz, bsz)
  ]
  loss = lambda p, b: methods.cross_entropy(model.apply(p, bs, b[0], False, None)[0], b[1])
  return {
    k: float(v)
    for k, v in flatness.hessian_metrics(
      loss, params, data, key, num_iters=hc.num_iters, num_samples=hc.num_samples
    ).items()
  }


def make_mesh(config):
  """A 1-D ``data`` mesh over all devices, or None for plain single-device runs."""
  mode = config.get("sharding", "none")
  if mode not in ("none", "replicated", "fsdp"):
    raise ValueError(
      f"sharding={mode!r} is not known: choose one of ('none', 'replicated', 'fsdp')."
    )
  if mode == "none":
    return None
  from jax.sharding import Mesh

  return Mesh(np.asarray(jax.devices()), ("data",))


def state_shardings(state, mesh, mode):
  """Replicated params, or FSDP-style: each leaf's largest divisible axis over ``data``."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  n = mesh.devices.size

  def one(x):
    if mode == "fsdp" and jnp.ndim(x) >= 1:
      axes = sorted(range(jnp.ndim(x)), key=lambda a: -jnp.shape(x)[a])
      for a in axes:
        if jnp.shape(x)[a] % n == 0:
          spec = [None] * jnp.ndim(x)
          spec[a] = "data"
          return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(one, state)


def global_batch(batch, mesh):
  """Places a host batch: sharded on ``data`` (each process gives its slice)."""
  x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
  if mesh is None:
    return {"x": x, "y": y}
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  n_proc, idx = jax.process_count(), jax.process_index()
  per = len(batch["y"]) // n_proc
  out = {}
  for k, v in batch.items():
    local = np.asarray(v[idx * per : (idx + 1) * per])
    sharding = NamedSharding(mesh, P("data", *([None] * (local.ndim - 1))))
    out[k] = jax.make_array_from_process_local_data(sharding, local, (len(v), *local.shape[1:]))
  return out


def _flatten_state(state) -> dict:
  return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}


def _unflatten_state(template, flat: dict):
  leaves = [flat[k] for k in sorted(flat)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


# Keys that say how a run is launched, not what it computes: a resume may change them.
LAUNCH_KEYS = (
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "progress",
  "data_dir",
  "compare_methods",
)
CONFIG_FILE = "config.json"


def _flat_config(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_or_record_config(config, workdir: str, resuming: bool) -> None:
  """Records the resolved config in ``workdir``; a resume must not change what it computes.

  Raises:
    ValueError: when ``workdir`` holds a run whose recorded config differs from
      ``config`` in any key but the launch keys (``LAUNCH_KEYS``), naming the
      keys and how to start fresh.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists, as stored
  if resuming and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = _flat_config(old), _flat_config(new)
    diff = sorted(
      k
      for k in set(a) | set(b)
      if k.split(".")[0] not in LAUNCH_KEYS and a.get(k, "<unset>") != b.get(k, "<unset>")
    )
    if diff:
      changes = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in diff)
      raise ValueError(
        f"--workdir {workdir} holds a run with a different config ({changes}); resuming "
        "it would continue that run, not start this one. Use another --workdir, or "
        f"delete {workdir} to start fresh."
      )
  with open(path, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains ``config.method`` on ``config.dataset``; resumes from ``workdir`` if present.

  Writes ``metrics.jsonl`` (one line per evaluation), checkpoints, and
  ``final_state.npz``; returns the final metrics.
  """
  os.makedirs(workdir, exist_ok=True)
  ckpts = os.path.join(workdir, "checkpoints")
  resuming = os.path.exists(os.path.join(workdir, "metrics.jsonl")) or (
    os.path.isdir(ckpts) and bool(os.listdir(ckpts))
  )
  check_or_record_config(config, workdir, resuming)
  if config.get("distributed", False):
    jax.distributed.initialize()  # multi-host: coordinator and ids from the environment
  mesh = make_mesh(config)
  if mesh is not None and config.batch_size % mesh.devices.size:
    raise ValueError(
      f"batch_size={config.batch_size} must be divisible by the {mesh.devices.size} devices "
      "of the data mesh (global-batch semantics)."
    )
  if config.method not in methods.METHODS:
    raise ValueError(f"method={config.method!r} is not known: choose one of {methods.METHODS}.")
  ds = input_pipeline.load(
    config.dataset,
    validation_fraction=config.validation_fraction,
    seed=config.seed,
    data_dir=config.get("data_dir") or None,
    label_noise=config.get("label_noise", 0.0),
    max_examples=config.get("max_examples") or None,
  )
  model = Model(config, ds)
  steps_per_epoch = max(ds.num_train // config.batch_size, 1)
  total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
  tx = methods.make_optimizer(config, total_steps)
  step_fn = methods.make_step(config.method, model.apply, tx, config)

  state = {
    "step": jnp.zeros([], jnp.int32),
    "params": model.params,
    "batch_stats": model.batch_stats,
    "opt_state": tx.init(model.params),
  }
  base_key = jax.random.key(config.seed)

  jit_kwargs = {}
  if mesh is not None:
    shardings = state_shardings(state, mesh, config.sharding)
    state = jax.device_put(state, shardings)
    jit_kwargs = {"out_shardings": (shardings, None)}

  @partial(jax.jit, **jit_kwargs)
  def train_step(state, batch):
    key = jax.random.fold_in(base_key, state["step"])
    params, bs, opt_state, metrics = step_fn(
      state["params"], state["batch_stats"], state["opt_state"], batch, key
    )
    new = {"step": state["step"] + 1, "params": params, "batch_stats": bs, "opt_state": opt_state}
    return new, metrics

  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every_steps, max_to_keep=2
    ),
  )
  wall_offset, start = 0.0, 0
  latest = mngr.latest_step()
  if latest is not None:
    restored = mngr.restore(latest, args=ocp.args.StandardRestore())
    state = _unflatten_state(state, restored["state"])
    state = jax.tree_util.tree_map(jnp.asarray, state)
    if mesh is not None:
      state = jax.device_put(state, shardings)
    wall_offset = float(restored["wall"])
    start = int(state["step"])
    logging.info("Resumed from step %d", start)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  history = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      history = [r for r in map(json.loads, f) if r["step"] <= start]
  with open(metrics_path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in history)

  def save(step, force=False):
    mngr.save(
      step,
      args=ocp.args.StandardSave(
        {"state": _flatten_state(state), "wall": np.float64(wall_offset + time.time() - t0)}
      ),
      force=force,
    )

  eval_step = make_eval_step(model.apply)
  eval_every = config.eval_every_epochs * steps_per_epoch
  hess_every = config.hessian.get("every_evals", 0)
  t0 = time.time()
  bar = None
  if config.get("progress", True):
    from tqdm import tqdm

    bar = tqdm(
      total=total_steps, initial=start, desc=config.method, dynamic_ncols=True, leave=False
    )
  pending = []
  record = {}
  for step in range(start, total_steps):
    batch = input_pipeline.train_batch(ds, step, config.batch_size, config.seed)
    state, m = train_step(state, global_batch(batch, mesh))
    pending.append(m)
    done = step + 1
    if bar is not None:
      bar.update(1)
    if done % eval_every == 0 or done == total_steps:
      m_host = jax.device_get(pending)
      pending = []
      train_metrics = {k: float(np.mean([x[k] for x in m_host])) for k in m_host[0]}
      if not np.isfinite(train_metrics["loss"]):
        raise FloatingPointError(
          f"training loss is {train_metrics['loss']} at step {done}: lower the learning rate "
          "(config.learning_rate) or the NRS alpha/radius; the last good checkpoint is kept."
        )
      p, bs = state["params"], state["batch_stats"]
      tl, ta = _eval_metrics(eval_step, p, bs, ds.train, 1000)
      _, va = _eval_metrics(eval_step, p, bs, ds.validation, 1000)
      _, te = _eval_metrics(eval_step, p, bs, ds.test, 1000)
      record = {
        "step": done,
        "epoch": done / steps_per_epoch,
        **{f"train/{k}": v for k, v in train_metrics.items()},
        "train_loss": tl,
        "train_accuracy": ta,
        "val_accuracy": va,
        "test_accuracy": te,
        "wall_seconds": wall_offset + time.time() - t0,
      }
      n_eval = done // eval_every if eval_every else 0
      want_hessian = done == total_steps or (hess_every and n_eval % hess_every == 0)
      if want_hessian and config.hessian.num_iters > 0:
        record.update(_hessian(model, p, bs, ds, config, jax.random.fold_in(base_key, 2**31 - 1)))
      with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      if bar is not None:
        post = {"loss": f"{tl:.3f}", "acc": f"{ta:.3f}", "val": f"{va:.3f}"}
        if "nrs_penalty" in train_metrics:
          post["pen"] = f"{train_metrics['nrs_penalty']:.2e}"
        bar.set_postfix(post)
    if done % config.checkpoint_every_steps == 0 and done != total_steps:
      save(done)
  if start < total_steps or latest != total_steps:
    save(total_steps, force=True)
  mngr.wait_until_finished()
  mngr.close()
  if bar is not None:
    bar.close()
  np.savez(os.path.join(workdir, "final_state.npz"), **_flatten_state(state))
  if not record:  # resumed after the end: reuse the last record
    record = history[-1] if history else {}
  return record


SUMMARY_KEYS = {
  "test_accuracy": "test_accuracy",
  "val_accuracy": "val_accuracy",
  "train_loss": "train_loss",
  "hessian_top_eigenvalue": "hessian/lambda_max",
  "hessian_trace": "hessian/trace",
  "wall_seconds": "wall_seconds",
}


def compare(config, workdir: str) -> dict[str, dict[str, float]]:
  """Trains each of ``config.compare_methods`` and writes a table, summary.json and plots."""
  summary = {}
  for method in config.compare_methods:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.method = method
    rec = train_and_evaluate(cfg, os.path.join(workdir, method))
    summary[method] = {k: float(rec.get(src, float("nan"))) for k, src in SUMMARY_KEYS.items()}
    print(f"{method}: test accuracy {summary[method]['test_accuracy']:.4f}", flush=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(format_table(summary))
  from experiments import plots

  plots.plot_runs(workdir, list(config.compare_methods))
  return summary


def format_table(summary: dict[str, dict[str, float]]) -> str:
  cols = [
    "test_accuracy",
    "val_accuracy",
    "train_loss",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "wall_seconds",
  ]
  head = f"| {'method':6} | " + " | ".join(cols) + " |"
  sep = "|" + "|".join("-" * (len(c) + 2) for c in ["method".ljust(6), *cols]) + "|"
  rows = [head, sep]
  for m, r in summary.items():
    vals = [f"{r[c]:.4f}" if "accuracy" in c or c == "train_loss" else f"{r[c]:.3g}" for c in cols]
    rows.append(f"| {m:6} | " + " | ".join(v.rjust(len(c)) for v, c in zip(vals, cols)) + " |")
  return "\n".join(rows)
