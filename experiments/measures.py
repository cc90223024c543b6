"""The flatness and calibration of a solution at its weights in evaluation mode: ONE path, a
named function per measure, used by the study's final rows (``measure``) and by the harness's
Hessian metrics during training (``experiments.train``).

On training examples (the labels the run trained on): ``lambda_max`` (Lanczos, with its
``lanczos_residual`` ``||H v - lambda v||``), ``hessian_trace`` (Hutchinson with ``probes``
Rademacher probes, with its standard error ``hessian_trace_se``), ``sharpness`` (SAM's ascent
step of length ``rho``). On the test inputs: ``neighborhood_kl`` (the library's NRS divergence
at ``radius``, ``draws`` neighbours), ``test_nll`` and ``test_ece`` (15 bins). And
``weight_norm`` (lambda_max scales with it). Each average over batches weighs a batch by its
examples (or valid tokens). A measure that fails or is not finite is NaN, its failure logged
with the run and named in ``failed_measures``; the others stand."""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

import nrs_jax
from experiments import losses
from nrs_jax import flatness

SETTINGS = dict(examples=1000, batch=1000, lanczos=20, probes=64, rho=0.05, radius=0.05, draws=8)
TEST_BATCH = 1000


def batches(split: tuple, n: int, size: int) -> list:
  """The first ``n`` rows of an ``(x, y)`` split in batches of ``size`` (the last may be
  shorter; the flatness toolkit weighs each batch by its rows)."""
  x, y = split
  n = min(n, len(y))
  return [(x[i : min(i + size, n)], y[i : min(i + size, n)]) for i in range(0, n, size)]


def lambda_max(loss, params, data, key, *, iters: int) -> dict:
  """The top Hessian eigenvalue by Lanczos and its residual ``||H v - lambda v||``."""
  r = flatness.top_hessian_eigenvalues(loss, params, data, key, num_iters=iters)
  return {"lambda_max": r.eigenvalues[0], "lanczos_residual": r.residual_norms[0]}


def hessian_trace(loss, params, data, key, *, probes: int) -> dict:
  """Hutchinson's trace estimate and its standard error."""
  r = flatness.hessian_trace(loss, params, data, key, num_samples=probes)
  return {"hessian_trace": r.trace, "hessian_trace_se": r.stderr}


def sharpness(loss, params, data, *, rho: float) -> dict:
  """SAM's worst-case sharpness: the loss rise along the normalised gradient of length rho."""
  r = flatness.worst_case_sharpness(loss, params, data, rho=rho)
  return {"sharpness": r["sharpness/worst_case"]}


def neighborhood_kl(logits_fn, params, tests, key, *, radius: float, draws: int) -> dict:
  """The NRS divergence at ``radius`` (absolute Gaussian, ``draws`` neighbours, the same for
  every batch), averaged over the test examples, or over the valid tokens of ``[B, T]`` labels
  (padding < 0 excluded, through the penalty's ``where``)."""

  def pen(p, x, where):
    logits = lambda q: logits_fn(q, x)
    return nrs_jax.nrs_penalty(logits, p, key, radius=radius, num_neighbors=draws, where=where)

  pen = jax.jit(pen)
  total, count = 0.0, 0
  for x, y in tests:
    where = (np.asarray(y) >= 0) if np.ndim(y) > 1 else None
    n = len(x) if where is None else int(where.sum())
    total = total + n * pen(params, x, where)  # (float32, as the study's rows)
    count += n
  return {"neighborhood_kl": total / count}


def ece(confidence, correct, bins: int = 15) -> float:
  """Expected calibration error: over equal-width bins, share x |accuracy - mean confidence|,
  i.e. sum_b |sum correct - sum confidence| / n; a confidence of 1 falls in the last bin."""
  c, y = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  idx = np.minimum((c * bins).astype(int), bins - 1)
  gap = np.bincount(idx, y, minlength=bins) - np.bincount(idx, c, minlength=bins)
  return float(np.abs(gap).sum() / len(c))


def test_calibration(logits_fn, params, tests) -> dict:
  """Mean NLL and ECE over the valid labels of ``tests`` ([B] or token-level [B, T], padding
  < 0): every valid label counts once, whatever batch it is in."""
  nll, conf, hit = [], [], []
  for x, y in tests:
    logits = np.asarray(logits_fn(params, x), np.float64)
    if not np.all(np.isfinite(logits)):
      return {"test_nll": math.nan, "test_ece": math.nan}  # (a NaN would fall in some bin)
    y = np.asarray(y)
    valid = y >= 0
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(logp, np.maximum(y, 0)[..., None], -1)[..., 0]
    nll.append(-picked[valid])
    conf.append(np.exp(logp.max(-1))[valid])
    hit.append((logp.argmax(-1) == y)[valid])
  nll_all = np.concatenate(nll)
  return {"test_nll": nll_all.mean(), "test_ece": ece(np.concatenate(conf), np.concatenate(hit))}


