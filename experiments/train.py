"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and ``compare``."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
  """One jitted (params, bs, x, y, w) -> (summed loss, correct, count), compiled once per run.

  ``w`` weights each example (0 for the padding that makes a batch divide the
  devices). Token-level labels ``[B, T]`` count each valid token (label >= 0)
  once, so the means are per token (per character for the byte-level LM).
  """

  @jax.jit
  def step(params, bs, x, y, w):
    logits, _ = apply(params, bs, x, False, None)
    weight = w.reshape(w.shape + (1,) * (y.ndim - 1)) * (y >= 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
    correct = jnp.argmax(logits, -1) == y
    return jnp.sum(losses * weight), jnp.sum(correct * weight), jnp.sum(weight)

  return step


def _padded_global(arrays: dict, mesh) -> dict:
  """Host arrays (the same on every process) as arrays sharded over ``data``.

  Rows are padded to a multiple of the device count (``w`` = 0 there). Each
  process transfers only the rows of its own devices.
  """
  n = len(arrays["y"])
  pad = 0 if mesh is None else -n % mesh.devices.size
  out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()}
  out["w"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in out.items()}

  def place(v):
    sharding = batch_sharding(mesh, v.ndim)
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

  return {k: place(v) for k, v in out.items()}


def _eval_batches(ds, split: str, batch_size: int, mesh):
  """Global ``{"x", "y", "w"}`` evaluation batches of a split (``w`` = 0 on padding)."""
  if ds.stream is None:  # in memory on every process: each places its own rows
    for b in input_pipeline.eval_batches(getattr(ds, split), batch_size):
      yield _padded_global(b, mesh)
    return
  n_dev = 1 if mesh is None else mesh.devices.size
  per_process = -(-batch_size // n_dev) * n_dev // jax.process_count()
  for b in ds.stream.eval_batches(split, per_process):
    yield global_batch(b, mesh)


def _eval_metrics(eval_step, params, bs, ds, split, batch_size, mesh=None):
  tot_l, tot_c, n = 0.0, 0.0, 0.0
  for g in _eval_batches(ds, split, batch_size, mesh):
    loss, c, count = eval_step(params, bs, g["x"], g["y"], g["w"])
    tot_l, tot_c, n = tot_l + float(loss), tot_c + float(c), n + float(count)
  return tot_l / max(n, 1), tot_c / max(n, 1)


def _train_eval_view(ds, examples: int):
  """The dataset whose ``train`` split is its first ``examples`` rows (0: all of it)."""
  if not examples or ds.stream is not None or examples >= ds.num_train:
    return ds
  return dataclasses.replace(ds, train=ds.train.head(examples))


def _hessian(model, params, bs, ds, config, key, mesh=None):
  """Top eigenvalue and trace of the training loss (eval mode) on a fixed subset."""
  hc = config.hessian
  n = min(hc.num_examples, ds.num_train)
  bsz = min(hc.batch_size, n)
  if mesh is not None:
    bsz -= bsz % mesh.devices.size  # whole batches on every device: no padding in a Hessian
  n -= n % bsz
  data = []
  if ds.stream is None:
    for i in range(0, n, bsz):
      g = _padded_global({"x": ds.train.x[i : i + bsz], "y": ds.train.y[i : i + bsz]}, mesh)
      data.append((g["x"], g["y"]))
  else:  # each process its own first examples, bsz / processes of them per batch
    per = bsz // jax.process_count()
    local = ds.stream.head(n // jax.process_count())
    for i in range(0, len(local.y) - per + 1, per):
      g = global_batch({"x": local.x[i : i + per], "y": local.y[i : i + per]}, mesh)
      data.append((g["x"], g["y"]))
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


def batch_sharding(mesh, ndim: int):
  """Rows over the mesh's ``data`` axis, every other dim whole."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def global_batch(local_batch, mesh):
  """This process's rows of the global batch as one global array sharded on ``data``."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in local_batch.items()}
  out = {}
  for k, v in local_batch.items():
    local = np.asarray(v)
    sharding = batch_sharding(mesh, local.ndim)
    shape = (len(local) * jax.process_count(), *local.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def place_state(state, shardings):
  """Puts a host-identical pytree on its shardings (each process fills its own devices)."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(one, state, shardings)


def host_state(state) -> dict:
  """The state as host numpy arrays on every process (gathers sharded leaves)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    state = multihost_utils.process_allgather(state, tiled=True)
  return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}


# Keys that say how a run is launched, not what it computes: a resume may change them.
LAUNCH_KEYS = (
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "distributed_timeout_s",
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


def check_or_record_config(config, workdir: str, resuming: bool, write: bool = True) -> None:
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
  if write:  # atomically: other processes may be reading it
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` from the config; call it before any other JAX call.

  With ``config.distributed`` and no address, JAX detects the cluster itself
  (TPU pods, SLURM, Open MPI, Kubernetes). ``coordinator_address``,
  ``num_processes`` and ``process_id`` name it for clusters JAX does not
  detect (``num_processes`` and ``process_id`` go together). A second call is a
  no-op, so ``compare`` initialises once.

  Raises:
    ValueError: for flags that do not go together.
    RuntimeError: when the coordinator cannot be reached within
      ``config.distributed_timeout_s``, naming the flags to check.
  """
  if not config.get("distributed", False) or jax.distributed.is_initialized():
    return
  addr = config.get("coordinator_address") or None
  n = config.get("num_processes", 0) or None
  pid = config.get("process_id", -1)
  pid = None if pid is None or pid < 0 else int(pid)
  if (n is None) != (pid is None):
    raise ValueError(
      f"--config.num_processes={n} and --config.process_id={pid} go together: set both "
      "(with --config.coordinator_address=host:port) or neither (JAX detects the cluster)."
    )
  if n is not None and addr is None:
    raise ValueError(
      "--config.num_processes and --config.process_id need --config.coordinator_address "
      "(host:port of process 0, reachable from every process)."
    )
  timeout = int(config.get("distributed_timeout_s", 300))
  if addr is not None and pid:
    # XLA's client aborts the process (no Python exception) when the coordinator is
    # unreachable: check it first, so the error is one clear line naming the flag.
    _wait_for_coordinator(addr, timeout)
  if addr is not None and pid == 0:
    logging.warning(
      "process 0: serving the coordinator at --config.coordinator_address=%s; waiting up to "
      "--config.distributed_timeout_s=%d s for --config.num_processes=%d processes.",
      addr,
      timeout,
      n,
    )
  try:
    jax.distributed.initialize(
      coordinator_address=addr, num_processes=n, process_id=pid, initialization_timeout=timeout
    )
  except Exception as e:  # noqa: BLE001  (one clear message whatever the cause)
    raise RuntimeError(
      f"jax.distributed.initialize(coordinator_address={addr!r}, num_processes={n}, "
      f"process_id={pid}) failed within --config.distributed_timeout_s={timeout}: {e}. "
      "Check that --config.coordinator_address is process 0's host:port and reachable "
      "from every process, and that all num_processes processes were started."
    ) from e


def _wait_for_coordinator(addr: str, timeout: float) -> None:
  import socket

  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--config.coordinator_address={addr!r} must be host:port.")
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.time() > deadline:
        raise RuntimeError(
          f"the coordinator at --config.coordinator_address={addr} could not be reached "
          f"within --config.distributed_timeout_s={timeout:g} ({e}). Start process 0 with "
          "the same address, and check the host and port from this machine."
        ) from None
      time.sleep(0.2)


def is_lead() -> bool:
  return jax.process_index() == 0


def load_data(config) -> input_pipeline.Dataset:
  """The config's dataset (``block_size`` applies to the token datasets)."""
  extra = {"block_size": int(config.block_size)} if "block_size" in config else {}
  return input_pipeline.load(
    config.dataset,
    validation_fraction=config.validation_fraction,
    seed=config.seed,
    data_dir=config.get("data_dir") or None,
    label_noise=config.get("label_noise", 0.0),
    max_examples=config.get("max_examples") or None,
    **extra,
  )


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains ``config.method`` on ``config.dataset``; resumes from ``workdir`` if present.

  Writes ``metrics.jsonl`` (one line per evaluation), checkpoints, and
  ``final_state.npz``; returns the final metrics. Under several processes every
  process runs this with the same config and workdir (a shared filesystem):
  each feeds its own rows of every global batch, checkpoints are written
  collectively, and only process 0 writes the metrics, the config record and
  ``final_state.npz``.
  """
  initialize_distributed(config)  # before any other JAX call
  os.makedirs(workdir, exist_ok=True)
  ckpts = os.path.join(workdir, "checkpoints")
  resuming = os.path.exists(os.path.join(workdir, "metrics.jsonl")) or (
    os.path.isdir(ckpts) and bool(os.listdir(ckpts))
  )
  check_or_record_config(config, workdir, resuming, write=is_lead())
  mesh = make_mesh(config)
  n_proc, proc = jax.process_count(), jax.process_index()
  if mesh is None and n_proc > 1:
    raise ValueError(
      f"{n_proc} processes need a device mesh: set --config.sharding=replicated or fsdp."
    )
  if mesh is not None and config.batch_size % mesh.devices.size:
    raise ValueError(
      f"--config.batch_size={config.batch_size} must be divisible by the "
      f"{mesh.devices.size} devices of the data mesh ({n_proc} process(es)); "
      "global-batch semantics."
    )
  if config.method not in methods.METHODS:
    raise ValueError(f"method={config.method!r} is not known: choose one of {methods.METHODS}.")
  ds = load_data(config)
  model = Model(config, ds)
  steps_per_epoch = max(ds.num_train // config.batch_size, 1)
  total_steps = config.get("num_steps") or config.num_epochs * steps_per_epoch
  if config.method == "saf" and ds.stream is not None:
    raise ValueError(
      f"method='saf' remembers each training example's outputs; {config.dataset!r} is "
      "streamed without example indices. Use it with the in-memory datasets."
    )
  tx = methods.make_optimizer(config, total_steps, ds.num_train, ds.num_classes)
  step_fn = methods.make_step(config.method, model.apply, tx, config, steps_per_epoch)
  probability = methods.step_probability(config)

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
    state = place_state(state, shardings)
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
  # Randomized two-pass methods: a plain SGD step on the other steps (two programs).
  plain_step = compiled_step(methods.make_step("sgd", model.apply, tx, config))

  mngr = ocp.CheckpointManager(
    os.path.abspath(ckpts),
    options=ocp.CheckpointManagerOptions(
      save_interval_steps=config.checkpoint_every_steps, max_to_keep=2
    ),
  )
  wall_offset, start = 0.0, 0
  latest = mngr.latest_step()
  if latest is not None:
    try:
      restored = mngr.restore(
        latest,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()),
      )
    except Exception as e:  # noqa: BLE001
      raise ValueError(
        f"the checkpoint at step {latest} in {ckpts} does not fit this run's state (another "
        f"model, method or optimiser chain?): {type(e).__name__}: {str(e)[:500]}. Use another "
        "--workdir, or delete it to start fresh."
      ) from e
    state = restored["state"]
    wall_offset = float(restored["meta"]["wall"])
    start = int(state["step"])
    logging.info("Resumed from step %d", start)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  history = []
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      history = [r for r in map(json.loads, f) if r["step"] <= start]
  if is_lead():
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in history)

  def save(step, force=False):
    wall = float(wall_offset + time.time() - t0)
    mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"wall": wall})
      ),
      force=force,
    )

  eval_step = make_eval_step(model.apply)
  # Train metrics on the first config.train_eval_examples rows (0: the whole split).
  train_view = _train_eval_view(ds, int(config.get("train_eval_examples", 0) or 0))
  eval_every = config.eval_every_epochs * steps_per_epoch
  hess_every = config.hessian.get("every_evals", 0)
  hessian_ok = not (n_proc > 1 and config.sharding == "fsdp")
  if not hessian_ok and config.hessian.num_iters > 0 and is_lead():
    logging.warning(
      "Hessian metrics are skipped: with FSDP across %d processes the parameters are "
      "sharded over hosts; run them with --config.sharding=replicated.",
      n_proc,
    )
  t0 = time.time()
  bar = None
  if config.get("progress", True) and is_lead():
    from tqdm import tqdm

    bar = tqdm(
      total=total_steps, initial=start, desc=config.method, dynamic_ncols=True, leave=False
    )
  pending = []
  record = {}
  stream = None
  if ds.stream is not None:  # TFDS: this process's stream, resumed at the step
    stream = ds.stream.train_batches(config.seed, start, config.batch_size // n_proc)
  for step in range(start, total_steps):
    if stream is not None:
      batch = next(stream)
    else:
      batch = input_pipeline.train_batch(
        ds, step, config.batch_size, config.seed, process_index=proc, process_count=n_proc
      )
    expensive = methods.takes_expensive_step(config.seed, step, probability)
    state, m = (train_step if expensive else plain_step)(state, global_batch(batch, mesh))
    pending.append(m)
    done = step + 1
    if bar is not None:
      bar.update(1)
    if done % eval_every == 0 or done == total_steps:
      m_host = jax.device_get(pending)
      pending = []
      keys = dict.fromkeys(k for x in m_host for k in x)  # plain steps lack method metrics
      train_metrics = {k: float(np.mean([x[k] for x in m_host if k in x])) for k in keys}
      if not np.isfinite(train_metrics["loss"]):
        raise FloatingPointError(
          f"training loss is {train_metrics['loss']} at step {done}: lower the learning rate "
          "(config.learning_rate) or the NRS alpha/radius; the last good checkpoint is kept."
        )
      p, bs = state["params"], state["batch_stats"]
      tl, ta = _eval_metrics(eval_step, p, bs, train_view, "train", 1000, mesh)
      vl, va = _eval_metrics(eval_step, p, bs, ds, "validation", 1000, mesh)
      tel, te = _eval_metrics(eval_step, p, bs, ds, "test", 1000, mesh)
      record = {
        "step": done,
        "epoch": done / steps_per_epoch,
        **{f"train/{k}": v for k, v in train_metrics.items()},
        "train_loss": tl,
        "train_accuracy": ta,
        "val_accuracy": va,
        "test_accuracy": te,
        "val_loss": vl,
        "test_loss": tel,
        "wall_seconds": wall_offset + time.time() - t0,
      }
      n_eval = done // eval_every if eval_every else 0
      want_hessian = done == total_steps or (hess_every and n_eval % hess_every == 0)
      if want_hessian and config.hessian.num_iters > 0 and hessian_ok:
        key = jax.random.fold_in(base_key, 2**31 - 1)
        record.update(_hessian(model, p, bs, ds, config, key, mesh))
      if is_lead():
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
  final = host_state(state)  # collective under several processes: every process calls it
  if is_lead():
    np.savez(os.path.join(workdir, "final_state.npz"), **final)
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
  initialize_distributed(config)  # once, before the first run
  summary = {}
  for method in config.compare_methods:
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.method = method
    rec = train_and_evaluate(cfg, os.path.join(workdir, method))
    summary[method] = {k: float(rec.get(src, float("nan"))) for k, src in SUMMARY_KEYS.items()}
    if is_lead():
      print(f"{method}: test accuracy {summary[method]['test_accuracy']:.4f}", flush=True)
  if is_lead():
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
