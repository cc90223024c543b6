"""The flatness and calibration of a final solution at its weights in evaluation mode, one
column each of a final run's row (study_spec.MEASURES). On the first ``examples`` training
examples (the labels the run trained on): ``lambda_max`` (Lanczos), ``hessian_trace``
(Hutchinson, ``probes`` probes), ``sharpness`` (SAM's ascent step of length ``rho``). On the test
inputs: ``neighborhood_kl`` (the library's NRS divergence at ``radius``, ``draws`` neighbours),
``test_nll`` and ``test_ece`` (15 bins). And ``weight_norm`` (lambda_max scales with it). A
measure that fails or is not finite is NaN; the others stand."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

import nrs_jax
from experiments import losses
from nrs_jax import flatness

SETTINGS = dict(examples=1000, batch=1000, lanczos=20, probes=64, rho=0.05, radius=0.05, draws=8)


def ece(confidence, correct, bins: int = 15) -> float:
  """Expected calibration error: over equal-width bins, share x |accuracy - mean confidence|,
  i.e. sum_b |sum correct - sum confidence| / n; a confidence of 1 falls in the last bin."""
  c, y = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  idx = np.minimum((c * bins).astype(int), bins - 1)
  gap = np.bincount(idx, y, minlength=bins) - np.bincount(idx, c, minlength=bins)
  return float(np.abs(gap).sum() / len(c))


def _test_calibration(logits_fn, params, batches) -> tuple[float, float]:
  """(mean NLL, ECE) over the valid labels of ``batches`` ([B] or token-level [B, T])."""
  nll, conf, hit = [], [], []
  for x, y in batches:
    logits = np.asarray(logits_fn(params, x), np.float64)
    if not np.all(np.isfinite(logits)):
      return math.nan, math.nan  # (a NaN confidence would fall in some bin)
    y = np.asarray(y)
    valid = y >= 0
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0]
    nll.append(-picked[valid])
    conf.append(np.exp(logp.max(-1))[valid])
    hit.append((logp.argmax(-1) == y)[valid])
  return float(np.concatenate(nll).mean()), ece(np.concatenate(conf), np.concatenate(hit))


def measure(apply, params, batch_stats, train, test, key, **overrides) -> dict:
  """The measures of one solution. ``apply(params, batch_stats, x, train, key) -> (logits,
  batch_stats)`` (the harness's Model.apply); ``train`` and ``test`` are (x, y) splits."""
  s = {**SETTINGS, **overrides}
  logits_fn = jax.jit(lambda p, x: apply(p, batch_stats, x, False, None)[0])
  loss = lambda p, b: losses.cross_entropy(logits_fn(p, b[0]), b[1])
  n, bsz = min(s["examples"], len(train[1])), s["batch"]
  fit = [(train[0][i : min(i + bsz, n)], train[1][i : min(i + bsz, n)]) for i in range(0, n, bsz)]
  tests = [(test[0][i : i + 1000], test[1][i : i + 1000]) for i in range(0, len(test[1]), 1000)]
  (k_eig, k_tr, k_kl), out = jax.random.split(key, 3), {}
  # flatness.nrs_divergence's sum, jitted (eagerly it compiles each primitive per neighbour)
  pen = jax.jit(
    lambda p, x: nrs_jax.nrs_penalty(
      lambda q: logits_fn(q, x), p, k_kl, radius=s["radius"], num_neighbors=s["draws"]
    )
  )
  kl = lambda: sum(len(x) * pen(params, x) for x, _ in tests) / sum(len(x) for x, _ in tests)
  todo = {
    ("lambda_max",): lambda: flatness.top_hessian_eigenvalues(
      loss, params, fit, k_eig, num_iters=s["lanczos"]
    ).eigenvalues[:1],
    ("hessian_trace",): lambda: [
      flatness.hessian_trace(loss, params, fit, k_tr, num_samples=s["probes"]).trace
    ],
    ("sharpness",): lambda: [
      flatness.worst_case_sharpness(loss, params, fit, rho=s["rho"])["sharpness/worst_case"]
    ],
    ("neighborhood_kl",): lambda: [kl()],
    ("test_nll", "test_ece"): lambda: _test_calibration(logits_fn, params, tests),
    ("weight_norm",): lambda: [optax.tree.norm(params)],
  }
  for names, fn in todo.items():
    try:
      values = fn()
    except (FloatingPointError, ValueError, ArithmeticError):
      values = (math.nan,) * len(names)
    out.update(
      {k: float(v) if math.isfinite(float(v)) else math.nan for k, v in zip(names, values)}
    )
  return out
