"""Step-time, compile-time and memory ratios of NRS vs SGD and SAM, measured side by side.

  python -m experiments.benchmark                    # MLP, CNN, ResNet-18 (CIFAR shape, batch 128)
  python -m experiments.benchmark --models=mlp --repeats=5 --out=benchmark.json

Every row is compiled first, then timed round-robin: ``--repeats`` rounds that
call each row once in turn, after warm-up, all in one process (a change in
machine load hits every row alike). Medians are reported as ratios to the SGD
step and to the SAM step (two-pass ascent step, as optax.contrib.sam's opaque
mode computes). Absolute seconds depend on the machine; ratios are what to
compare.
"""

from __future__ import annotations

import json
import platform
import time
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags

import nrs_jax
from experiments import input_pipeline
from experiments import methods
from experiments import timing
from experiments import train
from experiments.configs import default

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn", "resnet18"], "Models to benchmark.")
flags.DEFINE_list("ks", ["1", "2", "4", "8"], "Numbers of neighbours.")
flags.DEFINE_integer("repeats", 0, "Timed calls per row (0: per-model default).")
flags.DEFINE_string("out", "benchmark.json", "Where to write the results.")
flags.DEFINE_bool("hessian", True, "Also time HVPs and Lanczos (flatness toolkit).")
flags.DEFINE_list(
  "token_vocabs", [], "Token-level rows ([B, T, V] logits, padding mask) at these vocab sizes."
)

MODELS = {
  # name: (config model, model_kwargs, input shape, batch, default repeats, classes)
  "mlp": ("mlp", dict(hidden=(256, 256)), (40,), 128, 60, 10),
  # The same MLP with an 11-class head: an odd parameter count (79,115).
  "mlp11": ("mlp", dict(hidden=(256, 256)), (40,), 128, 60, 11),
  "cnn": ("cnn1d", dict(channels=(64, 64, 64)), (40,), 128, 20, 10),
  "resnet18": ("resnet18", dict(), (32, 32, 3), 128, 3, 10),
}


def _config(model, kwargs, method, nrs=None):
  config = default.get_config()
  with config.unlocked():
    config.model, config.model_kwargs, config.method = model, kwargs, method
    if nrs:
      config.nrs = ml_collections.ConfigDict({**config.nrs.to_dict(), **nrs})
  return config


