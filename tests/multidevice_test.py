"""8 simulated CPU devices (in a subprocess, so other tests keep one device)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import nrs_jax
from experiments import train
from experiments.configs import digits

assert jax.device_count() == 8, jax.devices()
out = {}
finals = {}
MODES = [m for m in os.environ.get("MODES", "none,replicated,fsdp").split(",") if m]
for mode in MODES:
  config = digits.get_config()
  with config.unlocked():
    config.sharding = mode
    config.num_steps = 6
    config.batch_size = 64
    config.eval_every_epochs = 1000
    config.progress = False
    config.hessian.num_iters = 0
    config.nrs = dict(alpha=1.0, radius=0.1, num_neighbors=2, noise="gaussian", scale="filter")
    if os.environ.get("SMALL"):  # make test's case: the same code on a smaller model
      config.model_kwargs = dict(hidden=(16,))
  wd = tempfile.mkdtemp()
  rec = train.train_and_evaluate(config, wd)
  out[mode] = {"train_loss": rec["train_loss"], "train/loss": rec["train/loss"]}
  finals[mode] = dict(np.load(wd + "/final_state.npz"))
diffs = {}
for mode in MODES[1:]:
  diffs[mode] = max(float(np.max(np.abs(finals[mode][k] - finals["none"][k]))) for k in finals["none"])
out["max_param_diff"] = diffs

# Neighbours identical across devices: sample under FSDP-sharded params, then
# every device's copy of the replicated result equals the single-device sample.
mesh = Mesh(np.asarray(jax.devices()), ("data",))
params = {"w": jax.random.normal(jax.random.key(0), (16, 24)), "b": jnp.zeros(24)}
ref = nrs_jax.sample_perturbations(params, jax.random.key(5), radius=0.1, num_neighbors=3, scale="filter").as_tree(params)
sharded = jax.device_put(params, {"w": NamedSharding(mesh, P("data", None)), "b": NamedSharding(mesh, P())})
f = jax.jit(lambda p: nrs_jax.sample_perturbations(p, jax.random.key(5), radius=0.1, num_neighbors=3, scale="filter").as_tree(p),
            out_shardings=NamedSharding(mesh, P()))
got = f(sharded)
# Bit-identical on every device; equal to the single-device draw up to the
# rounding of the (sharded) filter-norm reduction.
same = all(
  np.array_equal(np.asarray(shard.data), np.asarray(got[k].addressable_shards[0].data))
  for k in ref for shard in got[k].addressable_shards
)
close = all(np.allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-6, atol=1e-7) for k in ref)
out["neighbours_identical"] = bool(same and close) and len(got["w"].addressable_shards) == 8

# axis_name under pmap: the value is the global-batch penalty on every replica,
# and pmean-ed gradients equal the global-batch gradient, for mean and max.
def apply(p, xb):
  return jnp.tanh(xb @ p["w1"]) @ p["w2"]

mp = {"w1": jax.random.normal(jax.random.key(1), (5, 16)) / 2, "w2": jax.random.normal(jax.random.key(2), (16, 4))}
x = jax.random.normal(jax.random.key(3), (32, 5))
xs = x.reshape(8, 4, 5)
key = jax.random.key(9)
axis = {}
AXIS = "mean_vmap,max_chunked" if os.environ.get("SMALL") else "mean_vmap,max_vmap,mean_chunked,max_chunked"
for agg, strategy in [c.split("_") for c in AXIS.split(",")]:
  kw = dict(radius=0.3, num_neighbors=4, aggregation=agg, strategy=strategy)
  def local(p, xb, per_replica=False):
    f = lambda q: nrs_jax.nrs_penalty(lambda r: apply(r, xb), q, key, axis_name="d", per_replica_neighbors=per_replica, **kw)
    v, g = jax.value_and_grad(f)(p)
    return v, jax.lax.pmean(g, "d")
  v, g = jax.pmap(local, axis_name="d", in_axes=(None, 0))(mp, xs)
  rv, rg = jax.value_and_grad(lambda q: nrs_jax.nrs_penalty(lambda r: apply(r, x), q, key, **kw))(mp)
  name = agg + "_" + strategy
  axis[name] = {
    "value_err": float(np.max(np.abs(np.asarray(v) - float(rv)))) / float(rv),
    "grad_err": max(float(np.max(np.abs(np.asarray(g[k]) - np.asarray(rg[k])[None]))) / float(np.max(np.abs(rg[k]))) for k in rg),
  }
  vp, _ = jax.pmap(lambda p, xb: local(p, xb, True), axis_name="d", in_axes=(None, 0))(mp, xs)
  axis[name]["per_replica_same_on_all"] = bool(np.all(np.asarray(vp) == np.asarray(vp)[0]))
  axis[name]["per_replica_differs"] = bool(abs(float(vp[0]) - float(rv)) > 1e-6 * float(rv))
out["axis_name"] = axis

# Sub-batch neighbours on a batch sharded over 8 devices: the strided subset keeps
# each shard's own rows (16 of 64, 2 per device), so it equals the unsharded result
# and no all-gather of the batch appears in the compiled step.
import optax
xb = jax.random.normal(jax.random.key(4), (64, 5))
yb = jnp.arange(64) % 4
sub_loss = nrs_jax.make_nrs_loss(
  lambda p, b: apply(p, b["x"]),
  lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean(),
  alpha=1.0, radius=0.3, num_neighbors=2, neighbor_batch_size=16)
step = jax.jit(jax.value_and_grad(lambda p, b: sub_loss(p, b, key)[0]))
ref_v, ref_g = step(mp, {"x": xb, "y": yb})
bsh = {"x": NamedSharding(mesh, P("data", None)), "y": NamedSharding(mesh, P("data"))}
b_sharded = jax.device_put({"x": xb, "y": yb}, bsh)
p_rep = jax.device_put(mp, NamedSharding(mesh, P()))
v, g = step(p_rep, b_sharded)
hlo = step.lower(p_rep, b_sharded).compile().as_text()
out["sub_batch"] = {
  "value_err": abs(float(v) - float(ref_v)) / abs(float(ref_v)),
  "grad_err": max(float(np.max(np.abs(np.asarray(g[k]) - np.asarray(ref_g[k])))) for k in mp),
  "all_gather": "all-gather" in hlo,
}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize(
  "small,modes",
  [
    (True, ()),  # make test: the library on 8 devices (no harness run)
    pytest.param(False, ("none", "replicated", "fsdp"), marks=pytest.mark.slow),
  ],
)
@pytest.mark.slow_cases("True-modes0")
def test_eight_devices_replicated_and_fsdp_match_one_device(small, modes):
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
    "MODES": ",".join(modes),
    **({"SMALL": "1"} if small else {}),
  }
  p = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT") :])
  assert out["neighbours_identical"]
  cases = (
    ("mean_vmap", "max_chunked")
    if small
    else ("mean_vmap", "max_vmap", "mean_chunked", "max_chunked")
  )
  assert sorted(out["axis_name"]) == sorted(cases)
  for agg in cases:
    a = out["axis_name"][agg]
    assert a["value_err"] < 1e-5 and a["grad_err"] < 1e-4, out["axis_name"]
    assert a["per_replica_same_on_all"] and a["per_replica_differs"], out["axis_name"]
  sub = out["sub_batch"]
  assert sub["value_err"] < 1e-5 and sub["grad_err"] < 1e-5 and not sub["all_gather"], sub
  for mode in modes[1:]:
    assert out["max_param_diff"][mode] < 1e-5, out
    assert abs(out[mode]["train_loss"] - out["none"]["train_loss"]) < 1e-5, out
    assert abs(out[mode]["train/loss"] - out["none"]["train/loss"]) < 1e-5, out
