"""Several JAX processes on this machine (gloo collectives, a coordinator on 127.0.0.1):
the harness and the library give what one process gives."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import assert_trees_f32_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run by every process: the harness in both sharding modes, then the library alone.
SCRIPT = r"""
import json, os, sys
procs, pid, port, base = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
import nrs_jax  # importing the library must not start a backend before initialize
from experiments import parallel
from experiments import train
from experiments.configs import digits

def config_for(mode):
  config = digits.get_config()
  with config.unlocked():
    config.sharding = mode
    config.num_steps = int(os.environ.get("NUM_STEPS", 6))
    config.batch_size = 64
    config.eval_every_epochs = 1000
    config.checkpoint_every_steps = 3
    config.progress = False
    config.hessian = dict(num_examples=64, batch_size=32, num_iters=4, num_samples=2, every_evals=0)
    if os.environ.get("SMALL"):  # make test's case: the same code on a smaller model
      config.model_kwargs = dict(hidden=(16,))
      config.hessian = dict(num_examples=32, batch_size=32, num_iters=2, num_samples=2, every_evals=0)
    config.nrs = dict(alpha=1.0, radius=0.1, num_neighbors=2, noise="gaussian", scale="filter")
    if procs > 1:
      config.distributed = True
      config.coordinator_address = "127.0.0.1:" + port
      config.num_processes = procs
      config.process_id = pid
      config.distributed_timeout_s = 60
  return config

only = os.environ.get("ONLY_MODE")
parallel.initialize_distributed(config_for("replicated"))
import jax, jax.numpy as jnp, numpy as np, optax
assert jax.process_count() == procs and jax.device_count() == 4, jax.devices()
out = {}
for mode in [m for m in os.environ.get("MODES", only or "replicated,fsdp").split(",") if m]:
  rec = train.train_and_evaluate(config_for(mode), os.path.join(base, mode))
  out[mode] = {k: v for k, v in rec.items() if isinstance(v, float)}
if not only:
  # The library alone: make_nrs_loss and the transform on global arrays.
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  rng = np.random.default_rng(0)
  x_all = rng.normal(size=(16, 5)).astype(np.float32)
  y_all = (np.arange(16) % 3).astype(np.int32)
  per = 16 // procs
  rows = slice(pid * per, (pid + 1) * per)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data", None)), x_all[rows], (16, 5))
  y = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), y_all[rows], (16,))
  w = rng.normal(size=(5, 3)).astype(np.float32)
  params = jax.device_put({"w": w, "b": np.zeros(3, np.float32)}, NamedSharding(mesh, P()))
  apply_fn = lambda p, b: jnp.tanh(b[0] @ p["w"]) + p["b"]
  task = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b[1]).mean()
  loss = nrs_jax.make_nrs_loss(apply_fn, task, alpha=1.0, radius=0.3, num_neighbors=2)
  (total, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, (x, y), jax.random.key(3))
  tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.3, 2, key=5), optax.sgd(0.1))
  # Global arrays are arguments of the jitted step (jit cannot close over them).
  upd, st = jax.jit(lambda p, s, b: tx.update(jax.tree_util.tree_map(jnp.zeros_like, p), s, p,
                                              logits_fn=lambda q: apply_fn(q, b)))(params, tx.init(params), (x, y))
  from jax.experimental import multihost_utils as mu
  g = mu.process_allgather(grads, tiled=True)
  u = mu.process_allgather(upd, tiled=True)
  out["library"] = {"total": float(total), "penalty": float(aux["nrs_penalty"]),
                    "grad_w": np.asarray(g["w"]).tolist(), "update_w": np.asarray(u["w"]).tolist(),
                    "transform_penalty": float(st[0].penalty)}
if pid == 0:
  print("RESULT" + json.dumps(out), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(procs: int, base: str, extra_env=None, wait=True):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // procs}",
    **(extra_env or {}),
  }
  port = str(_free_port())
  ps = [
    subprocess.Popen(
      [sys.executable, "-c", SCRIPT, str(procs), str(i), port, base],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(procs)
  ]
  if not wait:
    return ps
  outs = [p.communicate(timeout=600) for p in ps]
  for p, (o, e) in zip(ps, outs):
    assert p.returncode == 0, o[-2000:] + e[-4000:]
  line = [x for x in outs[0][0].splitlines() if x.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


def _close(a: dict, b: dict, tol: float) -> None:
  assert set(a) == set(b), (sorted(a), sorted(b))
  for k in a:
    assert abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])), (k, a[k], b[k])


