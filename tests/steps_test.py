"""SAF and MESA steps against hand-computed losses on a tiny batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import special

from experiments import losses
from experiments import optimizers
from experiments import steps
from experiments.configs import default

X = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
Y = np.array([0, 1, 2, 1], np.int32)
IDX = np.array([3, 0, 6, 2], np.int32)  # rows of an 8-example training set
BATCH = {"x": jnp.asarray(X), "y": jnp.asarray(Y), "idx": jnp.asarray(IDX)}
KEY = jax.random.key(0)
PARAMS = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)}


def apply_fn(params, bs, x, train, key):
  return x @ params["w"], bs


def _config(method, **sub):
  """The default config with plain SGD (lr 1) and ``sub`` in the method's options (for
  ``nrs_unlabeled``, the ``nrs`` options it reads)."""
  config = default.get_config()
  name = "nrs" if method == "nrs_unlabeled" else method
  with config.unlocked():
    config.method = method
    config.learning_rate, config.momentum, config.weight_decay = 1.0, 0.0, 0.0
    if name in config:
      config[name] = ml_collections.ConfigDict({**config[name].to_dict(), **sub})
  return config


def _np_soft_kl(teacher, student, tau):
  p = special.softmax(np.asarray(teacher, np.float64) / tau, -1)
  q = special.softmax(np.asarray(student, np.float64) / tau, -1)
  return special.rel_entr(p, q).sum(-1).mean()


def test_soft_kl_matches_scipy():
  a, b = np.random.default_rng(2).normal(size=(2, 6, 4))
  for tau in (1.0, 2.5):
    np.testing.assert_allclose(losses.soft_kl(a, b, tau), _np_soft_kl(a, b, tau), rtol=1e-5)


def _hand_gradient(teacher_logits, lam, tau, at=PARAMS):
  # CE + lam * KL(softmax(teacher / tau) || softmax(z / tau)), written out directly.
  p = jax.nn.softmax(jnp.asarray(teacher_logits) / tau, -1)

  def loss(params):
    z = BATCH["x"] @ params["w"]
    ce = -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(4), BATCH["y"]])
    kl = jnp.mean(jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(z / tau)), -1))
    return ce + lam * kl, ce

  return jax.grad(lambda q: loss(q)[0])(at), jax.grad(lambda q: loss(q)[1])(at)


def test_saf_step_uses_the_outputs_of_epochs_ago():
  config = _config("saf", lam=0.7, tau=2.0, epochs=1)
  tx = optimizers.make_optimizer(config, 10**6, num_train=8, num_classes=3)
  step = jax.jit(steps.make_step("saf", apply_fn, tx, config, steps_per_epoch=1))
  state = tx.init(PARAMS)
  p1, _, state, _ = step(PARAMS, {}, state, BATCH, jax.random.key(0))
  # Epoch 0 has no past: the step is plain cross-entropy; the memory holds its logits.
  _, g_ce = _hand_gradient(np.zeros((4, 3)), 0.7, 2.0)
  np.testing.assert_allclose(PARAMS["w"] - p1["w"], g_ce["w"], rtol=1e-4, atol=1e-6)
  stored = np.asarray(state[0].outputs[0])
  np.testing.assert_allclose(stored[IDX], X @ np.asarray(PARAMS["w"]), rtol=1e-5)
  assert not stored[[1, 4, 5, 7]].any()
  # Epoch 1: KL to the logits these examples got one epoch earlier (at PARAMS).
  old = X @ np.asarray(PARAMS["w"])
  p2, _, state, _ = step(p1, {}, state, BATCH, jax.random.key(0))
  want, g_ce1 = _hand_gradient(old, 0.7, 2.0, at=p1)
  np.testing.assert_allclose(p1["w"] - p2["w"], want["w"], rtol=1e-4, atol=1e-6)
  assert not np.allclose(want["w"], g_ce1["w"])  # the trajectory term is there
  assert _np_soft_kl(old, X @ np.asarray(p1["w"]), 2.0) > 0
  assert int(state[0].count) == 2
  np.testing.assert_array_equal(np.asarray(state[0].stamps[0])[IDX], 2)  # epoch 1 wrote them


def test_saf_never_distils_from_a_stale_or_missing_target():
  """An example that epoch e - E did not see (drop-last batching) gets no KL term at epoch e:
  neither the zero logits never written nor logits from 2E epochs ago."""
  config = _config("saf", lam=0.7, tau=2.0, epochs=1)
  tx = optimizers.make_optimizer(config, 10**6, num_train=8, num_classes=3)
  step = jax.jit(steps.make_step("saf", apply_fn, tx, config, steps_per_epoch=1))
  first = {**BATCH, "idx": jnp.array([3, 0, 6, 5])}  # epoch 0 writes rows 3, 0, 6, 5
  p1, _, state, _ = step(PARAMS, {}, tx.init(PARAMS), first, KEY)
  second = {**BATCH, "idx": jnp.array([3, 0, 1, 2])}  # epoch 1: rows 1 and 2 have no target
  p2, _, state, _ = step(p1, {}, state, second, KEY)
  old = np.asarray(X[:2] @ np.asarray(PARAMS["w"]))  # rows 3, 0: their epoch-0 logits

  def loss(q):
    z = BATCH["x"] @ q["w"]
    ce = -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(4), BATCH["y"]])
    p = jax.nn.softmax(jnp.asarray(old) / 2.0, -1)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(z[:2] / 2.0)), -1)
    return ce + 0.7 * jnp.mean(kl)  # the mean over the two examples with a target

  want = jax.grad(loss)(p1)["w"]
  np.testing.assert_allclose(p1["w"] - p2["w"], want, rtol=1e-4, atol=1e-6)
  # Epoch 2 reads epoch 1's writes only: row 5 (written at epoch 0) is stale, no term.
  third = {**BATCH, "idx": jnp.array([5, 5, 5, 5])}
  p3, _, _, _ = step(p2, {}, state, third, KEY)
  _, g_ce = _hand_gradient(np.zeros((4, 3)), 0.0, 2.0, at=p2)
  np.testing.assert_allclose(p2["w"] - p3["w"], g_ce["w"], rtol=1e-4, atol=1e-6)


def test_mesa_step_distils_from_the_ema_teacher():
  config = _config("mesa", lam=0.5, tau=1.5, decay=0.9, start_epoch=1)
  tx = optimizers.make_optimizer(config, 10**6)
  step = jax.jit(steps.make_step("mesa", apply_fn, tx, config, steps_per_epoch=1))
  state = tx.init(PARAMS)
  p1, _, state, _ = step(PARAMS, {}, state, BATCH, jax.random.key(0))
  ema = 0.9 * np.asarray(PARAMS["w"]) + 0.1 * np.asarray(p1["w"])
  np.testing.assert_allclose(state[0].ema["w"], ema, rtol=1e-6)
  _, g_ce = _hand_gradient(np.zeros((4, 3)), 0.5, 1.5)  # before start_epoch: plain CE
  np.testing.assert_allclose(PARAMS["w"] - p1["w"], g_ce["w"], rtol=1e-4, atol=1e-6)
  p2, _, state, _ = step(p1, {}, state, BATCH, jax.random.key(0))
  want, g_ce1 = _hand_gradient(X @ ema, 0.5, 1.5, at=p1)
  np.testing.assert_allclose(p1["w"] - p2["w"], want["w"], rtol=1e-4, atol=1e-6)
  assert not np.allclose(want["w"], g_ce1["w"])


def test_saf_needs_the_dataset_size():
  with pytest.raises(ValueError, match="num_train"):
    optimizers.make_optimizer(_config("saf"), 100)


def test_sam_baseline_matches_optax_contrib_sam_opaque_step_for_step():
  # Our SAM (kept for asam and randomized SAM) against optax.contrib.sam in opaque mode,
  # sync period 2 (one ascent, then the base step), around the same base optimiser.
  def apply(params, bs, x, train, key):
    return jnp.tanh(x @ params["w1"]) @ params["w2"], bs

  rng = np.random.default_rng(2)
  params = {
    "w1": jnp.asarray(rng.normal(size=(5, 8)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(8, 3)) / 3, jnp.float32),
  }
  config = _config("sam", rho=0.3)
  with config.unlocked():
    config.learning_rate, config.momentum, config.weight_decay = 0.1, 0.9, 1e-3
  base = optimizers.base_optimizer(config, 100)
  ours = jax.jit(steps.make_step("sam", apply, base, config))
  tx = optax.contrib.sam(
    base, optax.chain(optax.contrib.normalize(), optax.sgd(0.3)), sync_period=2, opaque_mode=True
  )

  @jax.jit
  def theirs(p, s, batch):
    g = steps.grad_at(apply, p, {}, batch, KEY)[1]
    grad_fn = lambda q, _: steps.grad_at(apply, q, {}, batch, KEY)[1]
    updates, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), s

  p1, s1, p2, s2 = params, base.init(params), params, tx.init(params)
  for t in range(4):
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32), "y": jnp.arange(16) % 3}
    p1, _, s1, _ = ours(p1, {}, s1, batch, KEY)
    p2, s2 = theirs(p2, s2, batch)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
  assert not np.allclose(p1["w1"], params["w1"])


def _ce_grad(params):
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    BATCH["x"] @ p["w"], BATCH["y"]
  ).mean()
  return jax.grad(loss)(params)


def test_looksam_refresh_is_a_sam_step_and_reuse_adds_the_orthogonal_part():
  config = _config("looksam", rho=0.3, every=5, alpha=0.7)
  tx = optimizers.make_optimizer(config, 100)
  refresh = steps.make_step("looksam", apply_fn, tx, config)
  reuse = steps.make_cheap_step("looksam", apply_fn, tx, config)
  sam = steps.make_step(
    "sam", apply_fn, optimizers.base_optimizer(config, 100), _config("sam", rho=0.3)
  )
  p1, _, s1, _ = refresh(PARAMS, {}, tx.init(PARAMS), BATCH, KEY)
  want, _, _, _ = sam(PARAMS, {}, optimizers.base_optimizer(config, 100).init(PARAMS), BATCH, KEY)
  np.testing.assert_allclose(p1["w"], want["w"], rtol=1e-6)  # the refresh is SAM's step
  # The stored part, written out in float64: g_s - (g . g_s / |g|^2) g.
  g = np.asarray(_ce_grad(PARAMS)["w"], np.float64)
  e = 0.3 * g / np.linalg.norm(g)
  gs = np.asarray(_ce_grad({"w": PARAMS["w"] + e})["w"], np.float64)
  gv = gs - (np.sum(g * gs) / np.sum(g * g)) * g
  np.testing.assert_allclose(s1[0].gv["w"], gv, rtol=1e-4, atol=1e-7)
  # A reuse step: g + alpha |g| / |g_v| g_v at the new point (lr 1, no momentum or decay).
  p2, _, s2, _ = reuse(p1, {}, s1, BATCH, KEY)
  g1 = np.asarray(_ce_grad(p1)["w"], np.float64)
  step = g1 + 0.7 * np.linalg.norm(g1) / np.linalg.norm(gv) * gv
  lr = float(optax.cosine_decay_schedule(1.0, 100)(1))
  np.testing.assert_allclose(p2["w"], np.asarray(p1["w"]) - lr * step, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s2[0].gv["w"], s1[0].gv["w"])  # kept until the next refresh


def test_reuse_schedules_and_their_config_errors():
  config = _config("looksam", every=3)
  assert [steps.runs_own_step(config, t) for t in range(7)] == [True, False, False] * 2 + [True]
  config = _config("nrs", reuse="plain", refresh_every=2, implementation="transform")
  assert [steps.runs_own_step(config, t) for t in range(4)] == [True, False, True, False]
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match=r"config.looksam.every=.*int >= 1"):
      steps.runs_own_step(_config("looksam", every=bad), 0)
  with pytest.raises(
    ValueError, match="config.nrs.reuse needs config.nrs.implementation='transform'"
  ):
    steps.runs_own_step(_config("nrs", reuse="plain", refresh_every=2), 0)
  config = _config(
    "nrs", reuse="plain", refresh_every=5, implementation="transform", probability=0.5
  )
  with pytest.raises(ValueError, match="config.nrs.probability"):
    steps.runs_own_step(config, 0)


def test_nrs_reuse_step_in_the_harness_adds_the_refresh_penalty_gradient():
  config = _config(
    "nrs", reuse="plain", refresh_every=4, implementation="transform", alpha=1.0, radius=0.1
  )
  tx = optimizers.make_optimizer(config, 100)
  refresh = steps.make_step("nrs", apply_fn, tx, config)
  reuse = steps.make_cheap_step("nrs", apply_fn, tx, config)
  p1, _, s1, _ = refresh(PARAMS, {}, tx.init(PARAMS), BATCH, KEY)
  p2, _, s2, _ = reuse(p1, {}, s1, BATCH, KEY)
  lr = float(optax.cosine_decay_schedule(1.0, 100)(1))
  want = np.asarray(p1["w"]) - lr * (np.asarray(_ce_grad(p1)["w"]) + np.asarray(s1[0].reused["w"]))
  np.testing.assert_allclose(p2["w"], want, rtol=1e-5, atol=1e-6)
  assert int(s2[0].refreshed_at) == 0 and int(s2[0].count) == 2
