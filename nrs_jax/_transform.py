"""``add_nrs_gradient``: NRS as an Optax gradient transformation."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nrs_jax import _neighbors
from nrs_jax import _options
from nrs_jax import _penalty

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


def _check_update(params: Any, logits_fn: Any, center_logits: Any, options: Any) -> None:
  if params is None:
    raise ValueError("add_nrs_gradient needs params: call tx.update(grads, state, params, ...).")
  _check_not_masked(params)
  if logits_fn is None:
    raise ValueError(
      "add_nrs_gradient needs logits_fn, params -> logits closing over the batch: tx.update("
      "grads, state, params, logits_fn=lambda p: model.apply(p, x)); Flax NNX: optimizer."
      "update(model, grads, logits_fn=...); Linen: nrs_jax.integrations.linen.NRSTrainState"
      "'s state.apply_gradients(grads=grads, logits_fn=...) (Linen's own TrainState cannot "
      "pass it)."
    )
  if center_logits is not None and not options.stop_gradient_center:
    raise ValueError(
      "center_logits needs stop_gradient_center=True: a differentiable centre needs its own "
      "backward pass. Set stop_gradient_center=True, or drop center_logits (recomputed)."
    )


def _inside_multisteps() -> bool:
  """Whether an ``optax.MultiSteps`` update is on the call stack (read at trace time)."""
  frame: Any = sys._getframe(1)
  while frame and not (
    "optax" in frame.f_code.co_filename and "MultiSteps." in frame.f_code.co_qualname
  ):
    frame = frame.f_back
  return frame is not None


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
  """State of :func:`add_nrs_gradient`: ``count`` (int32, the schedules' argument), ``key``
  (raw base key data, never changed: update ``t`` draws from ``fold_in(key, t //
  resample_every)``) and ``penalty`` (the last raw penalty, for logging; 0 when ``alpha`` is).

  >>> x, params = jnp.ones((2, 3)), {"w": jnp.zeros((3, 4))}
  >>> tx = add_nrs_gradient(alpha=1.0, radius=0.1, key=0)
  >>> _, state = tx.update(params, tx.init(params), params, logits_fn=lambda p: x @ p["w"])
  >>> want = _penalty.nrs_penalty(lambda p: x @ p["w"], params, jax.random.fold_in(jax.random.key(0), 0), radius=0.1)
  >>> int(state.count), bool(jnp.isclose(state.penalty, want))  # update t: fold_in(key, t)
  (1, True)
  """

  count: jax.Array  # type: ignore[assignment]  # (shadows tuple.count, as optax states do)
  key: jax.Array
  penalty: jax.Array


def add_nrs_gradient(
  alpha: float | jax.Array | optax.Schedule,
  radius: Any,
  num_neighbors: int = 1,
  *,
  key: int | jax.Array = 0,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: str | Callable = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  multilabel: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: int | None = None,
  resample_every: int = 1,
  axis_name: str | None = None,
  per_replica_neighbors: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adds ``alpha * grad(nrs_penalty)`` to the incoming gradient: chain it first, **before
  the optimiser** (after it, it would climb the penalty).

  ``update`` takes the extra arguments ``logits_fn`` (``params -> logits``, closing
  over the batch: inputs only, so an unlabeled batch will do, whatever batch the
  incoming gradient came from), ``where`` and, with a fixed centre, ``center_logits``. Leaves
  outside ``mask`` pass through; inside ``optax.masked`` / ``partition`` it raises.

  Args:
    alpha: penalty weight >= 0, or an optax schedule of the step count.
    radius: as in :func:`nrs_penalty`, or a schedule (checked at step 0).
    num_neighbors: K, a static int (``static_args`` of ``inject_hyperparams``).
    key: an int seed or a PRNG key; a 0-d integer array counts as a seed.
    noise, scale, divergence, aggregation, mask, stop_gradient_center, multilabel, strategy, neighbor_chunk_size, axis_name, per_replica_neighbors: see :func:`nrs_penalty`; with ``axis_name``, pass the task gradients already ``pmean``-ed.
    resample_every: new neighbours every this many updates (static). For gradient
      accumulation over k micro-batches chain it *outside* ``optax.MultiSteps`` with
      ``resample_every=k`` (inside, it warns: the penalty would be the last micro-batch's).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NRSState`.

  Raises:
    ValueError: at construction for an invalid option (``alpha`` or ``radius`` not a finite
      number >= 0, e.g. a string; an unknown choice; a non-int ``num_neighbors``); at
      ``init`` / ``update`` (trace time) for params with ``optax.MaskedNode`` leaves or no
      float leaf, a missing ``params`` or ``logits_fn``, a mask or radius tree that does not
      fit params, or logits that are not ``[..., C]`` (a tuple, a scalar, a 1-d vector).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, nrs_jax
    >>> x, params = jnp.ones((8, 3)), {"w": jnp.zeros((3, 4))}
    >>> logits_fn = lambda p: x @ p["w"]
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(alpha=1.0, radius=0.2),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)  # the task gradient
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn)
    >>> key0 = jax.random.fold_in(jax.random.key(0), 0)  # update 0's neighbours
    >>> d = nrs_jax.sample_perturbations(params, key0, radius=0.2).deltas[0][0]
    >>> kl = jnp.mean(jnp.sum(0.25 * (jnp.log(0.25) - jax.nn.log_softmax(x @ d)), -1))
    >>> int(state[0].count), bool(jnp.isclose(state[0].penalty, kl, rtol=1e-4))  # raw penalty
    (1, True)
  """
  _options.check_nonnegative("alpha", alpha, schedule=True)
  _options.check_nonnegative("radius", radius, tree=True, schedule=True)
  options = _options.NRSOptions.of(locals())
  if not isinstance(resample_every, jax.core.Tracer):  # traced under inject_hyperparams
    resample_every = _options.check_positive_int("resample_every", resample_every)
  # The implementation of the base key (its data is made in init: no backend before).
  impl = None if isinstance(key, (int, np.integer)) else jax.random.key_impl(_neighbors.as_key(key))
  alpha_is_zero = _options.is_static_zero(alpha)
  radius_at = radius if _options.is_function(radius) else lambda _: radius

  def init_fn(params):
    _check_not_masked(params)
    if jax.tree_util.tree_leaves(params):  # (optax.tree_utils.tree_map_params inits with none)
      _neighbors.Sampler(params, radius=radius_at(0), noise=noise, scale=scale, mask=mask)
    zero = jnp.zeros([], jnp.float32)
    return NRSState(jnp.zeros([], jnp.int32), jax.random.key_data(_neighbors.as_key(key)), zero)

  def update_fn(
    updates, state, params=None, *, logits_fn=None, center_logits=None, where=None, **extra_args
  ):
    del extra_args
    _check_update(params, logits_fn, center_logits, options)
    if _inside_multisteps():
      warnings.warn(
        "add_nrs_gradient runs inside optax.MultiSteps: its penalty is the last micro-batch's. "
        "For the accumulated batch's chain it outside, new neighbours every k micro-batches: "
        "optax.chain(nrs_jax.add_nrs_gradient(alpha, radius, resample_every=k), "
        "optax.MultiSteps(opt, k).gradient_transformation()).",
        stacklevel=2,
      )
    count = optax.safe_int32_increment(state.count)
    if alpha_is_zero:
      return updates, NRSState(count=count, key=state.key, penalty=jnp.zeros([], jnp.float32))
    base = jax.random.wrap_key_data(state.key, impl=impl)
    step_key = jax.random.fold_in(base, state.count // resample_every)
    a = alpha(state.count) if callable(alpha) else alpha
    # A callable mask is called once per update: the penalty gets what it resolved to.
    opts = options
    if options.mask is not None and _options.is_function(options.mask):
      resolved = _neighbors.resolve_mask(params, options.mask)
      treedef = jax.tree_util.tree_structure(params)
      opts = dataclasses.replace(options, mask=jax.tree_util.tree_unflatten(treedef, resolved))
    selected = _neighbors.perturbed_leaf_mask(params, opts.mask)
    r, kw = radius_at(state.count), {"center_logits": center_logits, "where": where}
    penalty = lambda p: _penalty.penalty(
      opts, logits_fn, p, step_key, r, per_replica_neighbors, axis_name=axis_name, **kw
    )
    value, grads = jax.value_and_grad(penalty, allow_int=True)(params)
    updates = _add_selected(updates, grads, selected, a, axis_name)
    logged = jnp.where(a == 0, 0.0, value).astype(jnp.float32)
    return updates, NRSState(count=count, key=state.key, penalty=logged)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
