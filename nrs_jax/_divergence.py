"""Divergences between the output distributions of two models, from logits.

Each takes logits ``[..., num_classes]`` (``[..., 1]``: one binary logit, the
Bernoulli distribution ``softmax([0, z])``), upcast to at least float32 and
passed through ``log_softmax``, and returns one value per leading position: finite
for extreme logits and bfloat16 inputs, exactly 0 for equal inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import optax

DivergenceFn = Callable[[jax.Array, jax.Array], jax.Array]
DivergenceLike = Union[str, DivergenceFn]
DIVERGENCES = ("kl", "reverse_kl", "symmetric_kl", "js")
_LOG2 = 0.6931471805599453


def _log_probs(logits: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if logits.shape[-1] == 1:
    logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return jax.nn.log_softmax(logits, axis=-1)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  return optax.losses.kl_divergence_with_log_targets(logq, logp)  # KL(p || q)


def kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """KL(p_center || p_neighbor) per position (the class axis is the last).

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> p, q = jnp.array([[2.0, 0.0]]), jnp.array([[0.0, 2.0]])
    >>> [round(float(f(p, q)[0]), 4) for f in
    ...  (nrs_jax.kl, nrs_jax.reverse_kl, nrs_jax.symmetric_kl, nrs_jax.js)]
    [1.5232, 1.5232, 1.5232, 0.3278]
  """
  return _kl(_log_probs(center_logits), _log_probs(neighbor_logits))


def reverse_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """KL(p_neighbor || p_center) per position.

  Examples:
    >>> import jax.numpy as jnp, nrs_jax
    >>> float(nrs_jax.reverse_kl(jnp.ones((1, 3)), jnp.ones((1, 3)))[0])
    0.0
  """
  return _kl(_log_probs(neighbor_logits), _log_probs(center_logits))


def symmetric_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """(KL(p || q) + KL(q || p)) / 2 per position.

  Examples:
    >>> import jax.numpy as jnp, nrs_jax
    >>> float(nrs_jax.symmetric_kl(jnp.ones((1, 3)), jnp.ones((1, 3)))[0])
    0.0
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  return 0.5 * jnp.sum((jnp.exp(logp) - jnp.exp(logq)) * (logp - logq), axis=-1)


def js(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """Jensen-Shannon divergence (natural log, at most log 2) per position.

  Examples:
    >>> import jax.numpy as jnp, nrs_jax
    >>> float(nrs_jax.js(jnp.ones((1, 3)), jnp.ones((1, 3)))[0])
    0.0
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  # With t = log q - log p: log p - log m = log 2 - softplus(t), log q - log m =
  # log 2 - softplus(-t); in t, equal inputs give exactly 0 (no rounding residue).
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


def get_divergence(divergence: DivergenceLike) -> DivergenceFn:
  """The per-position divergence for a name in ``DIVERGENCES`` or a callable.

  A callable takes ``(center_logits, neighbor_logits)`` and returns values with
  the class axis reduced away.

  Raises:
    ValueError: for an unknown name.

  Examples:
    >>> import nrs_jax
    >>> nrs_jax.get_divergence("js") is nrs_jax.js
    True
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
  center_logits: jax.Array, neighbor_logits: jax.Array, divergence: DivergenceLike = "kl"
) -> jax.Array:
  """``D_B(w, w')``: the divergence averaged over every leading axis (a scalar).

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
  return jnp.mean(get_divergence(divergence)(center_logits, neighbor_logits))
