"""Filter-normalised loss landscapes (Li et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax.flatness import _data


def filter_normalized_direction(params: Any, key: jax.Array) -> Any:
  """A random direction with each filter rescaled to the norm of the weights' filter.

  Li et al. (2018): ``d_f <- d_f / ||d_f|| * ||w_f||`` for each output unit ``f``
  (last axis) of every leaf with 2 or more dimensions; 0-d and 1-d leaves
  (biases, normalisation scales) get a zero direction, as in the paper.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> params = {"w": jnp.full((3, 2), 2.0), "b": jnp.ones(2)}
    >>> d = flatness.filter_normalized_direction(params, jax.random.key(0))
    >>> [round(float(x), 4) for x in jnp.linalg.norm(d["w"], axis=0)], float(jnp.abs(d["b"]).sum())
    ([3.4641, 3.4641], 0.0)
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for x, k in zip(leaves, keys):
    if jnp.ndim(x) < 2 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      out.append(jnp.zeros_like(x))
      continue
    d = jax.random.normal(k, x.shape, jnp.float32)
    axes = tuple(range(x.ndim - 1))
    dn = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
    wn = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))
    out.append((d / jnp.maximum(dn, 1e-12) * wn).astype(x.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def _landscape_fn(loss_fn, params, data):
  batches, weights = _data.as_batches(data)
  _data.check_scalar_loss(loss_fn, params, batches[0])

  @jax.jit
  def at(a, b, d1, d2, batch):
    p = jax.tree_util.tree_map(lambda w, x, y: w + a * x + b * y, params, d1, d2)
    return loss_fn(p, batch)

  def value(a, b, d1, d2):
    return sum(w * float(at(a, b, d1, d2, bt)) for bt, w in zip(batches, weights))

  return value


def loss_landscape_1d(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  alphas: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 21)),
  direction: Optional[Any] = None,
) -> dict[str, jax.Array]:
  """Loss along ``w + alpha * d`` for a filter-normalised random ``d``.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: pytree (the centre, ``alpha = 0``).
    data: one batch or a list of batches.
    key: PRNG key of the direction (unused with ``direction``).
    alphas: the steps along the direction.
    direction: a pytree like ``params``; default a
      :func:`filter_normalized_direction`.

  Returns:
    ``{"alphas": [n], "losses": [n]}``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: jnp.sum((p - b) ** 2)
    >>> out = flatness.loss_landscape_1d(loss, jnp.zeros(2), jnp.zeros(2), jax.random.key(0),
    ...                                  alphas=[-1.0, 0.0, 1.0], direction=jnp.ones(2))
    >>> [float(x) for x in out["losses"]]
    [2.0, 0.0, 2.0]
  """
  d = filter_normalized_direction(params, key) if direction is None else direction
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  f = _landscape_fn(loss_fn, params, data)
  grid = np.asarray(alphas, np.float64)
  return {
    "alphas": jnp.asarray(grid),
    "losses": jnp.asarray([f(a, 0.0, d, zero) for a in grid]),
  }


def loss_landscape_2d(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  alphas: Sequence[float] = tuple(np.linspace(-1.0, 1.0, 11)),
  betas: Optional[Sequence[float]] = None,
) -> dict[str, jax.Array]:
  """Loss on the plane ``w + alpha * d1 + beta * d2`` (two filter-normalised directions).

  Args:
    loss_fn, params, data: as in :func:`loss_landscape_1d`.
    key: PRNG key of the two directions.
    alphas: steps along ``d1``.
    betas: steps along ``d2`` (default: ``alphas``).

  Returns:
    ``{"alphas": [n], "betas": [m], "losses": [n, m]}``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> params = {"w": jnp.ones((4, 3))}
    >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    >>> out = flatness.loss_landscape_2d(loss, params, jnp.eye(4), jax.random.key(0),
    ...                                  alphas=[-0.5, 0.0, 0.5])
    >>> out["losses"].shape, float(out["losses"][1, 1])  # the centre: the loss at params, 1
    ((3, 3), 1.0)
  """
  k1, k2 = jax.random.split(key)
  d1 = filter_normalized_direction(params, k1)
  d2 = filter_normalized_direction(params, k2)
  f = _landscape_fn(loss_fn, params, data)
  a_grid = np.asarray(alphas, np.float64)
  b_grid = a_grid if betas is None else np.asarray(betas, np.float64)
  losses = np.array([[f(a, b, d1, d2) for b in b_grid] for a in a_grid])
  return {
    "alphas": jnp.asarray(a_grid),
    "betas": jnp.asarray(b_grid),
    "losses": jnp.asarray(losses),
  }
