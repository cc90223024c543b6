"""Training with unlabeled data: the labelled split, the unlabeled batches, and the consistency
methods nrs_unlabeled, VAT and the Pi-model against hand-written losses and finite
differences. The unlabeled examples' labels are never read: garbage there changes nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

import nrs_jax
from experiments import input_pipeline
from experiments import optimizers
from experiments import semi_steps
from experiments import steps
from experiments import train
from experiments.configs import default
from tests.conftest import enable_x64
from tests.steps_test import _config
from tests.steps_test import apply_fn

RNG = np.random.default_rng(0)
X, U = RNG.normal(size=(4, 5)).astype(np.float32), RNG.normal(size=(12, 5)).astype(np.float32)
BATCH = {"x": jnp.asarray(X), "y": jnp.array([0, 1, 2, 1]), "u": jnp.asarray(U)}
PARAMS = {"w": jnp.asarray(RNG.normal(size=(5, 3)), jnp.float32)}
KEY = jax.random.key(0)


def _step(method, **sub):
  config = _config(method, **sub)
  tx = optimizers.make_optimizer(config, 10)
  step = jax.jit(steps.make_step(method, apply_fn, tx, config))
  return step(PARAMS, {}, tx.init(PARAMS), BATCH, KEY)


def test_split_labeled_keeps_a_balanced_share_and_drops_the_rest_of_the_labels():
  y = np.repeat(np.arange(4), [40, 20, 30, 10])
  split = input_pipeline.Split(np.arange(100, dtype=np.float32)[:, None], y)
  lab, unl = input_pipeline.split_labeled(split, 0.1, 4, seed=3)
  assert np.bincount(lab.y).tolist() == [4, 2, 3, 1]
  assert (unl.y == -1).all() and len(unl.y) == 90
  assert sorted([*lab.x[:, 0], *unl.x[:, 0]]) == list(range(100))  # a partition
  np.testing.assert_array_equal(lab.y, y[lab.x[:, 0].astype(int)])
  again, _ = input_pipeline.split_labeled(split, 0.1, 4, seed=3)
  np.testing.assert_array_equal(again.x, lab.x)
  assert input_pipeline.split_labeled(split, 1.0, 4, seed=3) == (split, None)
  for bad in (0.0, 1.5, -0.1, True, "0.1"):
    with pytest.raises(ValueError, match=r"labeled_fraction=.* must be in \(0, 1\]"):
      input_pipeline.split_labeled(split, bad, 4, seed=3)
  with pytest.raises(ValueError, match="labeled_fraction=0.04 leaves class 3 .* at least 0.1"):
    input_pipeline.split_labeled(split, 0.04, 4, seed=3)


def test_load_keeps_validation_and_test_labelled_and_refuses_streams():
  full = input_pipeline.load("digits", seed=1)
  ds = input_pipeline.load("digits", seed=1, labeled_fraction=0.2)
  for s in ("validation", "test"):
    np.testing.assert_array_equal(getattr(ds, s).y, getattr(full, s).y)
  assert len(ds.train.y) + len(ds.unlabeled.y) == len(full.train.y)
  assert abs(len(ds.train.y) / len(full.train.y) - 0.2) < 0.01
  assert ds.num_train == len(ds.train.y)
  with pytest.raises(ValueError, match="labeled_fraction is for the in-memory"):
    input_pipeline.load("stdlib", labeled_fraction=0.5)


def test_unlabeled_batches_are_a_function_of_the_step_and_split_over_processes():
  ds = input_pipeline.load("digits", seed=1, labeled_fraction=0.2)
  a = input_pipeline.unlabeled_batch(ds, 7, 32, seed=1)
  np.testing.assert_array_equal(a, input_pipeline.unlabeled_batch(ds, 7, 32, seed=1))
  parts = [
    input_pipeline.unlabeled_batch(ds, 7, 32, 1, process_index=i, process_count=4) for i in range(4)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), a)
  n = len(ds.unlabeled.x) // 32
  epoch = np.concatenate([input_pipeline.unlabeled_batch(ds, s, 32, 1) for s in range(n)])
  assert len({r.tobytes() for r in epoch}) == 32 * n  # no row twice within an epoch


@pytest.mark.parametrize(
  "method,zero",
  [("nrs_unlabeled", {"radius": 0.0}), ("vat", {"eps": 0.0}), ("pi_model", {"noise": 0.0})],
)
@pytest.mark.slow_cases("nrs_unlabeled-zero0", "pi_model-zero2")
def test_at_zero_strength_each_consistency_method_is_sgd_on_the_labelled_rows(method, zero):
  want = _step("sgd")
  got = _step(method, **zero)
  np.testing.assert_allclose(got[0]["w"], want[0]["w"], rtol=1e-5, atol=1e-6)
  assert float(got[3]["consistency"]) == pytest.approx(0.0, abs=1e-7)


def _np_kl(p_logits, q_logits):
  p, q = special.softmax(p_logits, -1), special.softmax(q_logits, -1)
  return special.rel_entr(p, q).sum(-1).mean()


def test_vat_direction_matches_central_differences_in_float64():
  with enable_x64():
    w = np.asarray(PARAMS["w"], np.float64)
    x = np.concatenate([X, U]).astype(np.float64)
    target = x @ w
    xi, eps, key = 1e-3, 0.7, jax.random.key(5)
    r = semi_steps.vat_perturbation(
      lambda v: v @ jnp.asarray(w), jnp.asarray(x), target, key, xi, eps
    )
    d = np.array(jax.random.normal(key, x.shape, jnp.float32), np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    g, h = np.zeros_like(x), 1e-5
    for i, j in np.ndindex(*x.shape):  # the numpy KL, central differences per input element
      e = np.zeros_like(x)
      e[i, j] = h
      up, down = _np_kl(target, (x + xi * d + e) @ w), _np_kl(target, (x + xi * d - e) @ w)
      g[i, j] = (up - down) / (2 * h)
    want = eps * g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(r, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), eps, rtol=1e-10)


def _both_batches_and_vat_direction():
  """The labelled and unlabeled inputs together, the CE on the labelled rows, and VAT's
  r_adv at PARAMS as the step draws it (its key: the second of the step key's split; a
  large xi of 0.1 and eps 2.0, so that r_adv resolves to float32 precision)."""
  x = jnp.concatenate([BATCH["x"], BATCH["u"]])
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z[:4], BATCH["y"]).mean()
  _, nkey = jax.random.split(KEY)
  at = lambda v: v @ PARAMS["w"]
  r = jax.jit(lambda: semi_steps.vat_perturbation(at, x, x @ PARAMS["w"], nkey, 0.1, 2.0))()
  return x, ce, r, nkey


def test_vat_and_pi_model_steps_match_their_losses_written_out():
  x, ce, r, nkey = _both_batches_and_vat_direction()
  kl = lambda p, q: jnp.mean(nrs_jax.kl(p, q))
  # VAT: CE + KL(p(x) fixed || p(x + r_adv)), r_adv drawn with the step's key split.
  vat = lambda p: ce(x @ p["w"]) + kl(jax.lax.stop_gradient(x @ p["w"]), (x + r) @ p["w"])
  got = _step("vat", eps=2.0, xi=0.1)  # (a large xi: r_adv resolved to float32 precision)
  want = PARAMS["w"] - jax.jit(jax.grad(vat))(PARAMS)["w"]
  np.testing.assert_allclose(got[0]["w"], want, rtol=2e-5)
  # Pi-model: CE on the first noisy draw + w(0) * the squared error between the two draws'
  # softmax outputs (mean over examples and classes), gradients through both; w(0) is
  # weight * exp(-5), the Gaussian ramp-up's start.
  k1, k2, _, _ = jax.random.split(KEY, 4)
  n1, n2 = (0.3 * jax.random.normal(k, x.shape) for k in (k1, k2))
  sq = lambda a, b: jnp.mean((jax.nn.softmax(a) - jax.nn.softmax(b)) ** 2)
  pi = lambda p: (
    ce((x + n1) @ p["w"]) + 40.0 * np.exp(-5.0) * sq((x + n1) @ p["w"], (x + n2) @ p["w"])
  )
  got = _step("pi_model", noise=0.3, weight=40.0)
  want = PARAMS["w"] - jax.jit(jax.grad(pi))(PARAMS)["w"]
  np.testing.assert_allclose(got[0]["w"], want, rtol=2e-5)
  assert int(got[2][0].count) == 1  # the ramp-up's step count moved on
  # nrs_unlabeled: CE + nrs_penalty over the labelled and unlabeled inputs together.
  nrs = lambda p: ce(x @ p["w"]) + nrs_jax.nrs_penalty(lambda q: x @ q["w"], p, nkey, radius=0.2)
  got = _step("nrs_unlabeled", radius=0.2)
  want = PARAMS["w"] - jax.jit(jax.grad(nrs))(PARAMS)["w"]
  np.testing.assert_allclose(got[0]["w"], want, rtol=2e-5)


def test_pi_model_rampup_is_laine_and_ailas_gaussian():
  total, frac = 300, 80 / 300
  t = np.arange(0, 301, 20)
  want = np.exp(-5.0 * (1.0 - np.minimum(t / 80.0, 1.0)) ** 2)
  np.testing.assert_allclose(semi_steps.rampup(t, total, frac), want, rtol=1e-6)
  assert float(semi_steps.rampup(0, total, frac)) == pytest.approx(np.exp(-5.0))
  assert float(semi_steps.rampup(80, total, frac)) == 1.0


def test_vat_nrs_is_vat_plus_the_nrs_penalty_on_the_same_inputs():
  x, ce, r, _ = _both_batches_and_vat_direction()
  vat = lambda p: jnp.mean(nrs_jax.kl(jax.lax.stop_gradient(x @ p["w"]), (x + r) @ p["w"]))
  pen = lambda p: nrs_jax.nrs_penalty(
    lambda q: x @ q["w"], p, jax.random.fold_in(KEY, 1), radius=0.2
  )
  total = lambda p: ce(x @ p["w"]) + vat(p) + 0.5 * pen(p)
  config = _config("vat_nrs")
  with config.unlocked():
    config.vat.eps, config.vat.xi, config.nrs.radius, config.nrs.alpha = 2.0, 0.1, 0.2, 0.5
  tx = optimizers.make_optimizer(config, 10)
  got = jax.jit(steps.make_step("vat_nrs", apply_fn, tx, config))(
    PARAMS, {}, tx.init(PARAMS), BATCH, KEY
  )
  want = PARAMS["w"] - jax.jit(jax.grad(total))(PARAMS)["w"]
  np.testing.assert_allclose(got[0]["w"], want, rtol=2e-5)
  with pytest.raises(ValueError, match="vat_nrs.*config.nrs.neighbor_batch_size"):
    bad = _config("vat_nrs")
    with bad.unlocked():
      bad.nrs.neighbor_batch_size = 8
    steps.make_step("vat_nrs", apply_fn, tx, bad)


def test_an_unlabeled_batch_of_the_wrong_shape_or_none_is_an_error_naming_it():
  config = _config("vat")
  tx = optimizers.base_optimizer(config, 10)
  step = steps.make_step("vat", apply_fn, tx, config)
  bad = {**BATCH, "u": jnp.ones((12, 6))}
  with pytest.raises(ValueError, match=r"unlabeled batch batch\['u'\] has shape \(12, 6\)"):
    jax.jit(step)(PARAMS, {}, tx.init(PARAMS), bad, KEY)
  no_u = {k: v for k, v in BATCH.items() if k != "u"}
  with pytest.raises(ValueError, match=r"batch\['u'\].*config.labeled_fraction < 1"):
    jax.jit(step)(PARAMS, {}, tx.init(PARAMS), no_u, KEY)


def _digits_config(method, **kw):
  config = default.get_config()
  with config.unlocked():
    config.update(dataset="digits", method=method, progress=False, num_steps=8, batch_size=16)
    config.update(
      {"labeled_fraction": 0.2, "unlabeled_batch_size": 32, "eval_every_epochs": 1, **kw}
    )
    config.model_kwargs = dict(hidden=(16,))
    config.hessian.num_iters = 0
  return config


def test_a_consistency_method_without_unlabeled_data_fails_naming_the_config(tmp_path):
  config = _digits_config("pi_model", labeled_fraction=1.0)
  with pytest.raises(ValueError, match="config.labeled_fraction < 1 .*config.unlabeled_batch_size"):
    train.train_and_evaluate(config, str(tmp_path / "a"))


def test_no_method_reads_the_labels_of_the_unlabeled_examples(tmp_path, monkeypatch):
  """Garbage labels on the unlabeled examples give bit-identical final weights through
  train_and_evaluate for nrs_unlabeled (vat and pi_model get the same batches, and their
  steps are checked above against losses that read the labelled rows' labels only), and
  bit-identical batches for the labelled-only methods (sgd, sam, nrs, ...)."""
  real = train.load_data

  def load(config, garbage):
    ds = real(config)
    y = np.random.default_rng(9).integers(-5, 50, len(ds.unlabeled.y)).astype(np.int32)
    return (
      dataclasses.replace(ds, unlabeled=input_pipeline.Split(ds.unlabeled.x, y)) if garbage else ds
    )

  config = _digits_config("nrs_unlabeled")
  clean, dirty = load(config, False), load(config, True)
  for step in range(12):
    a, b = (input_pipeline.train_batch(d, step, 16, 0) for d in (clean, dirty))
    assert a.keys() == b.keys() == {"x", "y", "idx"}
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  finals = []
  for garbage in (False, True):
    monkeypatch.setattr(train, "load_data", lambda c, garbage=garbage: load(c, garbage))
    work = str(tmp_path / f"run{garbage}")
    train.train_and_evaluate(config, work)
    finals.append(dict(np.load(f"{work}/final_state.npz")))
  assert finals[0].keys() == finals[1].keys()
  for k in finals[0]:
    np.testing.assert_array_equal(finals[0][k], finals[1][k], err_msg=k)


def test_vats_xi_gives_the_small_xi_direction_in_float32():
  """On a ReLU MLP at initialisation (digits): the float32 direction at the config's xi is
  the float64 direction at the paper's xi = 1e-6 (cosine > 0.999 per example); the paper's
  1e-6 in float32 is not (x + xi d rounds away most of xi d)."""
  ds = input_pipeline.load("digits")
  x = jnp.asarray(ds.train.x[:32])
  k1, k2 = jax.random.split(jax.random.key(3))
  w1 = jax.random.normal(k1, (x.shape[1], 64)) * np.sqrt(2 / x.shape[1])
  w2 = jax.random.normal(k2, (64, 10)) * np.sqrt(2 / 64)
  mlp = lambda v: jax.nn.relu(v @ w1.astype(v.dtype)) @ w2.astype(v.dtype)
  key, xi = jax.random.key(1), default.get_config().vat.xi
  direction = jax.jit(lambda v, xi: semi_steps.vat_perturbation(mlp, v, mlp(v), key, xi, 1.0))
  with enable_x64():
    want = np.asarray(direction(x.astype(jnp.float64), 1e-6))
  cos = lambda xi: np.sum(np.asarray(direction(x, xi)) * want, 1)
  assert cos(xi).min() > 0.999
  assert np.median(cos(1e-6)) < 0.99


@pytest.mark.parametrize(
  "key, value",
  [("neighbor_batch_size", 8), ("reuse_center_logits", True), ("probability", 0.5)],
)
def test_nrs_unlabeled_refuses_the_nrs_options_it_does_not_implement(key, value):
  """They were dropped silently: a method given an option it ignores fails before training."""
  config = default.get_config()
  with config.unlocked():
    config.method = "nrs_unlabeled"
    config.nrs[key] = value
  with pytest.raises(ValueError, match=rf"nrs_unlabeled.*config\.nrs\.{key}="):
    steps.make_step("nrs_unlabeled", lambda *a: None, optax.sgd(0.1), config)