def bench_model(name, ks, repeats):
  model_name, kwargs, shape, batch_size, default_repeats, classes = MODELS[name]
  repeats = repeats or default_repeats
  rng = np.random.default_rng(0)
  ds = input_pipeline.Dataset(
    name, None, None, None, classes, shape
  )  # only the shapes are used to build the model
  batch = {
    "x": jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, classes, batch_size)),
  }
  key = jax.random.key(0)
  rows, fns = {}, {}

  def run(label, method, nrs=None):
    config = _config(model_name, kwargs, method, nrs)
    model = train.Model(config, ds)
    tx = methods.make_optimizer(config, 1000)
    step = methods.make_step(method, model.apply, tx, config)
    args = (model.params, model.batch_stats, tx.init(model.params), batch, key)
    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0
    rows[label] = {"compile_seconds": compile_s, "temp_bytes": temp}
    fns[label] = (compiled, args)
    print(f"  {name:9s} {label:28s} compile {compile_s:6.2f} s", flush=True)
    return model

  run("sgd", "sgd")
  model = run("sam", "sam")
  for k in ks:
    # "chunked": chunks of one neighbour, unrolled; "chunked{c}": chunks of c = K/4
    # under lax.scan (from K = 8).
    strategies = ["auto", "loop", "chunked", "vmap"] + ([f"chunked{k // 4}"] if k >= 8 else [])
    if name == "resnet18":
      # vmap and lax.scan over conv kernels are 10-100x slower on XLA:CPU;
      # time them on an accelerator only.
      strategies = ["auto"] + (["vmap"] if k == 2 and jax.default_backend() != "cpu" else [])
    for s in strategies:
      nrs = {"num_neighbors": k, "strategy": s}
      if s.startswith("chunked") and s != "chunked":
        nrs = {"num_neighbors": k, "strategy": "chunked", "neighbor_chunk_size": int(s[7:])}
      run(f"nrs_k{k}_{s}", "nrs", nrs)
    run(f"nrs_k{k}_transform", "nrs", {"num_neighbors": k, "implementation": "transform"})
    # With a fixed centre the transform takes the task pass's logits (center_logits=):
    # the same work as the fused loss with a fixed centre.
    if name != "resnet18" or k == 1:  # ResNet-18 at K = 1 only: a row costs minutes on CPU
      sg = {"num_neighbors": k, "stop_gradient_center": True}
      run(f"nrs_k{k}_fused_sg", "nrs", sg)
      run(f"nrs_k{k}_transform_sg", "nrs", {**sg, "implementation": "transform"})

  # Neighbours on a sub-batch (B/4 and B/8 examples), the centre re-evaluated on it or
  # reused from the task pass: a step costs 1 + (K+1) m/B or 1 + K m/B SGD steps.
  for k in [k for k in ks if k <= 2 and (name != "resnet18" or k == 1)]:
    for frac in (4, 8):
      sub = {"num_neighbors": k, "neighbor_batch_size": batch_size // frac}
      run(f"nrs_k{k}_sub{frac}", "nrs", sub)
      run(f"nrs_k{k}_sub{frac}_reuse", "nrs", {**sub, "reuse_center_logits": True})

  # Sampling alone, timed in the same rounds, as a share of the NRS K=1 step.
  sample = jax.jit(
    lambda p, k: nrs_jax.sample_perturbations(p, k, radius=0.05, num_neighbors=1).deltas
  )
  fns["sampling_k1"] = (sample, (model.params, key))
  rows["sampling_k1"] = {}
  print(f"  {name:9s} timing {len(fns)} rows, {repeats} interleaved rounds", flush=True)
  for label, secs in timing.interleaved_medians(fns, repeats).items():
    rows[label]["seconds"] = secs
  return rows


def summarize(name, rows, ks):
  sgd, sam = rows["sgd"]["seconds"], rows["sam"]["seconds"]
  out = {}
  for label, r in rows.items():
    if "compile_seconds" in r:
      out[label] = {
        "vs_sgd": r["seconds"] / sgd,
        "vs_sam": r["seconds"] / sam,
        "compile_vs_sgd": r["compile_seconds"] / rows["sgd"]["compile_seconds"],
        "temp_mb": r["temp_bytes"] / 2**20,
      }
  checks = {}
  for k in ks:
    auto = rows[f"nrs_k{k}_auto"]["seconds"]
    checks[f"default_k{k}_vs_floor"] = auto / (0.5 * (1 + k) * sam)  # target <= 1
    # Differentiable centre: the transform recomputes the centre pass, (2+K)/(1+K) the work.
    checks[f"transform_k{k}_vs_fused"] = rows[f"nrs_k{k}_transform"]["seconds"] / auto
    checks[f"transform_k{k}_vs_fused_work_bound"] = (2 + k) / (1 + k)
    if f"nrs_k{k}_transform_sg" in rows:
      checks[f"transform_sg_k{k}_vs_fused_sg"] = (  # target <= 1.15
        rows[f"nrs_k{k}_transform_sg"]["seconds"] / rows[f"nrs_k{k}_fused_sg"]["seconds"]
      )
  for label, r in rows.items():  # sub-batch rows against their work count in SGD steps
    parts = label.split("_")
    if len(parts) >= 3 and parts[2].startswith("sub"):
      k, frac = int(parts[1][1:]), int(parts[2][3:])
      work = 1 + (k if label.endswith("_reuse") else k + 1) / frac
      checks[f"{label}_vs_work"] = (r["seconds"] / sgd) / work  # target <= 1.10
      checks[f"{label}_vs_full_nrs"] = r["seconds"] / rows[f"nrs_k{k}_auto"]["seconds"]
  checks["k1_fused_vs_sam"] = rows["nrs_k1_auto"]["seconds"] / sam  # <= 1.05
  checks["sampling_share_k1"] = rows["sampling_k1"]["seconds"] / rows["nrs_k1_auto"]["seconds"]
  checks["compile_k1_vs_sgd"] = (
    rows["nrs_k1_auto"]["compile_seconds"] / rows["sgd"]["compile_seconds"]
  )
  if "nrs_k8_chunked2" in rows and rows["nrs_k1_auto"]["temp_bytes"]:
    checks["chunked_k8_temp_vs_k1"] = (
      rows["nrs_k8_chunked2"]["temp_bytes"] / rows["nrs_k1_auto"]["temp_bytes"]
    )
  return out, checks


def main(argv):
  del argv
  ks = [int(k) for k in FLAGS.ks]
  result = {
    "machine": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "cpu_count": __import__("os").cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
    },
    "models": {},
  }
  for name in FLAGS.models:
    print(f"[{name}]", flush=True)
    rows = bench_model(name, ks, FLAGS.repeats)
    ratios, checks = summarize(name, rows, ks)
    result["models"][name] = {"raw": rows, "ratios": ratios, "checks": checks}
  if FLAGS.hessian:
    print("[hessian]", flush=True)
    result["hessian"] = bench_hessian()
  if FLAGS.token_vocabs:
    print("[tokens]", flush=True)
    result["tokens"] = bench_tokens([int(v) for v in FLAGS.token_vocabs])
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print()
  print(markdown_table(result))


