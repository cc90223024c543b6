"""The study's measures of a final solution (experiments/measures.py) against independent
references: a brute-force ECE, the exact Hessian of a tiny model (jax.hessian + numpy eigh),
the ascent step written out, numpy's NLL and norm; and a failing measure is NaN alone."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import nrs_jax
from experiments import measures
from experiments.study_spec import DIAGNOSTICS
from experiments.study_spec import MEASURES
from nrs_jax import flatness
from tests.conftest import enable_x64


def _brute_ece(conf, hit, bins=15):
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    inside = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
    if inside:
      acc = sum(hit[i] for i in inside) / len(inside)
      total += len(inside) / len(conf) * abs(acc - sum(conf[i] for i in inside) / len(inside))
  return total


def test_ece_is_the_binned_gap_between_accuracy_and_confidence():
  rng = np.random.default_rng(0)
  conf = rng.uniform(0.1, 1.0, 500)
  conf[:3] = [1.0, 0.0 + 1 / 15, 14 / 15]  # the edges of bins
  hit = rng.uniform(size=500) < conf**2
  assert measures.ece(conf, hit) == pytest.approx(_brute_ece(list(conf), list(hit)), abs=1e-12)
  # Two bins by hand: 0.95 right twice (gap 0.05), 0.55 right once of two (gap 0.05).
  assert measures.ece([0.95, 0.95, 0.55, 0.55], [1, 1, 1, 0]) == pytest.approx(0.05)
  assert measures.ece([0.5] * 4, [1, 0, 1, 0]) == 0.0


def _linear_model(n=60, d=5, c=3):
  """Softmax regression with a bias, as the harness's apply (params, bs, x, train, key)."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  params = {"w": jax.random.normal(k1, (d, c)) * 0.7, "b": jax.random.normal(k2, (c,)) * 0.1}
  x = np.asarray(jax.random.normal(k3, (n, d)))
  y = np.arange(n) % c
  apply = lambda p, bs, x, train, key: (x @ p["w"] + p["b"], bs)
  return params, apply, (x, y)


def test_measures_match_exact_references_on_a_tiny_model():
  with enable_x64(True):
    params, apply, (x, y) = _linear_model()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    out = measures.measure(
      apply, params, {}, (x, y), (x[:40], y[:40]), jax.random.key(0), examples=50, lanczos=15
    )
    flat, unravel = ravel_pytree(params)

    @jax.jit  # (the references jitted: eagerly every primitive compiles on its own)
    def loss(v, n=50):
      logits = x[:n] @ unravel(v)["w"] + unravel(v)["b"]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(n), y[:n]])

    H = np.asarray(jax.jit(jax.hessian(loss))(flat))
    assert out["lambda_max"] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
    # Hutchinson with 64 Rademacher probes: within 5 of its exact standard errors.
    sd = math.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 64)
    assert abs(out["hessian_trace"] - np.trace(H)) < 5 * sd + 1e-9
    g = np.asarray(jax.jit(jax.grad(loss))(flat))
    ascent = float(loss(flat + 0.05 * g / np.linalg.norm(g)) - loss(flat))
    assert out["sharpness"] == pytest.approx(ascent, rel=1e-6)
    logits = np.asarray(x[:40] @ params["w"] + params["b"])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert out["test_nll"] == pytest.approx(-np.mean(logp[np.arange(40), y[:40]]), rel=1e-9)
    p = np.exp(logp)
    ece = _brute_ece(list(p.max(-1)), list(p.argmax(-1) == y[:40]))
    assert out["test_ece"] == pytest.approx(ece, abs=1e-12)
    assert out["weight_norm"] == pytest.approx(np.linalg.norm(np.asarray(flat)), rel=1e-12)
    # the library's own divergence, on the test inputs with the measure's key; wider drifts more
    key, logits = jax.random.split(jax.random.key(0), 3)[2], lambda q, x: x @ q["w"] + q["b"]
    kl = flatness.nrs_divergence(logits, params, [x[:40]], key, radius=0.05, num_neighbors=8)
    wide = nrs_jax.nrs_penalty(
      lambda q: logits(q, x[:40]), params, key, radius=0.5, num_neighbors=8
    )
    assert (
      0 < out["neighborhood_kl"] == pytest.approx(float(kl["sharpness/nrs_divergence"]), rel=1e-9)
    )
    assert out["neighborhood_kl"] < float(wide)


def test_token_level_labels_count_each_valid_token_once():
  params, _, _ = _linear_model(d=4, c=6)
  apply = lambda p, bs, x, train, key: (x @ p["w"] + p["b"], bs)
  x = np.asarray(jax.random.normal(jax.random.key(1), (8, 5, 4)))
  y = np.arange(40).reshape(8, 5) % 6
  y[:, -2:] = -1  # padding
  out = measures.measure(apply, params, {}, (x, y), (x, y), jax.random.key(0), lanczos=5, probes=4)
  logits = np.asarray(x @ params["w"] + params["b"], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = y >= 0
  want = -np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0][valid].mean()
  assert out["test_nll"] == pytest.approx(want, rel=1e-6)
  assert all(math.isfinite(v) for k, v in out.items() if k != "failed_measures")


