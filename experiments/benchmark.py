"""Step-time, compile-time and memory ratios of NRS vs SGD and SAM, measured side by side.

  python -m experiments.benchmark                       # CPU: MLP, CNN, ResNet-18 (batch 128)
  python -m experiments.benchmark --models=mlp --ks=1 --repeats=5 --out=benchmark.json
  python -m experiments.benchmark --accelerator         # GPU/TPU: ResNet-18, batch 256, bfloat16
  python -m experiments.benchmark --accelerator --models=tiny   # the same rows in seconds on a CPU

Both entry points build their rows from one list (:func:`row_specs`) over one set of
models, compile each row first (compile seconds, XLA's memory analysis), then time all
rows round-robin in one process (``timing.interleaved_medians``: a change in machine
load hits every row alike). Ratios to the SGD and SAM steps of the same run are what to
compare. The accelerator run computes in bfloat16 (float32 master weights and BatchNorm
statistics) with float32 reference rows, checks that the strategies agree on the
device, and writes ``benchmark_gpu_<device>.json``; the CPU run adds the flatness
toolkit's and token-level rows and writes ``benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import nrs_jax
from experiments import losses
from experiments import models
from experiments import optimizers
from experiments import steps
from experiments import timing
from experiments.tables import markdown_table

MODELS = {
  # name: (model, kwargs, input shape, CPU batch, accelerator batch, default timed rounds)
  "mlp": ("mlp", dict(hidden=(256, 256)), (40,), 128, 128, 60),
  "mlp11": ("mlp", dict(hidden=(256, 256)), (40,), 128, 128, 60),  # 11 classes: 79,115 params
  "cnn": ("cnn1d", dict(channels=(64, 64, 64)), (40,), 128, 128, 20),
  "resnet18": ("resnet18", {}, (32, 32, 3), 128, 256, 3),
  "tiny": ("resnet18", dict(stage_sizes=(1,), width=4), (4, 4, 3), 8, 8, 3),
}


def _model(name: str):
  model, kwargs, shape = MODELS[name][:3]
  return models.create_model(model, shape, 11 if name == "mlp11" else 10, 0, **kwargs)


def row_specs(model: str, ks: list, batch_size: int, accelerator: bool) -> list:
  """(label, dtype, method, nrs options) per row, the most wanted first."""
  dt = "bfloat16" if accelerator else "float32"
  specs = [("sgd", dt, "sgd", {}), ("sam", dt, "sam", {})]
  specs += [("sam_optax_opaque", dt, "optax_sam", {})] if accelerator else []
  conv_on_cpu = model == "resnet18" and not accelerator  # vmap/scan over conv: 10-100x slower
  for k in ks:
    strategies = (
      ["auto"]
      if conv_on_cpu or (accelerator and k != max(ks))
      else ["auto", "loop", "chunked", "vmap"]
    )
    chunk = k // 4 if k >= 8 else (2 if accelerator and k >= 4 else 0)  # chunks under lax.scan
    for s in strategies + ([f"chunked{chunk}"] if chunk and len(strategies) > 1 else []):
      opts = {"num_neighbors": k, "strategy": "chunked" if s.startswith("chunked") else s}
      specs.append(
        (f"nrs_k{k}_{s}", dt, "nrs", {**opts, **({"neighbor_chunk_size": chunk} if s[7:] else {})})
      )
    if not accelerator:
      specs.append(
        (f"nrs_k{k}_transform", dt, "nrs", {"num_neighbors": k, "implementation": "transform"})
      )
    if k == 1 or not (conv_on_cpu or accelerator):  # a fixed centre, fused and transform
      sg = {"num_neighbors": k, "stop_gradient_center": True}
      specs += [
        (f"nrs_k{k}_fused_sg", dt, "nrs", sg),
        (f"nrs_k{k}_transform_sg", dt, "nrs", {**sg, "implementation": "transform"}),
      ]
  for k in [k for k in ks if k <= 2 and (k == 1 or not (conv_on_cpu or accelerator))]:
    for frac in (4, 8):  # neighbours on B/frac: 1 + (K+1)/frac SGD passes, 1 + K/frac reusing
      sub = {"num_neighbors": k, "neighbor_batch_size": batch_size // frac}
      specs += [
        (f"nrs_k{k}_sub{frac}", dt, "nrs", sub),
        (f"nrs_k{k}_sub{frac}_reuse", dt, "nrs", {**sub, "reuse_center_logits": True}),
      ]
  if accelerator:
    specs += [
      ("sgd_f32", "float32", "sgd", {}),
      ("nrs_k1_auto_f32", "float32", "nrs", {"num_neighbors": 1}),
    ]
  return specs


def _config(method: str, nrs: dict) -> ml_collections.ConfigDict:
  base = dict(seed=0, learning_rate=0.1, weight_decay=5e-4, momentum=0.9, method=method)
  config = ml_collections.ConfigDict({**base, **steps.method_defaults()})
  config.nrs.update(nrs)
  return config


def _apply_fn(graphdef, rest, dtype):
  """``apply(params, bs, x, train, key) -> (logits, new_bs)`` computing in ``dtype``, with
  float32 master weights and BatchNorm statistics (mixed precision as usual)."""
  cast = lambda t: jax.tree_util.tree_map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t
  )

  def apply(params, bs, x, train, dropout_key):
    m = nnx.merge(graphdef, cast(params), bs, rest, copy=True)
    for _, node in nnx.iter_graph(m):
      if isinstance(node, nnx.BatchNorm):
        node.dtype = dtype  # statistics stay float32; the normalised output is in dtype
    return m(x.astype(dtype), train=train, dropout_key=dropout_key), nnx.state(m, nnx.BatchStat)

  return apply


def _step(method: str, apply, nrs: dict):
  config = _config("sam" if method == "optax_sam" else method, nrs)
  tx = optimizers.make_optimizer(config, 1000)
  if method != "optax_sam":
    return steps.make_step(method, apply, tx, config), tx
  # optax.contrib.sam (opaque mode, sync period 2) around the same SGD chain.
  inner = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam.rho))
  tx = optax.contrib.sam(
    optimizers.base_optimizer(config, 1000), inner, sync_period=2, opaque_mode=True
  )

  def step(params, bs, opt_state, batch, key):
    (loss, (_, new_bs)), g = steps.grad_at(apply, params, bs, batch, key)
    grad_fn = lambda p, _: steps.grad_at(apply, p, bs, batch, key)[1]
    updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), new_bs, opt_state, {"loss": loss}

  return step, tx


def measure(
  model: str, ks: list, accelerator: bool, repeats: int = 0, budget_s: float = 1e9, only=()
) -> dict:
  """Compiles every row (an error is recorded, not raised), then times them side by side."""
  _, _, shape, cpu_batch, acc_batch, default_repeats = MODELS[model]
  batch_size = acc_batch if accelerator else cpu_batch
  graphdef, params, bs, rest = nnx.split(_model(model), nnx.Param, nnx.BatchStat, ...)
  rng = np.random.default_rng(0)
  batch = {
    "x": jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, 10, batch_size)),
  }
  key, rows, fns, t_start = jax.random.key(0), {}, {}, time.perf_counter()
  for label, dtype, method, nrs in row_specs(model, ks, batch_size, accelerator):
    if (only and label not in only) or time.perf_counter() - t_start > budget_s:
      continue
    step, tx = _step(method, _apply_fn(graphdef, rest, jnp.dtype(dtype)), nrs)
    args = (params, bs, tx.init(params), batch, key)
    t0 = time.perf_counter()
    try:
      compiled = jax.jit(step).lower(*args).compile()
    except Exception as e:  # noqa: BLE001  (record it and go on: one device call per run)
      rows[label] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      continue
    mem = compiled.memory_analysis()
    rows[label] = {"dtype": dtype, "compile_seconds": time.perf_counter() - t0}
    for field in ("temp", "argument"):
      rows[label][f"{field}_bytes"] = int(getattr(mem, f"{field}_size_in_bytes", 0) or 0)
    fns[label] = (compiled, args)
    print(f"  {model:9s} {label:32s} compile {rows[label]['compile_seconds']:6.2f} s", flush=True)
  if not accelerator:  # sampling alone, as a share of the NRS K=1 step
    sample = lambda p, k: nrs_jax.sample_perturbations(p, k, radius=0.05, num_neighbors=1).deltas
    fns["sampling_k1"], rows["sampling_k1"] = (jax.jit(sample), (params, key)), {}
  for label, secs in timing.interleaved_medians(fns, repeats or default_repeats).items():
    rows[label].update(seconds=secs, images_per_second=batch_size / secs)
  return rows


def summarize(rows: dict, ks: list) -> dict:
  """Adds each row's ratios to SGD and SAM in place; returns the checks its rows allow."""
  sgd, sam = rows["sgd"]["seconds"], rows["sam"]["seconds"]
  secs = lambda label: rows.get(label, {}).get("seconds")
  for r in rows.values():
    if "compile_seconds" in r and "seconds" in r:
      r.update(
        vs_sgd=r["seconds"] / sgd, vs_sam=r["seconds"] / sam, temp_mb=r["temp_bytes"] / 2**20
      )
      r["compile_vs_sgd"] = r["compile_seconds"] / rows["sgd"]["compile_seconds"]
  checks = {}
  for k in ks:
    auto = secs(f"nrs_k{k}_auto")
    if auto is None:
      continue
    checks[f"default_k{k}_vs_floor"] = auto / (0.5 * (1 + k) * sam)  # target <= 1
    if secs(f"nrs_k{k}_transform"):  # the transform redoes the centre: (2+K)/(1+K) the work
      checks[f"transform_k{k}_vs_fused"] = secs(f"nrs_k{k}_transform") / auto
    transform_sg, fused_sg = secs(f"nrs_k{k}_transform_sg"), secs(f"nrs_k{k}_fused_sg")
    if transform_sg and fused_sg:  # target <= 1.15
      checks[f"transform_sg_k{k}_vs_fused_sg"] = transform_sg / fused_sg
    strategies = {
      s: secs(f"nrs_k{k}_{s}")
      for s in ("loop", "chunked", "vmap", *(f"chunked{c}" for c in (2, k // 4)))
    }
    strategies = {s: v for s, v in strategies.items() if v}
    if len(strategies) > 1:
      fastest = min(strategies, key=strategies.get)
      checks[f"k{k}_fastest_strategy"] = fastest
      checks[f"k{k}_auto_vs_fastest"] = auto / strategies[fastest]
      checks[f"k{k}_auto_within_5pct"] = bool(auto <= 1.05 * strategies[fastest])
  for label in rows:  # sub-batch rows against their work count in SGD passes
    m = re.fullmatch(r"nrs_k(\d+)_sub(\d+)(_reuse)?", label)
    if m and secs(label):
      k, frac = int(m[1]), int(m[2])
      checks[f"{label}_vs_work"] = secs(label) / sgd / (1 + (k if m[3] else k + 1) / frac)
  if secs("sampling_k1") and secs("nrs_k1_auto"):
    checks["sampling_share_k1"] = secs("sampling_k1") / secs("nrs_k1_auto")
  if secs("nrs_k1_auto_f32") and secs("sgd_f32"):
    checks["bf16_speedup_sgd"] = secs("sgd_f32") / sgd
    checks["bf16_speedup_nrs_k1"] = secs("nrs_k1_auto_f32") / secs("nrs_k1_auto")
  return checks


def check_strategies(k: int) -> dict:
  """The NRS penalty's value and gradient under every strategy relative to ``loop``, on the
  tiny ResNet in train mode (float32, BatchNorm on batch statistics), on this device."""
  _, _, shape, batch_size, _, _ = MODELS["tiny"]
  graphdef, params, bs, rest = nnx.split(_model("tiny"), nnx.Param, nnx.BatchStat, ...)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch_size, *shape)), jnp.float32)
  logits_fn = lambda p: _apply_fn(graphdef, rest, jnp.float32)(p, bs, x, True, None)[0]
  out, ref = {}, None
  for s in ("loop", "vmap", "chunked", "chunked2"):
    opts = dict(strategy="chunked", neighbor_chunk_size=2) if s == "chunked2" else dict(strategy=s)
    pen = lambda p, opts=opts: nrs_jax.nrs_penalty(
      logits_fn, p, jax.random.key(1), radius=0.05, num_neighbors=k, **opts
    )
    try:
      value, grad = jax.jit(jax.value_and_grad(pen))(params)
    except Exception as e:  # noqa: BLE001
      out[s] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      continue
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)])
    ref = ref or (float(value), flat)
    out[s] = {
      "value": float(value),
      "value_rel_diff": abs(float(value) - ref[0]) / max(abs(ref[0]), 1e-30),
      "grad_rel_diff": float(np.linalg.norm(flat - ref[1]) / max(np.linalg.norm(ref[1]), 1e-30)),
    }
  return out


