"""Divergences between two models' output distributions, from logits ``[..., C]``.

``C == 1`` is one binary logit (the Bernoulli ``softmax([0, z])``). Logits are
upcast to at least float32; each divergence returns one value per leading
position: finite for extreme logits and bfloat16 inputs, exactly 0 for equal ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

DivergenceFn = Callable[[jax.Array, jax.Array], jax.Array]


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
    >>> import jax.numpy as jnp, nrs_jax
    >>> p, q = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, -1.0]])
    >>> [round(float(f(p, q)[0]), 4) for f in
    ...  (nrs_jax.kl, nrs_jax.reverse_kl, nrs_jax.symmetric_kl, nrs_jax.js)]
    [0.742, 0.9177, 0.8299, 0.1879]
  """
  return _kl(_log_probs(center_logits), _log_probs(neighbor_logits))


def reverse_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """KL(p_neighbor || p_center) per position.

  >>> p, q = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, -1.0]])
  >>> round(float(reverse_kl(p, q)[0]), 4), float(reverse_kl(p, p)[0])  # exactly 0 at equal logits
  (0.9177, 0.0)
  """
  return _kl(_log_probs(neighbor_logits), _log_probs(center_logits))


def symmetric_kl(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """(KL(p || q) + KL(q || p)) / 2 per position.

  >>> p, q = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, -1.0]])
  >>> round(float(symmetric_kl(p, q)[0]), 4), float(symmetric_kl(p, p)[0])  # exactly 0 at equal logits
  (0.8299, 0.0)
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  return 0.5 * jnp.sum((jnp.exp(logp) - jnp.exp(logq)) * (logp - logq), axis=-1)


def js(center_logits: jax.Array, neighbor_logits: jax.Array) -> jax.Array:
  """Jensen-Shannon divergence (natural log, at most log 2) per position.

  >>> p, q = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, -1.0]])
  >>> round(float(js(p, q)[0]), 4), float(js(p, p)[0])  # exactly 0 at equal logits
  (0.1879, 0.0)
  """
  logp, logq = _log_probs(center_logits), _log_probs(neighbor_logits)
  # With t = log q - log p: log p - log m = log 2 - softplus(t), log q - log m =
  # log 2 - softplus(-t); in t, equal inputs give exactly 0 (no rounding residue).
  t = logq - logp
  same = t == 0
  t = jnp.where(same, 1.0, t)  # keeps the unused branch's gradient finite
  half = lambda lp, s: jnp.exp(lp) * (math.log(2.0) - jax.nn.softplus(s))
  return 0.5 * jnp.sum(jnp.where(same, 0.0, half(logp, t) + half(logq, -t)), axis=-1)


_BY_NAME: dict[str, DivergenceFn] = dict(
  kl=kl, reverse_kl=reverse_kl, symmetric_kl=symmetric_kl, js=js
)
DIVERGENCES = tuple(_BY_NAME)  # the names ``divergence=`` accepts


def get_divergence(divergence: str | DivergenceFn) -> DivergenceFn:
  """The per-position divergence named in ``DIVERGENCES``, or a given callable
  ``(center_logits, neighbor_logits) -> values`` (class axis reduced).

  Raises:
    ValueError: for a name not in ``DIVERGENCES`` that is not a callable.

  Examples:
    >>> p, q = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, -1.0]])
    >>> get_divergence("js") is js, round(float(get_divergence("js")(p, q)[0]), 4)
    (True, 0.1879)
  """
  if callable(divergence):
    return divergence
  if isinstance(divergence, str) and divergence in _BY_NAME:
    return _BY_NAME[divergence]
  raise ValueError(
    f"divergence={divergence!r} is not supported: use one of {DIVERGENCES} or a "
    "callable (center_logits, neighbor_logits) -> per-example divergence."
  )


def independent_labels(divergence: DivergenceFn) -> DivergenceFn:
  """``divergence`` for ``[..., L]`` logits read as L independent binary labels: the sum over
  labels of each one's Bernoulli divergence (for the KL forms, that of their joint law).

  >>> p, q = jnp.array([[1.0, -2.0]]), jnp.array([[0.5, 0.0]])
  >>> bool(independent_labels(kl)(p, q)[0] == kl(p[:, :1], q[:, :1])[0] + kl(p[:, 1:], q[:, 1:])[0])
  True
  """
  return lambda center, neighbor: jnp.sum(divergence(center[..., None], neighbor[..., None]), -1)


def output_divergence(
  center_logits: jax.Array, neighbor_logits: jax.Array, divergence: str | DivergenceFn = "kl"
) -> jax.Array:
  """``D_B(w, w')``: the divergence averaged over every leading axis (a scalar).

  Raises:
    ValueError: for a ``divergence`` name not in ``DIVERGENCES`` (and not a callable).

  Examples:
    >>> import jax.numpy as jnp, nrs_jax
    >>> z = jnp.array([[2.0, 0.0, -1.0]])
    >>> float(nrs_jax.output_divergence(z, z)), round(float(nrs_jax.output_divergence(
    ...     z, z[:, ::-1], "js")), 4)
    (0.0, 0.4449)
  """
  return jnp.mean(get_divergence(divergence)(center_logits, neighbor_logits))