def test_a_failing_measure_is_nan_and_the_others_stand(monkeypatch):
  params, apply, data = _linear_model()

  def broken(*args, **kwargs):
    raise FloatingPointError("non-finite Hessian product")

  monkeypatch.setattr(measures.flatness, "top_hessian_eigenvalues", broken)
  out = measures.measure(apply, params, {}, data, data, jax.random.key(0), lanczos=5, probes=4)
  assert math.isnan(out["lambda_max"]) and math.isnan(out["lanczos_residual"])
  assert out.pop("failed_measures") == "lambda_max"
  assert all(
    math.isfinite(v) for k, v in out.items() if k not in ("lambda_max", "lanczos_residual")
  )
  monkeypatch.undo()
  bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), params)
  out = measures.measure(apply, bad, {}, data, data, jax.random.key(0), lanczos=5, probes=4)
  assert set(out) == set(MEASURES) | set(DIAGNOSTICS)
  assert all(math.isnan(v) for k, v in out.items() if k != "failed_measures")


def _bn_model(n=1150, d=4, c=3):
  """A linear layer and BatchNorm: batch statistics in train mode, the running ones (``bs``,
  deliberately far from the batch's) in evaluation mode, so the two modes' outputs differ."""
  k1, k2 = jax.random.split(jax.random.key(5))
  params = {"w": jax.random.normal(k1, (d, c)), "g": jnp.ones(c), "b": jnp.zeros(c)}
  bs = {"mean": jnp.full((c,), 0.7), "var": jnp.full((c,), 2.5)}
  x = np.asarray(jax.random.normal(k2, (n, d)))
  y = (np.arange(n) * 7) % c

  def apply(p, bs, x, train, key):
    h = x @ p["w"]
    mean, var = (h.mean(0), h.var(0)) if train else (bs["mean"], bs["var"])
    return (h - mean) / jnp.sqrt(var + 1e-5) * p["g"] + p["b"], bs

  return params, bs, apply, (x, y)


def test_measures_run_in_evaluation_mode_over_uneven_batches():
  """BatchNorm's running statistics (not the batch's), 1,150 examples as batches of 1,000 and
  150, each weighed by its rows: against the exact Hessian and numpy over all rows at once."""
  with enable_x64(True):
    params, bs, apply, (x, y) = _bn_model()
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    out = measures.measure(
      apply, params, bs, (x, y), (x, y), jax.random.key(0), examples=1150, lanczos=12
    )
    flat, unravel = ravel_pytree(params)
    eval_logits = lambda v: apply(unravel(v), bs, x, False, None)[0]
    train_logits = lambda v: apply(unravel(v), bs, x, True, None)[0]
    nll = lambda z: jnp.mean(jax.nn.logsumexp(z, -1) - z[jnp.arange(len(y)), y])
    H = np.asarray(jax.jit(jax.hessian(lambda v: nll(eval_logits(v))))(flat))
    assert out["lambda_max"] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
    H_train = np.asarray(jax.jit(jax.hessian(lambda v: nll(train_logits(v))))(flat))
    assert abs(np.linalg.eigvalsh(H_train)[-1] - out["lambda_max"]) > 1e-3  # the modes differ
    assert out["test_nll"] == pytest.approx(float(nll(eval_logits(flat))), rel=1e-9)
    assert abs(float(nll(train_logits(flat))) - out["test_nll"]) > 1e-3
    assert 0 <= out["lanczos_residual"] < 1e-3 * out["lambda_max"]
    assert out["hessian_trace_se"] > 0 and out["failed_measures"] == ""
    # The divergence over all 1,150 rows at once, with the measure's key (same neighbours).
    key = jax.random.split(jax.random.key(0), 3)[2]
    whole = nrs_jax.nrs_penalty(
      lambda q: apply(q, bs, x, False, None)[0], params, key, radius=0.05, num_neighbors=8
    )
    assert out["neighborhood_kl"] == pytest.approx(float(whole), rel=1e-9)


def test_token_level_divergence_leaves_out_padding():
  """[B, T] logits with padding labels (< 0): the divergence averages over the valid tokens
  of every batch (1,000 + 150 sequences), as nrs_penalty's where does over all at once."""
  params, _, _ = _linear_model(d=4, c=6)
  apply = lambda p, bs, x, train, key: (x @ p["w"] + p["b"], bs)
  x = np.array(jax.random.normal(jax.random.key(1), (1150, 3, 4)))
  y = np.arange(1150 * 3).reshape(1150, 3) % 6
  y[::3, -1] = -1
  x[y < 0] *= 30.0  # padding inputs far out: counting them would move the mean
  out = measures.measure(apply, params, {}, (x, y), (x, y), jax.random.key(0), lanczos=3, probes=2)
  key = jax.random.split(jax.random.key(0), 3)[2]
  fn = lambda q: x @ q["w"] + q["b"]
  valid = nrs_jax.nrs_penalty(fn, params, key, radius=0.05, num_neighbors=8, where=y >= 0)
  every = nrs_jax.nrs_penalty(fn, params, key, radius=0.05, num_neighbors=8)
  assert out["neighborhood_kl"] == pytest.approx(float(valid), rel=1e-5)
  assert abs(float(every) - float(valid)) > 0.1 * float(valid)


def test_a_failed_measure_is_logged_with_its_run(monkeypatch):
  params, apply, data = _linear_model()
  warnings = []
  monkeypatch.setattr(measures.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  monkeypatch.setattr(measures.flatness, "worst_case_sharpness", lambda *a, **k: 1 / 0)
  out = measures.measure(
    apply, params, {}, data, data, jax.random.key(0), run="wd/seed100", lanczos=5, probes=4
  )
  assert out["failed_measures"] == "sharpness" and math.isnan(out["sharpness"])
  assert warnings == [
    "measure sharpness failed for run wd/seed100: ZeroDivisionError: division by zero"
  ]