def bench_tokens(vocabs, k=4, batch=16, length=128, width=128, repeats=10) -> dict:
  """Token-level NRS over ``[B, T, V]`` logits with a padding mask (``where``, a quarter of
  the positions padded): per vocab size, XLA's temp memory and the step time of ``loop``,
  ``vmap`` and ``chunked`` with K neighbours, over plain cross-entropy's."""
  out, rng = {}, np.random.default_rng(0)
  for v in vocabs:
    tokens = jnp.asarray(rng.integers(0, v, (batch, length)))
    where = jnp.asarray(np.arange(length)[None, :] < rng.integers(length // 2, length, (batch, 1)))
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
      "emb": jax.random.normal(keys[0], (v, width)) * 0.02,
      "hidden": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
      "out": jax.random.normal(keys[2], (width, v)) / np.sqrt(width),
    }
    logits_fn = lambda p, tokens=tokens: jax.nn.gelu(p["emb"][tokens] @ p["hidden"]) @ p["out"]

    def task(p, tokens=tokens, where=where, logits_fn=logits_fn):
      ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), tokens)
      return jnp.sum(ce * where) / jnp.sum(where)

    def loss(p, strategy, where=where, logits_fn=logits_fn, task=task):
      key = jax.random.key(1)
      pen = nrs_jax.nrs_penalty(
        logits_fn, p, key, radius=0.01, num_neighbors=k, strategy=strategy, where=where
      )
      return task(p) + pen

    fns, rows = {}, {}
    for label, f in [("ce", task)] + [
      (s, partial(loss, strategy=s)) for s in ("loop", "vmap", "chunked")
    ]:
      compiled = jax.jit(jax.grad(f)).lower(params).compile()
      rows[label] = {"temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
      fns[label] = (compiled, (params,))
    secs = timing.interleaved_medians(fns, repeats)
    for label, r in rows.items():
      r.update(
        seconds=secs[label], vs_ce=secs[label] / secs["ce"], temp_mib=r["temp_bytes"] / 2**20
      )
    out[f"V{v}"] = rows
  return out


def bench_hessian(repeats: int = 10) -> dict:
  """HVP time over gradient time (MLP, small CNN) and k=5 Lanczos on a ~100k MLP."""
  from nrs_jax import flatness

  out, rng = {}, np.random.default_rng(0)
  for name, model_name, kwargs, shape in (
    ("mlp", "mlp", dict(hidden=(256, 256)), (40,)),
    ("cnn", "cnn1d", dict(channels=(64, 64, 64)), (40,)),
    ("mlp_100k", "mlp", dict(hidden=(384, 192)), (64,)),
  ):
    graphdef, params, rest = nnx.split(
      models.create_model(model_name, shape, 10, 0, **kwargs), nnx.Param, ...
    )
    data = (
      jnp.asarray(rng.normal(size=(128, *shape)), jnp.float32),
      jnp.asarray(rng.integers(0, 10, 128)),
    )
    loss = lambda p, b, g=graphdef, r=rest: losses.cross_entropy(
      nnx.merge(g, p, r, copy=True)(b[0]), b[1]
    )
    grad = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, v, b, loss=loss: flatness.hvp(loss, p, v, b))
    t = timing.interleaved_medians(
      {"grad": (grad, (params, data)), "hvp": (hvp, (params, params, data))}, repeats
    )
    row = {
      "params": sum(int(a.size) for a in jax.tree_util.tree_leaves(params)),
      "hvp_vs_grad": t["hvp"] / t["grad"],
    }
    if name == "mlp_100k":
      t0 = time.perf_counter()
      r = flatness.top_hessian_eigenvalues(loss, params, data, jax.random.key(0), k=5, num_iters=60)
      row.update(
        lanczos_k5_vs_grad=(time.perf_counter() - t0) / t["grad"], lanczos_iters=r.num_iters
      )
    out[name] = row
  return out


