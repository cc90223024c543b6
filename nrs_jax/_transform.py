"""``add_nrs_gradient``: NRS as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nrs_jax import _neighbors
from nrs_jax import _penalty
from nrs_jax._options import NRSOptions
from nrs_jax._options import check_nonnegative
from nrs_jax._options import check_positive_int
from nrs_jax._options import is_function
from nrs_jax._options import is_static_zero

_MaskedNode = getattr(optax, "MaskedNode", ())


def _check_not_masked(tree: Any) -> None:
  """Raises if ``tree`` holds ``optax.MaskedNode`` (we run inside optax.masked/partition)."""
  nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, _MaskedNode))
  if any(isinstance(x, _MaskedNode) for x in nodes):
    raise ValueError(
      "add_nrs_gradient got params with optax.MaskedNode leaves: it runs inside "
      "optax.masked or optax.partition, where logits_fn would see an incomplete model. "
      "Chain it outside the mask and choose the leaves with its own mask= argument: "
      "optax.chain(nrs_jax.add_nrs_gradient(alpha, radius, mask=my_mask), ...)."
    )


def _check_update(params: Any, logits_fn: Any, center_logits: Any, options: NRSOptions) -> None:
  if params is None:
    raise ValueError("add_nrs_gradient needs params: call tx.update(grads, state, params, ...).")
  _check_not_masked(params)
  if logits_fn is None:
    raise ValueError(
      "add_nrs_gradient needs logits_fn, a function params -> logits that closes "
      "over the batch: tx.update(grads, state, params, logits_fn=lambda p: "
      "model.apply(p, x)) (with nnx: optimizer.update(model, grads, "
      "logits_fn=...))."
    )
  if center_logits is not None and not options.stop_gradient_center:
    raise ValueError(
      "center_logits can only be used with stop_gradient_center=True: with a "
      "differentiable centre the penalty's gradient needs the centre's own backward "
      "pass, which logits alone cannot give. Set stop_gradient_center=True to share "
      "the centre pass, or drop center_logits (the transform recomputes it)."
    )


def _add_selected(updates, grads, selected, a, axis_name):
  """``updates + a * grads`` on the selected leaves; the others pass through unchanged."""
  treedef = jax.tree_util.tree_structure(grads)
  out = []
  for u, g, s in zip(treedef.flatten_up_to(updates), jax.tree_util.tree_leaves(grads), selected):
    if u is not None and s:
      g = g if axis_name is None else jax.lax.pmean(g, axis_name)
      u = jnp.where(a == 0, u, u + (a * g).astype(u.dtype))
    out.append(u)
  return treedef.unflatten(out)


class NRSState(NamedTuple):
  """State of :func:`add_nrs_gradient`.

  Attributes:
    count: updates so far (int32), the argument of ``alpha`` and ``radius``
      schedules.
    key: raw data (``jax.random.key_data``) of the base key. Update ``t`` draws
      from ``fold_in(key, t // resample_every)``: the key never changes, so it
      is the same on every replica and under wrappers that mask state updates.
    penalty: the raw penalty (before ``alpha``) of the last update, for
      logging; 0 before the first update and when ``alpha`` is 0.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> tx = nrs_jax.add_nrs_gradient(alpha=1.0, radius=0.1, key=0)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params, logits_fn=lambda p: jnp.eye(3) @ p["w"])
    >>> int(state.count), bool(state.penalty > 0)
    (1, True)
  """

  count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count, as optax states do)
  key: jax.Array
  penalty: jax.Array


def add_nrs_gradient(
  alpha: Union[float, jax.Array, optax.Schedule],
  radius: Union[float, jax.Array, optax.Schedule, Any],
  num_neighbors: int = 1,
  *,
  key: Union[int, jax.Array] = 0,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: Union[str, Callable] = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: Optional[int] = None,
  resample_every: int = 1,
  axis_name: Optional[str] = None,
  per_replica_neighbors: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adds ``alpha * grad(nrs_penalty)`` to the incoming gradient.

  Put it first in a chain, **before the optimiser**, as you would
  ``optax.add_decayed_weights``::

    tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05), optax.sgd(0.1))
    updates, state = tx.update(grads, state, params, logits_fn=logits_fn)

  (After the optimiser it would climb the penalty; nothing can detect that.)
  ``update`` takes the extra keyword arguments ``logits_fn`` (``params ->
  logits``, closing over the batch), ``where`` and, with a fixed centre,
  ``center_logits`` (the task pass's logits, not recomputed); it ignores others.
  Leaves outside ``mask`` pass through unchanged; inside ``optax.masked`` or
  ``optax.partition`` it raises (use ``mask=``).

  Args:
    alpha: penalty weight >= 0, or an optax schedule of the step count.
    radius: as in :func:`nrs_penalty` (a scalar or a pytree of per-leaf
      radii), or an optax schedule of the step count (its value at step 0 is
      checked; later values are traced and must stay >= 0).
    num_neighbors: K, a static int (list it in ``static_args`` of
      ``optax.inject_hyperparams``).
    key: an int seed or a PRNG key; a 0-d integer array counts as a seed.
    noise, scale, divergence, aggregation, mask, stop_gradient_center, strategy, neighbor_chunk_size, axis_name, per_replica_neighbors: see :func:`nrs_penalty`; with ``axis_name``, pass the task gradients already ``pmean``-ed.
    resample_every: new neighbours every this many updates (static). For
      gradient accumulation over k micro-batches, chain this transform outside
      ``optax.MultiSteps`` with ``resample_every=k``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NRSState`.

  Raises:
    ValueError: at construction for invalid options; in ``init``/``update`` for
      params that do not fit ``mask`` or ``radius``, or missing arguments.

  .. note::
    With a differentiable centre the centre's forward and backward pass is
    recomputed here ((2 + K) / (1 + K) the work of :func:`make_nrs_loss`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nrs_jax
    >>> x, params = jnp.ones((8, 3)), {"w": jnp.zeros((3, 4))}
    >>> logits_fn = lambda p: x @ p["w"]
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(alpha=1.0, radius=0.05),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)  # the task gradient
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn)
    >>> int(state[0].count)
    1

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
  check_nonnegative("alpha", alpha, schedule=True)
  check_nonnegative("radius", radius, tree=True, schedule=True)
  options = NRSOptions.of(locals())
  if not isinstance(resample_every, jax.core.Tracer):  # traced under inject_hyperparams
    resample_every = check_positive_int("resample_every", resample_every)
  # The implementation of the base key (its data is made in init: no backend before).
  impl = None if isinstance(key, (int, np.integer)) else _neighbors.key_impl(key)
  alpha_is_zero = is_static_zero(alpha)
  radius_at = radius if is_function(radius) else lambda _: radius

  def init_fn(params):
    _check_not_masked(params)
    if jax.tree_util.tree_leaves(params):  # (optax.tree_utils.tree_map_params inits with none)
      _neighbors.Sampler(params, radius=radius_at(0), noise=noise, scale=scale, mask=mask)
    return NRSState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(_neighbors.as_key(key)),
      penalty=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates, state, params=None, *, logits_fn=None, center_logits=None, where=None, **extra_args
  ):
    del extra_args
    _check_update(params, logits_fn, center_logits, options)
    count = optax.safe_int32_increment(state.count)
    if alpha_is_zero:
      return updates, NRSState(count=count, key=state.key, penalty=jnp.zeros([], jnp.float32))
    base = jax.random.wrap_key_data(state.key, impl=impl)
    step_key = jax.random.fold_in(base, state.count // resample_every)
    a = alpha(state.count) if callable(alpha) else alpha
    selected = _neighbors.perturbed_leaf_mask(params, options.mask)

    kw = dict(axis_name=axis_name, per_replica_neighbors=per_replica_neighbors, where=where)
    penalty = lambda p: _penalty.penalty(
      options, logits_fn, p, step_key, radius_at(state.count), center_logits=center_logits, **kw
    )
    value, grads = jax.value_and_grad(penalty, allow_int=True)(params)
    updates = _add_selected(updates, grads, selected, a, axis_name)
    logged = jnp.where(a == 0, 0.0, value).astype(jnp.float32)
    return updates, NRSState(count=count, key=state.key, penalty=logged)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