def bench_tokens(vocabs, k=4, batch=16, length=128, width=128, repeats=10) -> dict:
  """Token-level NRS: the gradient of task loss + penalty over ``[B, T, V]`` logits.

  A small causal-free token model (embedding, one hidden layer, a V-way output
  head) on a batch of ``B`` sequences of ``T`` tokens with a padding mask
  (``where``, a quarter of the positions padded). Per vocab size, XLA's temp
  memory and the step time of the loop, vmap and chunked (chunks of one)
  strategies with K neighbours, over plain cross-entropy's. The K neighbours'
  ``[B, T, V]`` logits are what grows with V; chunked keeps one neighbour's.
  """
  import optax

  out = {}
  rng = np.random.default_rng(0)
  for v in vocabs:
    tokens = jnp.asarray(rng.integers(0, v, (batch, length)))
    where = jnp.asarray(np.arange(length)[None, :] < rng.integers(length // 2, length, (batch, 1)))
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
      "emb": jax.random.normal(keys[0], (v, width)) * 0.02,
      "hidden": jax.random.normal(keys[1], (width, width)) / np.sqrt(width),
      "out": jax.random.normal(keys[2], (width, v)) / np.sqrt(width),
    }

    def logits_fn(p, tokens=tokens):
      return jax.nn.gelu(p["emb"][tokens] @ p["hidden"]) @ p["out"]

    def task(p, tokens=tokens, where=where):
      ce = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), tokens)
      return jnp.sum(ce * where) / jnp.sum(where)

    def loss(p, strategy, where=where, logits_fn=logits_fn, task=task):
      pen = nrs_jax.nrs_penalty(
        logits_fn,
        p,
        jax.random.key(1),
        radius=0.01,
        num_neighbors=k,
        strategy=strategy,
        where=where,
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
      r["seconds"] = secs[label]
      r["vs_ce"] = secs[label] / secs["ce"]
      r["temp_mib"] = r["temp_bytes"] / 2**20
    out[f"V{v}"] = rows
    print(
      f"  V={v}: "
      + ", ".join(f"{s} {r['vs_ce']:.2f}x CE, {r['temp_mib']:.1f} MiB" for s, r in rows.items()),
      flush=True,
    )
  return out


def markdown_table(result) -> str:
  lines = [
    "| model | row | x SGD | x SAM | compile x SGD | temp MiB |",
    "|---|---|---|---|---|---|",
  ]
  for name, m in result["models"].items():
    for label, r in m["ratios"].items():
      lines.append(
        f"| {name} | {label} | {r['vs_sgd']:.2f} | {r['vs_sam']:.2f} | "
        f"{r['compile_vs_sgd']:.2f} | {r['temp_mb']:.1f} |"
      )
  lines.append("")
  lines.append("| model | check | value |")
  lines.append("|---|---|---|")
  for name, m in result["models"].items():
    for label, v in m["checks"].items():
      lines.append(f"| {name} | {label} | {v:.2f} |")
  if "hessian" in result:
    lines += ["", "| model | params | HVP / grad | k=5 Lanczos / grad |", "|---|---|---|---|"]
    for name, r in result["hessian"].items():
      lz = (
        f"{r['lanczos_k5_vs_grad']:.0f} ({r['lanczos_iters']} iters)"
        if "lanczos_k5_vs_grad" in r
        else ""
      )
      lines.append(f"| {name} | {r['params']} | {r['hvp_vs_grad']:.2f} | {lz} |")
  if "tokens" in result:
    lines += ["", "| vocab | row | step x CE | XLA temp MiB |", "|---|---|---|---|"]
    for v, rows in result["tokens"].items():
      for label, r in rows.items():
        lines.append(f"| {v} | {label} | {r['vs_ce']:.2f} | {r['temp_mib']:.1f} |")
  return "\n".join(lines)


def bench_hessian(repeats: int = 10) -> dict:
  """HVP time over gradient time (MLP, small CNN) and k=5 Lanczos on a ~100k MLP."""
  from flax import nnx

  from experiments.models import create_model
  from nrs_jax import flatness

  out = {}
  rng = np.random.default_rng(0)
  for name, model_name, kwargs, shape in (
    ("mlp", "mlp", dict(hidden=(256, 256)), (40,)),
    ("cnn", "cnn1d", dict(channels=(64, 64, 64)), (40,)),
    ("mlp_100k", "mlp", dict(hidden=(384, 192)), (64,)),
  ):
    model = create_model(model_name, shape, 10, 0, **kwargs)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(rng.normal(size=(128, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 128))

    def loss(p, b):
      logits = nnx.merge(graphdef, p, rest, copy=True)(b[0])
      return methods.cross_entropy(logits, b[1])

    grad = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, v, b: flatness.hvp(loss, p, v, b))
    t = timing.interleaved_medians(
      {"grad": (grad, (params, (x, y))), "hvp": (hvp, (params, params, (x, y)))}, repeats
    )
    t_grad, t_hvp = t["grad"], t["hvp"]
    n = sum(int(a.size) for a in jax.tree_util.tree_leaves(params))
    row = {"params": n, "hvp_vs_grad": t_hvp / t_grad}
    if name == "mlp_100k":
      t = time.perf_counter()
      r = flatness.top_hessian_eigenvalues(
        loss, params, (x, y), jax.random.key(0), k=5, num_iters=60
      )
      row["lanczos_k5_vs_grad"] = (time.perf_counter() - t) / t_grad
      row["lanczos_iters"] = r.num_iters
    out[name] = row
    print(f"  {name}: {row}", flush=True)
  return out


if __name__ == "__main__":
  app.run(main)