def _machine() -> dict:
  d = jax.devices()[0]
  return dict(
    backend=jax.default_backend(),
    device=str(getattr(d, "device_kind", d.platform)),
    devices=[str(x) for x in jax.devices()],
    cpu_count=os.cpu_count(),
    platform=platform.platform(),
    jax=jax.__version__,
    optax=optax.__version__,
  )


def report(result: dict) -> str:
  """The markdown tables of a result (either entry point's)."""
  f = lambda v: v if isinstance(v, (str, bool)) else f"{v:.2f}"
  rows, checks = [], []
  for model, m in result["models"].items():
    for label, r in m["raw"].items():
      cells = (
        [f"{r[c]:.2f}" for c in ("vs_sgd", "vs_sam", "compile_vs_sgd")]
        if "vs_sgd" in r
        else [r.get("error", "not timed")[:80], "", ""]
      )
      rows.append(
        [model, label, r.get("dtype", ""), *cells, f"{r.get('temp_bytes', 0) / 2**20:.1f}"]
      )
    checks += [[model, c, f(v)] for c, v in m["checks"].items()]
    for s, r in m.get("strategy_agreement", {}).items():
      diff = f"value {r.get('value_rel_diff', 0):.1e}, grad {r.get('grad_rel_diff', 0):.1e}"
      checks.append([model, f"{s} vs loop (float32)", r.get("error") or diff])
  out = [
    markdown_table(["model", "row", "dtype", "x SGD", "x SAM", "compile x SGD", "temp MiB"], rows),
    "",
    markdown_table(["model", "check", "value"], checks),
  ]
  if "hessian" in result:
    h = [
      [n, str(r["params"]), f"{r['hvp_vs_grad']:.2f}", f"{r.get('lanczos_k5_vs_grad', 0):.0f}"]
      for n, r in result["hessian"].items()
    ]
    out += ["", markdown_table(["model", "params", "HVP / grad", "k=5 Lanczos / grad"], h)]
  if "tokens" in result:
    t = [
      [v, label, f"{r['vs_ce']:.2f}", f"{r['temp_mib']:.1f}"]
      for v, rs in result["tokens"].items()
      for label, r in rs.items()
    ]
    out += ["", markdown_table(["vocab", "row", "step x CE", "XLA temp MiB"], t)]
  return "\n".join(out)


