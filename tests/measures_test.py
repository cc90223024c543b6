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
  assert all(math.isfinite(v) for v in out.values())


def test_a_failing_measure_is_nan_and_the_others_stand(monkeypatch):
  params, apply, data = _linear_model()

  def broken(*args, **kwargs):
    raise FloatingPointError("non-finite Hessian product")

  monkeypatch.setattr(measures.flatness, "top_hessian_eigenvalues", broken)
  out = measures.measure(apply, params, {}, data, data, jax.random.key(0), lanczos=5, probes=4)
  assert math.isnan(out["lambda_max"])
  assert all(math.isfinite(v) for k, v in out.items() if k != "lambda_max")
  monkeypatch.undo()
  bad = jax.tree.map(lambda a: a.at[0].set(jnp.nan), params)
  out = measures.measure(apply, bad, {}, data, data, jax.random.key(0), lanczos=5, probes=4)
  assert set(out) == set(MEASURES) and all(math.isnan(v) for v in out.values())