@pytest.mark.parametrize(
  "small,modes",
  [
    (True, ()),  # make test: the library on global arrays across processes (no harness run)
    pytest.param(False, ("replicated", "fsdp"), marks=pytest.mark.slow),
  ],
)
def test_two_processes_equal_one_process(tmp_path, small, modes):
  env = {"MODES": ",".join(modes), **({"SMALL": "1"} if small else {})}
  one = _launch(1, str(tmp_path / "one"), env)
  two = _launch(2, str(tmp_path / "two"), env)
  for mode in modes:
    m1, m2 = one[mode], two[mode]
    # Hessian metrics run in replicated mode and are skipped (with a message) under
    # FSDP across processes, where the parameters live on several hosts.
    if mode == "fsdp":
      assert "hessian/lambda_max" not in m2
      m1 = {k: v for k, v in m1.items() if not k.startswith("hessian/")}
    else:
      assert "hessian/lambda_max" in m2
    drop = ("wall_seconds",)
    _close(
      {k: v for k, v in m2.items() if k not in drop},
      {k: v for k, v in m1.items() if k not in drop},
      1e-5,
    )
    a = np.load(tmp_path / "one" / mode / "final_state.npz")
    b = np.load(tmp_path / "two" / mode / "final_state.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    # One metrics.jsonl, written once (by process 0).
    lines = (tmp_path / "two" / mode / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 6
  l1, l2 = one["library"], two["library"]
  for k in ("total", "penalty", "transform_penalty"):
    assert abs(l1[k] - l2[k]) < 1e-6 * max(1.0, abs(l1[k])), (k, l1[k], l2[k])
  assert_trees_f32_close(l2["grad_w"], l1["grad_w"], rtol=1e-5)
  assert_trees_f32_close(l2["update_w"], l1["update_w"], rtol=1e-5)


def test_bad_distributed_flags_are_clear_errors(tmp_path):
  from experiments import parallel
  from experiments.configs import digits

  config = digits.get_config()
  with config.unlocked():
    config.distributed = True
    config.num_processes = 2
  with pytest.raises(ValueError, match="num_processes=2 and --config.process_id=None go together"):
    parallel.initialize_distributed(config)
  with config.unlocked():
    config.process_id = 1
  with pytest.raises(ValueError, match="need --config.coordinator_address"):
    parallel.initialize_distributed(config)
  # An unreachable coordinator is an error within the timeout, naming the flag, not a hang.
  code = (
    "from experiments import parallel\n"
    "from experiments.configs import digits\n"
    "c = digits.get_config()\n"
    "with c.unlocked():\n"
    f"  c.distributed = True; c.coordinator_address = '127.0.0.1:{_free_port()}'\n"
    "  c.num_processes = 2; c.process_id = 1; c.distributed_timeout_s = 5\n"
    "parallel.initialize_distributed(c)\n"
  )
  t = time.time()
  p = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert p.returncode != 0 and time.time() - t < 100
  assert "--config.coordinator_address" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_of_both_processes_then_restart_is_bit_identical(tmp_path):
  env = {"ONLY_MODE": "fsdp", "NUM_STEPS": "60"}
  ref = _launch(2, str(tmp_path / "ref"), env)
  ps = _launch(2, str(tmp_path / "killed"), env, wait=False)
  ckpt = tmp_path / "killed" / "fsdp" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    if ckpt.exists() and any(d.name.isdigit() for d in ckpt.iterdir()):
      break
    time.sleep(0.02)
  for p in ps:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not (tmp_path / "killed" / "fsdp" / "final_state.npz").exists()
  again = _launch(2, str(tmp_path / "killed"), env)
  assert again["fsdp"]["test_accuracy"] == ref["fsdp"]["test_accuracy"]
  a = np.load(tmp_path / "ref" / "fsdp" / "final_state.npz")
  b = np.load(tmp_path / "killed" / "fsdp" / "final_state.npz")
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])


TFDS_SCRIPT = r"""
import json, os, sys
procs, pid, port, base = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
from experiments import parallel
from experiments import train
from experiments.configs import cifar100_wrn28_10
config = cifar100_wrn28_10.get_config()
with config.unlocked():
  config.model_kwargs = dict(depth=10, widen=1, dropout=0.3)
  config.sharding = "replicated"
  config.num_steps = 2
  config.batch_size = 8
  config.eval_every_epochs = 10_000
  config.progress = False
  config.data_dir = os.path.join(base, "nodata")
  config.hessian = dict(num_examples=8, batch_size=8, num_iters=2, num_samples=2, every_evals=0)
  config.distributed = True
  config.coordinator_address = "127.0.0.1:" + port
  config.num_processes = procs
  config.process_id = pid
parallel.initialize_distributed(config)
import tensorflow_datasets as tfds
specs = []
real_load = tfds.load
def load(name, split=None, **kw):
  specs.append(str(split))
  return real_load(name, split=split, **kw)
tfds.load = load
with tfds.testing.mock_data(num_examples=16):
  rec = train.train_and_evaluate(config, os.path.join(base, "run"))
print("RESULT" + json.dumps({"specs": sorted(set(specs)), "step": rec["step"],
                             "finite": bool(rec["train_loss"] == rec["train_loss"])}), flush=True)
"""


@pytest.mark.slow
def test_tfds_streams_per_process(tmp_path):
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  port = str(_free_port())
  ps = [
    subprocess.Popen(
      [sys.executable, "-c", TFDS_SCRIPT, "2", str(i), port, str(tmp_path)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in ps]
  res = []
  for p, (o, e) in zip(ps, outs):
    assert p.returncode == 0, o[-2000:] + e[-4000:]
    line = [x for x in o.splitlines() if x.startswith("RESULT")][-1]
    res.append(json.loads(line[len("RESULT") :]))
  assert all(r["step"] == 2 and r["finite"] for r in res)
  # Every split is read in parts, process i its part i of 2 (only the one-example
  # probe at start-up names a whole split).
  for i, r in enumerate(res):
    parts = [s for s in r["specs"] if s.startswith("_EvenSplit")]
    assert {s.split("'")[1] for s in parts} == {"train[:90%]", "train[90%:]", "test"}, r
    assert all(f"index={i}, count=2" in s for s in parts), r
    assert set(r["specs"]) - set(parts) == {"train[:90%]"}, r
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1
