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
