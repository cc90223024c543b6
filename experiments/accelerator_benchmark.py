"""Step cost of NRS, SAM and SGD on an accelerator: one short run, side by side.

  python -m experiments.accelerator_benchmark                  # ResNet-18, CIFAR shape, batch 256
  python -m experiments.accelerator_benchmark --model=tiny     # seconds on a CPU (the test)

Imports only jax, optax, flax, numpy and this repository (no ml_collections,
TensorFlow or mnist1d), so it runs on a bare GPU machine. Every row is compiled
first (compile seconds and XLA's memory analysis per row), then all rows are
timed round-robin in one process, so load changes hit every row alike; ratios
to the SGD and SAM steps of the same run are what to compare. The rows:

- bfloat16 compute (float32 master weights, BatchNorm statistics kept in
  float32): SGD; SAM as this repository's two-pass step and as
  ``optax.contrib.sam`` in opaque mode; NRS K=1 (``auto``, with a fixed centre,
  and the optax transform with a fixed centre and ``center_logits``); NRS K=4
  under ``auto``, ``vmap``, ``loop``, ``chunked`` (chunks of one, unrolled; this
  was ``accumulate``) and ``chunked2`` (chunks of 2 under ``lax.scan``).
- float32: SGD and NRS K=1.

Writes ``benchmark_gpu_<device>.json`` (``--out``), naming the device, with
seconds, images per second, compile seconds, XLA temp and argument bytes per
row, the ratios, and whether ``strategy="auto"`` was within 5% of the fastest
strategy at K=4. ``--budget_s`` stops compiling new rows after that many
seconds; what was compiled is still timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nrs_jax
from experiments import methods
from experiments import models
from experiments import timing

MODELS = {
  # name: (constructor, input shape, batch, timed rounds)
  "resnet18": (lambda: models.create_model("resnet18", (32, 32, 3), 10, 0), (32, 32, 3), 256, 20),
  "tiny": (
    lambda: models.ResNet(10, (1,), width=4, in_channels=3, rngs=nnx.Rngs(0)),
    (4, 4, 3),
    8,
    3,
  ),
}


class _Config(dict):
  """The attribute access methods.py expects of an ml_collections config."""

  __getattr__ = dict.__getitem__


def _config(**nrs) -> _Config:
  return _Config(
    seed=0,
    learning_rate=0.1,
    weight_decay=5e-4,
    momentum=0.9,
    sam=_Config(rho=0.05),
    nrs=dict(alpha=1.0, radius=0.05, **nrs),
  )


def _apply_fn(graphdef, rest, dtype):
  """``apply(params, bs, x, train, key) -> (logits, new_bs)`` computing in ``dtype``.

  Mixed precision as usual: float32 master weights cast to ``dtype`` for the
  forward pass, BatchNorm statistics accumulated and stored in float32.
  """

  def cast(tree):
    return jax.tree_util.tree_map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )

  def apply(params, bs, x, train, dropout_key):
    m = nnx.merge(graphdef, cast(params), bs, rest, copy=True)
    for _, node in nnx.iter_graph(m):
      if isinstance(node, nnx.BatchNorm):
        node.dtype = dtype  # statistics stay float32; the normalised output is in dtype
    logits = m(x.astype(dtype), train=train, dropout_key=dropout_key)
    return logits, nnx.state(m, nnx.BatchStat)

  return apply


def _optax_sam_step(apply, rho):
  """``optax.contrib.sam`` (opaque mode, sync period 2) around the same SGD chain."""
  base = methods.base_optimizer(_config(), 1000)
  tx = optax.contrib.sam(
    base,
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    sync_period=2,
    opaque_mode=True,
  )

  def step(params, bs, opt_state, batch, key):
    (loss, (_, new_bs)), g = methods._grad_at(apply, params, bs, batch, key)
    grad_fn = lambda p, _: methods._grad_at(apply, p, bs, batch, key)[1]
    updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_bs, opt_state, {"loss": loss}

  return step, tx


def _rows(k: int, batch_size: int):
  """(label, dtype, method, nrs options) for every row, the most wanted first."""
  bf, f32 = jnp.bfloat16, jnp.float32
  rows = [
    ("sgd", bf, "sgd", {}),
    ("sam", bf, "sam", {}),
    ("sam_optax_opaque", bf, "optax_sam", {}),
    ("nrs_k1_auto", bf, "nrs", dict(num_neighbors=1)),
    # Neighbours on a quarter of the batch: 1 + 2/4 SGD passes, 1 + 1/4 reusing the centre.
    ("nrs_k1_sub4", bf, "nrs", dict(num_neighbors=1, neighbor_batch_size=batch_size // 4)),
    (
      "nrs_k1_sub4_reuse",
      bf,
      "nrs",
      dict(num_neighbors=1, neighbor_batch_size=batch_size // 4, reuse_center_logits=True),
    ),
  ]
  for s in ("auto", "vmap", "loop", "chunked", "chunked2"):
    opts = dict(num_neighbors=k, strategy=s)
    if s == "chunked2":  # chunks of two under lax.scan ("chunked": chunks of one, unrolled)
      opts = dict(num_neighbors=k, strategy="chunked", neighbor_chunk_size=2)
    rows.append((f"nrs_k{k}_{s}", bf, "nrs", opts))
  rows += [
    ("sgd_f32", f32, "sgd", {}),
    ("nrs_k1_auto_f32", f32, "nrs", dict(num_neighbors=1)),
    ("nrs_k1_fixed_centre", bf, "nrs", dict(num_neighbors=1, stop_gradient_center=True)),
    (
      "nrs_k1_transform_fixed_centre",
      bf,
      "nrs",
      dict(num_neighbors=1, stop_gradient_center=True, implementation="transform"),
    ),
  ]
  return rows


def _device_name() -> str:
  d = jax.devices()[0]
  return re.sub(r"[^a-z0-9]+", "_", str(getattr(d, "device_kind", d.platform)).lower()).strip("_")


def run(model: str, k: int = 4, repeats: int = 0, budget_s: float = 1e9, only: tuple = ()) -> dict:
  make, shape, batch_size, default_repeats = MODELS[model]
  repeats = repeats or default_repeats
  net = make()
  graphdef, params, bs, rest = nnx.split(net, nnx.Param, nnx.BatchStat, ...)
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 10, batch_size)),
  }
  key = jax.random.key(0)
  rows, fns = {}, {}
  t_start = time.perf_counter()
  for label, dtype, method, opts in _rows(k, batch_size):
    if only and label not in only:
      continue
    if time.perf_counter() - t_start > budget_s:
      print(f"  budget reached: {label} not compiled", flush=True)
      continue
    apply = _apply_fn(graphdef, rest, dtype)
    if method == "optax_sam":
      step, tx = _optax_sam_step(apply, _config().sam.rho)
    else:
      config = _config(**opts)
      config["method"] = method
      tx = methods.make_optimizer(config, 1000)
      step = methods.make_step(method, apply, tx, config)
    args = (params, bs, tx.init(params), batch, key)
    t0 = time.perf_counter()
    try:
      compiled = jax.jit(step).lower(*args).compile()
    except Exception as e:  # noqa: BLE001  (record it and go on: one device call per run)
      rows[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      print(f"  {label:32s} FAILED: {rows[label]['error'][:300]}", flush=True)
      continue
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    rows[label] = {
      "dtype": jnp.dtype(dtype).name,
      "compile_seconds": compile_s,
      "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0),
      "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0) or 0),
    }
    fns[label] = (compiled, args)
    print(f"  {label:32s} compile {compile_s:7.2f} s", flush=True)
  for label, secs in timing.interleaved_medians(fns, repeats).items():
    rows[label]["seconds"] = secs
    rows[label]["images_per_second"] = batch_size / secs
  result = summarize(rows, k, model, batch_size, repeats)
  small = MODELS["tiny"]  # the agreement check needs a conv net with BatchNorm, not a big one
  x = jnp.asarray(rng.normal(size=(small[2], *small[1])), jnp.float32)
  result["strategy_agreement"] = check_strategies(small[0](), x, k)
  return result


def check_strategies(net, x, k: int) -> dict:
  """Value and gradient of the NRS penalty under every strategy, relative to ``loop``.

  float32, train mode (BatchNorm on batch statistics), on this device: the
  custom VJP of ``chunked`` and the draw must agree here too.
  """
  graphdef, params, bs, rest = nnx.split(net, nnx.Param, nnx.BatchStat, ...)
  apply = _apply_fn(graphdef, rest, jnp.float32)
  logits_fn = lambda p: apply(p, bs, x, True, None)[0]
  out = {}
  ref = None
  for s in ("loop", "vmap", "chunked", "chunked2"):
    fn = jax.jit(
      jax.value_and_grad(
        lambda p: nrs_jax.nrs_penalty(
          logits_fn,
          p,
          jax.random.key(1),
          radius=0.05,
          num_neighbors=k,
          strategy="chunked" if s == "chunked2" else s,
          neighbor_chunk_size=2 if s == "chunked2" else None,
        )
      )
    )
    try:
      value, grad = fn(params)
    except Exception as e:  # noqa: BLE001
      out[s] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      continue
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)])
    if ref is None:
      ref = (float(value), flat)
    out[s] = {
      "value": float(value),
      "value_rel_diff": abs(float(value) - ref[0]) / max(abs(ref[0]), 1e-30),
      "grad_rel_diff": float(np.linalg.norm(flat - ref[1]) / max(np.linalg.norm(ref[1]), 1e-30)),
    }
  print(f"  strategy agreement vs loop: {out}", flush=True)
  return out


def summarize(rows: dict, k: int, model: str, batch_size: int, repeats: int) -> dict:
  sgd, sam = rows["sgd"]["seconds"], rows["sam"]["seconds"]
  for r in rows.values():
    if "seconds" in r:
      r["vs_sgd"], r["vs_sam"] = r["seconds"] / sgd, r["seconds"] / sam
      r["compile_vs_sgd"] = r["compile_seconds"] / rows["sgd"]["compile_seconds"]
  strategies = {
    s: rows[f"nrs_k{k}_{s}"]["seconds"]
    for s in ("vmap", "loop", "chunked", "chunked2")
    if "seconds" in rows.get(f"nrs_k{k}_{s}", {})
  }
  checks = {}
  if strategies and "seconds" in rows.get(f"nrs_k{k}_auto", {}):
    fastest = min(strategies, key=strategies.get)
    auto = rows[f"nrs_k{k}_auto"]["seconds"]
    checks[f"k{k}_fastest_strategy"] = fastest
    checks[f"k{k}_auto_vs_fastest"] = auto / strategies[fastest]
    checks[f"k{k}_auto_within_5pct"] = bool(auto <= 1.05 * strategies[fastest])
  for label, work in (("nrs_k1_sub4", 1.5), ("nrs_k1_sub4_reuse", 1.25)):
    if "seconds" in rows.get(label, {}):  # against the work count in SGD passes
      checks[f"{label}_vs_work"] = rows[label]["vs_sgd"] / work
  if "seconds" in rows.get("nrs_k1_auto_f32", {}):
    checks["bf16_speedup_sgd"] = rows["sgd_f32"]["seconds"] / sgd
    checks["bf16_speedup_nrs_k1"] = (
      rows["nrs_k1_auto_f32"]["seconds"] / rows["nrs_k1_auto"]["seconds"]
    )
  return {
    "machine": {
      "backend": jax.default_backend(),
      "device": str(getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform)),
      "devices": len(jax.devices()),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "optax": optax.__version__,
    },
    "model": model,
    "batch_size": batch_size,
    "repeats": repeats,
    "k": k,
    "rows": rows,
    "checks": checks,
  }


def markdown_table(result: dict) -> str:
  lines = [
    f"{result['machine']['device']}, {result['model']}, batch {result['batch_size']}, "
    f"jax {result['machine']['jax']}",
    "",
    "| row | dtype | x SGD | x SAM | images/s | compile s | temp MiB |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, r in result["rows"].items():
    if "seconds" not in r:
      lines.append(f"| {label} | {r.get('error', 'not run')[:80]} | | | | | |")
      continue
    lines.append(
      f"| {label} | {r['dtype']} | {r['vs_sgd']:.2f} | {r['vs_sam']:.2f} | "
      f"{r['images_per_second']:.0f} | {r['compile_seconds']:.1f} | {r['temp_bytes'] / 2**20:.0f} |"
    )
  lines += ["", "| check | value |", "|---|---|"]
  lines += [
    f"| {c} | {v if isinstance(v, (str, bool)) else f'{v:.2f}'} |"
    for c, v in result["checks"].items()
  ]
  for s, r in result.get("strategy_agreement", {}).items():
    diff = r.get("error") or f"value {r['value_rel_diff']:.1e}, grad {r['grad_rel_diff']:.1e}"
    lines.append(f"| {s} vs loop (float32) | {diff} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
  parser.add_argument("--k", type=int, default=4, help="neighbours for the strategy rows")
  parser.add_argument("--repeats", type=int, default=0, help="timed rounds (0: model default)")
  parser.add_argument("--budget_s", type=float, default=1e9, help="stop compiling new rows after")
  parser.add_argument(
    "--out", default="", help="JSON path, or a folder for benchmark_gpu_<device>.json (default: .)"
  )
  parser.add_argument(
    "--check_only", action="store_true", help="only the strategy agreement check (printed)"
  )
  parser.add_argument("--rows", default="", help="comma-separated row labels (default: all)")
  args = parser.parse_args(argv)
  if args.check_only:
    small = MODELS["tiny"]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(small[2], *small[1])), jnp.float32)
    return check_strategies(small[0](), x, args.k)
  only = tuple(r for r in args.rows.split(",") if r)
  result = run(args.model, args.k, args.repeats, args.budget_s, only)
  out = args.out or "."
  if os.path.isdir(out):
    out = os.path.join(out, f"benchmark_gpu_{_device_name()}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print()
  print(markdown_table(result))
  print(f"\nwrote {out}")
  return result


if __name__ == "__main__":
  main()
