"""The penalty gradient reused between steps (``add_nrs_gradient(reuse=...)``) and its
host-side schedule, against written-out references; and the Rademacher draw."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nrs_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(seed=0, n=16):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k1, (5, 8)) / 2,
    "b1": jnp.zeros(8),
    "w2": jax.random.normal(k2, (8, 3)) / 3,
  }
  x = jax.random.normal(k3, (n, 5))
  y = jax.random.randint(k4, (n,), 0, 3)
  return params, x, y


def _apply(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _task_grad(p, x, y):
  loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(_apply(q, x), y).mean()
  return jax.grad(loss)(p)


def _penalty_grad(p, x, key, count, radius=0.1, **kw):
  """The written-out penalty gradient of update ``count``: fold_in(key, count)'s neighbour."""
  step_key = jax.random.fold_in(jax.random.key(key), count)
  f = lambda q: nrs_jax.nrs_penalty(lambda r: _apply(r, x), q, step_key, radius=radius, **kw)
  return jax.grad(f)(p)


def _close(a, b, tol=1e-6):
  jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


def test_refresh_on_every_step_is_full_nrs_exactly():
  params, x, y = _problem()
  runs = {}
  for reuse in (None, "plain", "orthogonal"):
    tx = optax.chain(
      nrs_jax.add_nrs_gradient(0.5, 0.1, key=3, reuse=reuse), optax.sgd(0.1, momentum=0.9)
    )
    p, state = params, tx.init(params)
    step = jax.jit(
      lambda p, s: tx.update(_task_grad(p, x, y), s, p, logits_fn=lambda q: _apply(q, x))
    )
    for _ in range(4):
      u, state = step(p, state)
      p = optax.apply_updates(p, u)
    runs[reuse] = p
  for reuse in ("plain", "orthogonal"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs[reuse], runs[None])


@pytest.mark.parametrize("rule", ["plain", "orthogonal"])
def test_a_reuse_step_adds_the_stored_term_as_its_rule_says(rule):
  params, x, y = _problem()
  alpha = optax.linear_schedule(1.0, 0.5, 4)  # the weight of the reuse step's own count
  tx = nrs_jax.add_nrs_gradient(alpha, 0.1, key=7, reuse=rule)
  state = tx.init(params)
  t0 = _task_grad(params, x, y)
  _, state = tx.update(t0, state, params, logits_fn=lambda q: _apply(q, x))
  p1 = jax.tree_util.tree_map(lambda w, g: w - 0.3 * g, params, t0)  # the params moved on
  t1 = _task_grad(p1, x, y)
  got, state2 = jax.jit(lambda t, s, p: tx.update(t, s, p))(t1, state, p1)  # logits_fn=None
  # The reference, in numpy: the penalty gradient of update 0 at the refresh's params.
  g = {k: np.asarray(v, np.float64) for k, v in _penalty_grad(params, x, 7, 0).items()}
  t0n = {k: np.asarray(v, np.float64) for k, v in t0.items()}
  t1n = {k: np.asarray(v, np.float64) for k, v in t1.items()}
  dot = lambda a, b: sum(float(np.sum(a[k] * b[k])) for k in a)
  term = g
  if rule == "orthogonal":
    c = dot(g, t0n) / dot(t0n, t0n)
    ratio = np.sqrt(dot(t1n, t1n) / dot(t0n, t0n))
    term = {k: ratio * (g[k] - c * t0n[k]) for k in g}
    assert abs(dot({k: g[k] - c * t0n[k] for k in g}, t0n)) < 1e-6  # orthogonal indeed
  a1 = float(alpha(1))
  want = {k: t1n[k] + a1 * term[k] for k in g}
  _close(got, want, 2e-5)
  assert int(state2.count) == 2 and int(state2.refreshed_at) == 0
  assert float(state2.penalty) == float(state.penalty)  # the refresh's, kept


def test_masked_leaves_keep_their_gradient_and_store_nothing():
  params, x, y = _problem()
  mask = {"w1": True, "b1": False, "w2": np.array([[True, False, True]] * 8)}
  tx = nrs_jax.add_nrs_gradient(1.0, 0.1, key=2, mask=mask, reuse="orthogonal")
  state = tx.init(params)
  assert state.reused["b1"] is None and state.reused["w2"].shape == (8, 3)
  t = _task_grad(params, x, y)
  _, state = tx.update(t, state, params, logits_fn=lambda q: _apply(q, x))
  out, _ = tx.update(t, state, params)
  np.testing.assert_array_equal(out["b1"], t["b1"])
  np.testing.assert_array_equal(out["w2"][:, 1], t["w2"][:, 1])  # the element left out
  assert not np.allclose(out["w1"], t["w1"])
  # The orthogonal part is orthogonal to the task gradient over the selected elements.
  sel = {"w1": t["w1"], "w2": t["w2"] * mask["w2"]}
  dot = sum(float(jnp.vdot(state.reused[k], sel[k])) for k in sel)
  assert abs(dot) < 1e-6