def weight_norm(params) -> dict:
  return {"weight_norm": optax.tree.norm(params)}


# Each measure's columns, in the order ``measure`` takes them (study_spec.MEASURES + these).
COLUMNS = {
  "lambda_max": ("lambda_max", "lanczos_residual"),
  "hessian_trace": ("hessian_trace", "hessian_trace_se"),
  "sharpness": ("sharpness",),
  "neighborhood_kl": ("neighborhood_kl",),
  "test_calibration": ("test_nll", "test_ece"),
  "weight_norm": ("weight_norm",),
}


def _finite(value: Any) -> float:
  v = float(value)
  return v if math.isfinite(v) else math.nan


def run_measures(named: dict[str, Callable[[], dict]], run: str = "") -> dict:
  """Calls each ``name -> () -> {column: value}``; a failure is NaN in that measure's columns,
  a warning that names the run, and its name in ``failed_measures`` (';'-joined)."""
  out: dict[str, Any] = {}
  failed = []
  for name, fn in named.items():
    try:
      out.update({k: _finite(v) for k, v in fn().items()})
    except Exception as e:  # noqa: BLE001  (one measure's failure must not lose the run)
      logging.warning("measure %s failed for run %s: %s: %s", name, run, type(e).__name__, e)
      out.update(dict.fromkeys(COLUMNS[name], math.nan))
      failed.append(name)
  out["failed_measures"] = ";".join(failed)
  return out


def eval_fns(apply, batch_stats) -> tuple[Callable, Callable]:
  """``(logits_fn(params, x), loss(params, (x, y)))`` in evaluation mode (running statistics,
  no dropout) from the harness's ``apply(params, batch_stats, x, train, key)``."""
  logits_fn = jax.jit(lambda p, x: apply(p, batch_stats, x, False, None)[0])
  return logits_fn, lambda p, b: losses.cross_entropy(logits_fn(p, b[0]), b[1])


def measure(
  apply, params, batch_stats, train: tuple, test: tuple, key, run: str = "", **overrides
) -> dict:
  """The measures of one solution. ``apply(params, batch_stats, x, train, key) -> (logits,
  batch_stats)`` (the harness's Model.apply); ``train`` and ``test`` are (x, y) splits; ``run``
  names it in the log of a failed measure."""
  s = {**SETTINGS, **overrides}
  logits_fn, loss = eval_fns(apply, batch_stats)
  fit = batches(train, s["examples"], s["batch"])
  tests = batches(test, len(test[1]), TEST_BATCH)
  k_eig, k_tr, k_kl = jax.random.split(key, 3)
  named = {
    "lambda_max": lambda: lambda_max(loss, params, fit, k_eig, iters=s["lanczos"]),
    "hessian_trace": lambda: hessian_trace(loss, params, fit, k_tr, probes=s["probes"]),
    "sharpness": lambda: sharpness(loss, params, fit, rho=s["rho"]),
    "neighborhood_kl": lambda: neighborhood_kl(
      logits_fn, params, tests, k_kl, radius=s["radius"], draws=s["draws"]
    ),
    "test_calibration": lambda: test_calibration(logits_fn, params, tests),
    "weight_norm": lambda: weight_norm(params),
  }
  return run_measures(named, run)


def hessian(loss, params, data: Sequence, key, *, iters: int, probes: int, run: str = "") -> dict:
  """The harness's Hessian metrics during training (``hessian/<column>``): the same two
  measures as a final row's, on ``data`` (batches built for the run's mesh)."""
  k_eig, k_tr, _ = jax.random.split(key, 3)
  named = {
    "lambda_max": lambda: lambda_max(loss, params, data, k_eig, iters=iters),
    "hessian_trace": lambda: hessian_trace(loss, params, data, k_tr, probes=probes),
  }
  out = run_measures(named, run)
  del out["failed_measures"]  # (logged; a metrics row holds numbers)
  return {f"hessian/{HESSIAN_NAMES.get(k, k)}": v for k, v in out.items()}


HESSIAN_NAMES = {"hessian_trace": "trace", "hessian_trace_se": "trace_se"}