def main(argv=None) -> dict:
  listed = lambda s: [x for x in s.split(",") if x]
  ints = lambda s: [int(k) for k in listed(s)]
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--accelerator", action="store_true", help="the GPU/TPU run (bfloat16 rows)")
  p.add_argument("--models", type=listed, help="default: mlp,cnn,resnet18 (CPU), resnet18")
  p.add_argument("--ks", type=ints, help="default: 1,2,4,8 (CPU), 1,4")
  p.add_argument("--repeats", type=int, default=0, help="timed rounds (0: the model's default)")
  p.add_argument("--budget_s", type=float, default=1e9, help="stop compiling new rows after this")
  p.add_argument("--rows", type=listed, default=[], help="only these row labels")
  p.add_argument("--out", default="", help="JSON path (a folder: benchmark_gpu_<device>.json)")
  p.add_argument("--nohessian", dest="hessian", action="store_false", help="skip the HVP rows")
  p.add_argument("--token_vocabs", type=ints, default=[])
  p.add_argument("--check_only", action="store_true", help="only the strategy agreement check")
  a = p.parse_args(argv)
  acc = a.accelerator
  ks = a.ks or ([1, 4] if acc else [1, 2, 4, 8])
  if a.check_only:
    return check_strategies(max(ks))
  result: dict = {"machine": _machine(), "models": {}}
  names = ["resnet18"] if acc else ["mlp", "cnn", "resnet18"]
  for name in names if a.models is None else a.models:
    raw = measure(name, ks, acc, a.repeats, a.budget_s, a.rows)
    result["models"][name] = {"raw": raw, "checks": summarize(raw, ks)}
    if acc:
      result["models"][name]["strategy_agreement"] = check_strategies(max(ks))
  if a.hessian and not acc:
    result["hessian"] = bench_hessian()
  if a.token_vocabs:
    result["tokens"] = bench_tokens(a.token_vocabs)
  out = a.out or "benchmark.json"
  if os.path.isdir(out):
    name = re.sub(r"[^a-z0-9]+", "_", result["machine"]["device"].lower()).strip("_")
    out = os.path.join(out, f"benchmark_gpu_{name}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{report(result)}\n\nwrote {out}")
  return result


if __name__ == "__main__":
  main()
