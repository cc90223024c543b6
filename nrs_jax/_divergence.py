"""Divergences between the output distributions of two models, from logits.

Every divergence here is computed from logits through ``log_softmax`` with the
inputs upcast to at least float32 (a last axis of size 1 is one binary logit,
scored as a Bernoulli distribution), so it is finite for extreme logits and for
bfloat16 inputs, and exactly 0 when the two logit arrays are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp

DivergenceFn = Callable[[jax.Array, jax.Array], jax.Array]

DIVERGENCES = ("kl", "reverse_kl", "symmetric_kl", "js")

_LOG2 = 0.6931471805599453


def _log_probs(logits: jax.Array) -> jax.Array:
  """Log-probabilities over the last axis; ``[..., 1]`` is one Bernoulli logit.

  A single logit ``z`` is the binary distribution ``(1 - sigmoid(z),
  sigmoid(z))``, which is ``softmax([0, z])``: every divergence below is then
  the Bernoulli form of the same formula.
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits = logits.astype(dtype)
  if logits.shape[-1] == 1:
    logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return jax.nn.log_softmax(logits, axis=-1)


def _kl_from_log_probs(logp: jax.Array, logq: jax.Array) -> jax.Array:
  # sum_c p_c (log p_c - log q_c); p_c = 0 contributes exactly 0 since log q_c
  # is finite for finite logits.
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """KL(p_center || p_neighbor) per example (the class axis is the last).

  ``kl``, ``reverse_kl``, ``symmetric_kl`` and ``js`` take logits of shape
  ``[..., num_classes]`` (``[..., 1]``: one binary logit) and return one value
  per leading position, in float32 or wider.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> p, q = jnp.array([[2.0, 0.0]]), jnp.array([[0.0, 2.0]])
    >>> [round(float(f(p, q)[0]), 4) for f in
    ...  (nrs_jax.kl, nrs_jax.reverse_kl, nrs_jax.symmetric_kl, nrs_jax.js)]
    [1.5232, 1.5232, 1.5232, 0.3278]
  """
  return _kl_from_log_probs(_log_probs(center_logits), _log_probs(neighbor_logits))


def reverse_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """KL(p_neighbor || p_center) per example.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> z = jnp.array([[1.0, -1.0, 0.5]])
    >>> float(nrs_jax.reverse_kl(z, z)[0])
    0.0
  """
  return _kl_from_log_probs(_log_probs(neighbor_logits), _log_probs(center_logits))


def symmetric_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """(KL(p || q) + KL(q || p)) / 2 per example, p the centre, q the neighbour.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> z = jnp.array([[1.0, -1.0, 0.5]])
    >>> float(nrs_jax.symmetric_kl(z, z)[0])
    0.0
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  # (KL(p||q) + KL(q||p)) / 2 = sum (p - q)(log p - log q) / 2
  return 0.5 * jnp.sum((jnp.exp(logp) - jnp.exp(logq)) * (logp - logq), axis=-1)


def js(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """Jensen-Shannon divergence (natural log, at most log 2) per example.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> z = jnp.array([[1.0, -1.0, 0.5]])
    >>> float(nrs_jax.js(z, z)[0])
    0.0
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  # With t = log q - log p: log p - log m = log 2 - softplus(t) and
  # log q - log m = log 2 - softplus(-t). Written in t so that equal inputs give
  # exactly 0 instead of a rounding residue of log p + log 2 - log 2.
  t = logq - logp
  same = t == 0
  t = jnp.where(same, 1.0, t)  # keeps the unused branch's gradient finite
  term = jnp.exp(logp) * (_LOG2 - jax.nn.softplus(t)) + jnp.exp(logq) * (
    _LOG2 - jax.nn.softplus(-t)
  )
  return 0.5 * jnp.sum(jnp.where(same, 0.0, term), axis=-1)


_BY_NAME: dict[str, DivergenceFn] = {
  "kl": kl,
  "reverse_kl": reverse_kl,
  "symmetric_kl": symmetric_kl,
  "js": js,
}

DivergenceLike = Union[str, DivergenceFn]


def get_divergence(divergence: DivergenceLike) -> DivergenceFn:
  """Returns the per-example divergence function for a name or a callable.

  Args:
    divergence: one of ``"kl"``, ``"reverse_kl"``, ``"symmetric_kl"``, ``"js"``,
      or a callable ``(center_logits, neighbor_logits) -> per-example values``
      (the class axis reduced away).

  Raises:
    ValueError: for an unknown name.

  Examples:
    >>> import nrs_jax
    >>> nrs_jax.get_divergence("js") is nrs_jax.js
    True
    >>> nrs_jax.DIVERGENCES
    ('kl', 'reverse_kl', 'symmetric_kl', 'js')
  """
  if callable(divergence):
    return divergence
  if isinstance(divergence, str) and divergence in _BY_NAME:
    return _BY_NAME[divergence]
  raise ValueError(
    f"divergence={divergence!r} is not supported: use one of {DIVERGENCES} or a "
    "callable (center_logits, neighbor_logits) -> per-example divergence."
  )


def output_divergence(
  center_logits: jax.Array,
  neighbor_logits: jax.Array,
  divergence: DivergenceLike = "kl",
) -> jax.Array:
  """Mean divergence between two models' output distributions over a batch.

  ``D_B(w, w') = mean over x in B of d(softmax(z_w(x)), softmax(z_w'(x)))``,
  with the class axis last and every other axis averaged over. The result is a
  float32 (or wider) scalar.

  Args:
    center_logits: logits of the centre model, shape ``[..., num_classes]``
      (``[..., 1]``: one binary logit, a Bernoulli distribution).
    neighbor_logits: logits of the neighbour, same shape.
    divergence: a name from ``DIVERGENCES`` or a callable, see
      :func:`get_divergence`.

  Returns:
    A scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> z = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(nrs_jax.output_divergence(z, z))
    0.0
    >>> round(float(nrs_jax.output_divergence(z, z[:, ::-1], "js")), 4)
    0.4449

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
  fn = get_divergence(divergence)
  return jnp.mean(fn(center_logits, neighbor_logits))
