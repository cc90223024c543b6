"""Sharpness measures: average-case, the NRS divergence, and worst-case (SAM)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nrs_jax import _neighbors
from nrs_jax import _options
from nrs_jax import _penalty
from nrs_jax.flatness import _data


def average_sharpness(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  radius: float,
  num_samples: int = 16,
  noise: str = "gaussian",
  scale: str = "absolute",
  mask: Any = None,
) -> dict[str, jax.Array]:
  """Expected loss increase under random perturbations of radius ``radius``.

  ``E_delta[L(w + delta)] - L(w)``, ``delta`` drawn as in NRS (same noise,
  scale and mask options, see :func:`nrs_jax.sample_perturbations`).

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: pytree.
    data: one batch or a list of batches.
    key: PRNG key of the perturbations.
    radius, noise, scale, mask: as in :func:`nrs_jax.sample_perturbations`.
    num_samples: perturbations averaged.

  Returns:
    A dict: ``"sharpness/average"`` the mean increase,
    ``"sharpness/average_stderr"`` its standard error, ``"loss"`` ``L(w)``.

  Raises:
    ValueError: for a negative or non-finite ``radius``, an invalid option, or a
      ``loss_fn`` that does not return a scalar.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)  # E[increase] = r^2 tr(H) / 2
    >>> out = flatness.average_sharpness(loss, jnp.zeros(100), jnp.ones(100), jax.random.key(0),
    ...                                  radius=0.1, num_samples=64)
    >>> bool(abs(out["sharpness/average"] - 0.5) < 0.05)  # the expectation 0.5, 5 s.e. wide
    True
  """
  _options.check_nonnegative("radius", radius)
  batches, weights = _data.as_batches(data)
  _data.check_scalar_loss(loss_fn, params, batches[0])

  @jax.jit
  def increases(p, batch, k):
    perts = _neighbors.sample_perturbations(
      p, k, radius=radius, num_neighbors=num_samples, noise=noise, scale=scale, mask=mask
    )
    base = loss_fn(p, batch)
    losses = jax.lax.map(
      lambda ds: loss_fn(_neighbors.apply_perturbation(p, ds), batch),
      perts.deltas,
      batch_size=min(num_samples, 16),
    )
    return base, losses - base

  base, inc = 0.0, np.zeros(num_samples)
  for b, w in zip(batches, weights):
    lb, ib = increases(params, b, key)  # same perturbations for every batch
    base += w * float(lb)
    inc += w * np.asarray(ib, np.float64)
  return {
    "sharpness/average": jnp.asarray(inc.mean()),
    "sharpness/average_stderr": jnp.asarray(inc.std(ddof=1) / np.sqrt(num_samples))
    if num_samples > 1
    else jnp.asarray(0.0),
    "loss": jnp.asarray(base),
  }


def nrs_divergence(
  apply_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  radius: float,
  num_neighbors: int = 16,
  **options: Any,
) -> dict[str, jax.Array]:
  """The NRS penalty itself at radius ``radius``, averaged over ``data``.

  Args:
    apply_fn: ``(params, batch) -> logits``.
    params, data, key: as elsewhere in this module.
    radius: the radius.
    num_neighbors: K neighbours (more gives a less noisy estimate).
    **options: further :func:`nrs_jax.nrs_penalty` options (noise, scale,
      divergence, aggregation, mask, strategy).

  Returns:
    ``{"sharpness/nrs_divergence": value}``.

  Examples:
    >>> import jax, jax.numpy as jnp, nrs_jax
    >>> from nrs_jax import flatness
    >>> apply_fn = lambda p, x: x @ p
    >>> out = flatness.nrs_divergence(apply_fn, jnp.ones((3, 4)), jnp.eye(3), jax.random.key(0),
    ...                               radius=0.1, num_neighbors=4)
    >>> want = nrs_jax.nrs_penalty(lambda p: jnp.eye(3) @ p, jnp.ones((3, 4)), jax.random.key(0),
    ...                            radius=0.1, num_neighbors=4)  # one batch: the penalty itself
    >>> bool(jnp.isclose(out["sharpness/nrs_divergence"], want, rtol=1e-6))
    True
  """
  fn = lambda p, b: _penalty.nrs_penalty(
    lambda q: apply_fn(q, b), p, key, radius=radius, num_neighbors=num_neighbors, **options
  )
  return {"sharpness/nrs_divergence": jnp.asarray(_data.averaged(fn, data)(params))}


def worst_case_sharpness(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  *,
  rho: float,
) -> dict[str, jax.Array]:
  """Loss increase after one ascent step of length ``rho`` (SAM's sharpness).

  ``L(w + rho * g / ||g||) - L(w)`` with ``g`` the gradient on ``data``.

  Returns:
    ``{"sharpness/worst_case": increase, "loss": L(w)}``.

  Raises:
    ValueError: for a negative or non-finite ``rho``, an invalid option, or a ``loss_fn``
      that does not return a scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> out = flatness.worst_case_sharpness(loss, jnp.ones(2), jnp.array([1.0, 1.0]), rho=0.1)
    >>> round(float(out["sharpness/worst_case"]), 4)  # ||w + 0.1 g/|g| ||^2 / 2 - 1
    0.1464
  """
  _options.check_nonnegative("rho", rho)
  batches, weights = _data.as_batches(data)
  _data.check_scalar_loss(loss_fn, params, batches[0])
  vg = jax.jit(jax.value_and_grad(loss_fn))
  base, grad = 0.0, None
  for b, w in zip(batches, weights):
    v, g = vg(params, b)
    base += w * float(v)
    g = jax.tree_util.tree_map(lambda x: w * x, g)
    grad = g if grad is None else jax.tree_util.tree_map(jnp.add, grad, g)
  norm = optax.tree_utils.tree_norm(grad)
  step = jax.tree_util.tree_map(lambda p, g: p + rho * g / jnp.maximum(norm, 1e-12), params, grad)
  up = _data.averaged(loss_fn, data)(step)
  return {"sharpness/worst_case": jnp.asarray(up - base), "loss": jnp.asarray(base)}
