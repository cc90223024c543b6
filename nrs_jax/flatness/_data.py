"""Shared plumbing: data as one batch or a list of batches, flat parameter views."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from nrs_jax import _neighbors


def as_batches(data: Any) -> tuple[list, np.ndarray]:
  """Returns (batches, weights): a list is a sequence of batches, anything else one batch.

  Weights are proportional to each batch's size (the leading dimension of its
  first array leaf) and sum to 1, so averages over batches equal the average
  over their concatenation for mean losses.
  """
  batches = list(data) if isinstance(data, list) else [data]
  if not batches:
    raise ValueError("data is empty: pass one batch or a non-empty list of batches.")
  sizes = []
  for b in batches:
    leaves = [x for x in jax.tree_util.tree_leaves(b) if jnp.ndim(x) > 0]
    sizes.append(int(jnp.shape(leaves[0])[0]) if leaves else 1)
  w = np.asarray(sizes, np.float64)
  return batches, w / w.sum()


def check_scalar_loss(loss_fn: Callable, params: Any, batch: Any) -> None:
  out = jax.eval_shape(loss_fn, params, batch)
  if getattr(out, "shape", None) != ():
    raise ValueError(
      f"loss_fn must return a scalar; got shape {getattr(out, 'shape', type(out))}. "
      "Reduce it (e.g. .mean()) over the batch."
    )


class FlatView:
  """The selected leaves of ``params`` as one flat vector, and back."""

  def __init__(self, params: Any, mask: Any = None):
    self.params = params
    self.leaves, self.treedef = jax.tree_util.tree_flatten(params)
    if any(isinstance(m, np.ndarray) for m in _neighbors.resolve_mask(params, mask)):
      raise ValueError(
        "mask selects some elements of a leaf (a bool array); the flatness toolkit's mask "
        "selects whole leaves: give each leaf one Python bool."
      )
    self.selected = _neighbors.perturbed_leaf_mask(params, mask)
    sel = [x for x, s in zip(self.leaves, self.selected) if s]
    self.x0, self._unravel = ravel_pytree(sel)
    self.size = int(self.x0.size)
    self.dtype = self.x0.dtype

  def params_at(self, flat: jax.Array) -> Any:
    """params with the selected leaves replaced by ``flat``."""
    sel = iter(self._unravel(flat))
    leaves = [next(sel) if s else x for x, s in zip(self.leaves, self.selected)]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)

  def to_tree(self, flat: jax.Array) -> Any:
    """A pytree like params: ``flat`` on the selected leaves, zeros elsewhere."""
    sel = iter(self._unravel(jnp.asarray(flat, self.dtype)))
    leaves = [next(sel) if s else jnp.zeros_like(x) for x, s in zip(self.leaves, self.selected)]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)

  def from_tree(self, tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return ravel_pytree([x for x, s in zip(leaves, self.selected) if s])[0]


def hvp_operator(
  loss_fn: Callable, view: FlatView, data: Any
) -> Callable[[np.ndarray], np.ndarray]:
  """A host function v -> H v (float64 numpy) averaged over the batches of ``data``."""
  batches, weights = as_batches(data)
  check_scalar_loss(loss_fn, view.params, batches[0])

  @jax.jit
  def one(v, batch):
    f = lambda x: loss_fn(view.params_at(x), batch)
    return jax.jvp(jax.grad(f), (view.x0,), (v,))[1]

  def matvec(v: np.ndarray) -> np.ndarray:
    x = jnp.asarray(v, view.dtype)
    out = np.zeros(view.size, np.float64)
    for b, w in zip(batches, weights):
      out += w * np.asarray(one(x, b), np.float64)
    return out

  return matvec


def averaged(fn: Callable[[Any, Any], jax.Array], data: Any) -> Callable[[Any], float]:
  """params -> batch-size-weighted mean over the batches of fn(params, batch)."""
  batches, weights = as_batches(data)
  jfn = jax.jit(fn)

  def run(params):
    return float(sum(w * float(jfn(params, b)) for b, w in zip(batches, weights)))

  return run