def test_reuse_before_any_refresh_is_an_error_eagerly_and_nan_under_jit():
  params, x, y = _problem()
  tx = nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="plain")
  t = _task_grad(params, x, y)
  with pytest.raises(ValueError, match="before any refresh.*pass logits_fn"):
    tx.update(t, tx.init(params), params)
  out, _ = jax.jit(lambda s: tx.update(t, s, params))(tx.init(params))
  assert all(np.isnan(v).all() for v in jax.tree_util.tree_leaves(out))  # never a silent zero
  # An optimiser wrapped in apply_if_finite after it skips that update; refreshes go on.
  guarded = optax.chain(tx, optax.apply_if_finite(optax.sgd(0.1), 3))
  s = guarded.init(params)
  reuse = jax.jit(lambda s: guarded.update(t, s, params))
  refresh = jax.jit(lambda s: guarded.update(t, s, params, logits_fn=lambda q: _apply(q, x)))
  u, s = reuse(s)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree_util.tree_leaves(u))
  assert int(s[1].notfinite_count) == 1
  u, s = refresh(s)
  u, s = reuse(s)
  assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in jax.tree_util.tree_leaves(u))
  assert int(s[1].notfinite_count) == 0
  # Wrapping the whole chain also works: the state's where-select keeps the stored term.
  whole = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), 3)
  s = whole.init(params)
  _, s = jax.jit(lambda s: whole.update(t, s, params, logits_fn=lambda q: _apply(q, x)))(s)
  u, s = jax.jit(lambda s: whole.update(t, s, params))(s)
  assert int(s.inner_state[0].refreshed_at) == 0 and all(
    np.isfinite(v).all() for v in jax.tree.leaves(u)
  )


def test_bad_reuse_options_and_schedules_name_the_fix():
  with pytest.raises(ValueError, match=r"reuse='look'.*\('plain', 'orthogonal'\)"):
    nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="look")
  for k in (0, -1, 2.5, True, "5"):
    with pytest.raises(ValueError, match=r"every=.*int >= 1 \(every=1 refreshes"):
      nrs_jax.RefreshSchedule(every=k)
  with pytest.raises(ValueError, match="accumulation_steps=0.*MultiSteps"):
    nrs_jax.RefreshSchedule(5, accumulation_steps=0)
  with pytest.raises(ValueError, match="decided on the host"):
    jax.jit(lambda t: nrs_jax.RefreshSchedule(5)(t))(3)
  assert [nrs_jax.RefreshSchedule(1)(t) for t in range(3)] == [True] * 3


def test_reuse_inside_multisteps_is_refused_and_outside_accumulates():
  params, x, y = _problem()
  t = _task_grad(params, x, y)
  inner = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="plain"), optax.sgd(0.1))
  ms = optax.MultiSteps(inner, 2)
  with pytest.raises(ValueError, match="inside optax.MultiSteps.*RefreshSchedule"):
    ms.update(t, ms.init(params), params, logits_fn=lambda q: _apply(q, x))
  # Outside: two micro-steps per update, refresh on every second update's two micro-steps.
  tx = optax.chain(
    nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="plain", resample_every=2),
    optax.MultiSteps(optax.sgd(0.1), 2).gradient_transformation(),
  )
  schedule = nrs_jax.RefreshSchedule(2, accumulation_steps=2)
  state, p = tx.init(params), params
  for micro in range(8):
    kw = {"logits_fn": lambda q: _apply(q, x)} if schedule(micro) else {}
    u, state = tx.update(_task_grad(p, x, y), state, p, **kw)
    p = optax.apply_updates(p, u)
  assert int(state[0].refreshed_at) == 5 and all(np.isfinite(v).all() for v in jax.tree.leaves(p))


def test_inject_hyperparams_and_a_radius_schedule():
  params, x, y = _problem()
  radius = optax.linear_schedule(0.1, 0.05, 10)
  tx = optax.inject_hyperparams(nrs_jax.add_nrs_gradient, static_args=("num_neighbors",))(
    alpha=0.5, radius=radius, reuse="orthogonal"
  )
  state = tx.init(params)
  t = _task_grad(params, x, y)
  _, state = tx.update(t, state, params, logits_fn=lambda q: _apply(q, x))
  out, state = tx.update(t, state, params)
  ref = nrs_jax.add_nrs_gradient(0.5, radius, reuse="orthogonal")
  s = ref.init(params)
  _, s = ref.update(t, s, params, logits_fn=lambda q: _apply(q, x))
  want, _ = ref.update(t, s, params)
  _close(out, want, 1e-6)


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.l2 = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_optimizer_loop_with_two_jitted_steps():
  from nrs_jax.integrations.nnx import logits_fn_for

  _, x, y = _problem()
  model = _MLP(nnx.Rngs(0))
  tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05, reuse="plain"), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def refresh_step(model, optimizer):
    logits_fn = logits_fn_for(model, x)
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads, logits_fn=logits_fn)
    return value

  @nnx.jit
  def reuse_step(model, optimizer):
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads, logits_fn=None)
    return value

  schedule = nrs_jax.RefreshSchedule(every=3)
  losses = [
    float((refresh_step if schedule(t) else reuse_step)(model, optimizer)) for t in range(9)
  ]
  assert losses[-1] < losses[0] and np.isfinite(losses).all()
  assert int(optimizer.opt_state[0].refreshed_at) == 6


SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax, nrs_jax
assert jax.device_count() == 4
apply = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
p = {"w1": jax.random.normal(jax.random.key(1), (5, 8)), "w2": jax.random.normal(jax.random.key(2), (8, 3))}
x = jax.random.normal(jax.random.key(3), (16, 5))
t = jax.tree.map(jnp.ones_like, p)
tx = nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="orthogonal", axis_name="d")
def refresh(s, xb):
  return tx.update(t, s, p, logits_fn=lambda q: apply(q, xb))
s0 = jax.tree.map(lambda a: jnp.stack([a] * 4), tx.init(p))
_, s = jax.pmap(refresh, axis_name="d")(s0, x.reshape(4, 4, 5))
u, _ = jax.pmap(lambda s: tx.update(t, s, p), axis_name="d")(s)
ref = nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="orthogonal")
_, rs = ref.update(t, ref.init(p), p, logits_fn=lambda q: apply(q, x))
same = all(bool(jnp.all(v == v[0])) for v in jax.tree.leaves(s.reused))
err = max(float(jnp.max(jnp.abs(s.reused[k][0] - rs.reused[k]))) for k in p)
print("RESULT", same, err, all(bool(jnp.all(v == v[0])) for v in jax.tree.leaves(u)))
"""


def test_the_stored_term_is_the_same_on_every_device():
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
  }
  p = subprocess.run(
    [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr[-3000:]
  same, err, updates_same = p.stdout.split("RESULT")[-1].split()
  assert same == "True" and updates_same == "True"
  assert float(err) < 1e-5  # the global batch's penalty gradient, on each replica


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_rademacher_draw_is_signs_at_the_gaussian_scale(impl):
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones(7)}
  key = jax.random.key(0, impl=impl)
  d = nrs_jax.sample_perturbations(
    params, key, radius=0.1, num_neighbors=8, noise="rademacher"
  ).as_tree(params)
  v = np.concatenate([np.asarray(d["w"]).reshape(8, -1), np.asarray(d["b"])], axis=1)
  np.testing.assert_allclose(np.abs(v), 0.1)  # +-r exactly
  assert abs(v.mean()) < 4 * 0.1 / np.sqrt(v.size)  # mean 0 (4 standard errors)
  rows = np.sign(v)
  assert not (rows[:, None] == rows[None]).all(-1)[~np.eye(8, dtype=bool)].any()  # keys differ
  # "filter" scale: the same per-element variance as the Gaussian draw's (norm / sqrt(fan-in)).
  w = jax.random.normal(jax.random.key(1), (64, 32))
  df = nrs_jax.sample_perturbations({"w": w}, key, radius=1.0, noise="rademacher", scale="filter")
  want = np.linalg.norm(np.asarray(w), axis=0) / np.sqrt(64)
  np.testing.assert_allclose(
    np.abs(np.asarray(df.deltas[0][0])), np.broadcast_to(want, w.shape), rtol=1e-5
  )


def test_rademacher_bits_are_independent_fair_coins():
  keys = jax.random.split(jax.random.key(3), 4)
  v = np.asarray(nrs_jax._neighbors.standard_rademacher(keys, 4096))
  assert set(np.unique(v)) == {-1.0, 1.0}
  frac = (v > 0).mean(0)  # per position over 4 keys... and per bit position over all words
  bit_pos = (v.reshape(4, -1, 32) > 0).mean((0, 1))
  assert abs(frac.mean() - 0.5) < 0.02 and np.all(np.abs(bit_pos - 0.5) < 0.12)
  lag1 = np.corrcoef(v[:, :-1].ravel(), v[:, 1:].ravel())[0, 1]
  assert abs(lag1) < 4 / np.sqrt(v.size)


def test_equinox_filtered_grads_with_none_leaves_refresh_and_reuse():
  """Equinox's filtered params and grads hold None where a field is not an array: the stored
  term and the reuse step align with the params' leaves, not with the Nones."""
  eqx = pytest.importorskip("equinox")
  _, x, y = _problem()
  model = eqx.nn.MLP(5, 3, 8, 1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  apply = lambda p: jax.vmap(eqx.combine(p, static))(x)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p), y).mean()
  tx = nrs_jax.add_nrs_gradient(1.0, 0.1, reuse="plain")
  state = tx.init(params)
  g = jax.grad(loss)(params)
  _, state = tx.update(g, state, params, logits_fn=apply)
  out, _ = tx.update(g, state, params)
  step_key = jax.random.fold_in(jax.random.key(0), 0)
  want = jax.grad(lambda p: nrs_jax.nrs_penalty(apply, p, step_key, radius=0.1))(params)
  got = jax.tree_util.tree_map(lambda o, t: o - t, out, g)
  _close(got, want, 1e-5)
