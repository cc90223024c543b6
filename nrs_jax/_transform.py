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
from nrs_jax import _random
from nrs_jax._options import NRSOptions
from nrs_jax._options import check_nonnegative
from nrs_jax._options import check_positive_int
from nrs_jax._options import is_static_zero


class NRSState(NamedTuple):
  """State of :func:`add_nrs_gradient`.

  Attributes:
    count: number of updates so far (int32), the argument of an ``alpha``
      schedule.
    key: raw PRNG key data (``jax.random.key_data``) of the base key. The
      neighbours of update ``t`` are drawn from ``fold_in(key, t //
      resample_every)``: successive steps draw different neighbours, a seed
      reproduces a run, and the key needs no update (so it is identical on
      every replica and inside any wrapper that masks state updates).
    penalty: the raw NRS penalty (before ``alpha``) of the last update, a
      float32 scalar for logging; 0 before the first update and when ``alpha``
      is 0.

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
  radius: Union[float, jax.Array],
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

  It adds a *gradient* to a gradient. Chained after the optimiser
  (``optax.chain(optax.sgd(0.1), add_nrs_gradient(...))``) it adds ``alpha *
  grad`` to the already-scaled, negated *update*: the penalty's gradient is
  then applied with the wrong sign and no learning rate, and training climbs
  the penalty. Nothing can detect that order without looking at values, so
  the library does not check it.

  ``logits_fn(params) -> logits`` is an extra keyword argument of ``update``; it
  closes over the batch (and dropout rng, BatchNorm statistics) and returns
  logits, not probabilities (see :func:`nrs_penalty`). ``where=`` (a boolean
  mask over the logits' leading dims, e.g. padding tokens) is another. With
  ``stop_gradient_center=True`` you may also pass ``center_logits=``, the
  logits your task-loss pass already computed at ``params``: the centre is then
  not recomputed and an update costs exactly the K neighbour passes, the same
  work as :func:`make_nrs_loss`. Unknown extra keyword arguments are ignored, so
  the transform composes with other extra-args transforms in ``optax.chain``.

  Args:
    alpha: penalty weight >= 0, or an optax schedule of the step count.
    radius: neighbourhood radius >= 0.
    num_neighbors: K, a static int (with ``optax.inject_hyperparams`` list it
      in ``static_args``).
    key: an int seed or a PRNG key; a 0-d integer array counts as a seed.
    noise, scale, divergence, aggregation, mask, stop_gradient_center, strategy, neighbor_chunk_size: as
      in :func:`nrs_penalty`.
    resample_every: draw new neighbours every this many updates (static int).
      For gradient accumulation over k micro-batches, put this transform
      *outside* ``optax.MultiSteps`` with ``resample_every=k``: every
      micro-batch then sees the same neighbours and the accumulated update
      equals the large batch's (mean aggregation).
    axis_name: under ``pmap`` / ``shard_map`` with the batch split over this
      axis: the penalty gradient is the global-batch one (``pmean`` over the
      axis), so pass the task gradients already ``pmean``-ed.
    per_replica_neighbors: see :func:`nrs_penalty`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NRSState`;
    ``state.penalty`` is the last update's raw penalty, for logging.

  Raises:
    ValueError: at construction for invalid options; in ``update`` when
      ``params`` or ``logits_fn`` is missing, or ``center_logits`` is given with
      a differentiable centre.

  .. note::
    With the default differentiable centre, the centre forward and backward
    pass is recomputed here: the penalty's centre term needs a backward pass
    with its own cotangent, and a gradient transformation receives the task
    gradient already computed. That is one extra pass, (2 + K) / (1 + K) times
    the work of :func:`make_nrs_loss`, which shares it. With
    ``stop_gradient_center=True`` and ``center_logits=`` nothing is recomputed.
    Each update costs about K extra forward/backward passes; see
    :func:`nrs_penalty` for the memory of K neighbours, dropout and BatchNorm.
    Inside ``optax.MultiSteps`` the inner chain runs on every micro-step but
    only the last one's result is kept, so the penalty would cover only the
    last micro-batch: chain it before ``MultiSteps(...).gradient_transformation()``
    instead (see ``resample_every``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nrs_jax
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> params = {"w": jnp.zeros((3, 4))}
    >>> logits_fn = lambda p: x @ p["w"]
    >>> loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits_fn(p), y).mean()
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(alpha=1.0, radius=0.05),
    ...                  optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn)
    >>> params = optax.apply_updates(params, updates)
    >>> int(state[0].count)
    1

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
  check_nonnegative("alpha", alpha, allow_schedule=True)
  check_nonnegative("radius", radius)
  options = NRSOptions(
    num_neighbors=num_neighbors,
    noise=noise,
    scale=scale,
    divergence=divergence,
    aggregation=aggregation,
    mask=mask,
    stop_gradient_center=stop_gradient_center,
    strategy=strategy,
    neighbor_chunk_size=neighbor_chunk_size,
  )
  if not isinstance(resample_every, jax.core.Tracer):  # traced under inject_hyperparams
    resample_every = check_positive_int("resample_every", resample_every)
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    impl = _random.default_impl_name()  # the key itself is made in init: no backend yet
  else:
    impl = _random.impl_name(_random.as_key(key))
  alpha_is_zero = is_static_zero(alpha)

  def init_fn(params):
    if jax.tree_util.tree_leaves(params):  # (optax.tree_utils.tree_map_params inits with none)
      _neighbors.perturbed_leaf_mask(params, options.mask)
    base_key = _random.as_key(key)
    return NRSState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key_data(base_key),
      penalty=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates, state, params=None, *, logits_fn=None, center_logits=None, where=None, **extra_args
  ):
    del extra_args
    if params is None:
      raise ValueError("add_nrs_gradient needs params: call tx.update(grads, state, params, ...).")
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
    base = jax.random.wrap_key_data(state.key, impl=impl)
    step_key = jax.random.fold_in(base, state.count // resample_every)
    count = optax.safe_int32_increment(state.count)
    if alpha_is_zero:
      return updates, NRSState(count=count, key=state.key, penalty=jnp.zeros([], jnp.float32))
    a = alpha(state.count) if callable(alpha) else alpha

    def penalty(p):
      return _penalty.penalty(
        options,
        logits_fn,
        p,
        step_key,
        radius,
        axis_name=axis_name,
        per_replica_neighbors=per_replica_neighbors,
        center_logits=center_logits,
        where=where,
      )

    value, grads = jax.value_and_grad(penalty, allow_int=True)(params)
    if axis_name is not None:
      grads = jax.tree_util.tree_map(
        lambda g: g if g.dtype == jax.dtypes.float0 else jax.lax.pmean(g, axis_name), grads
      )

    def add(u, g):
      if u is None:
        return None
      if g.dtype == jax.dtypes.float0:
        return u
      return jnp.where(a == 0, u, u + (a * g).astype(u.dtype))

    new_updates = jax.tree_util.tree_map(add, updates, grads, is_leaf=lambda x: x is None)
    logged = jnp.where(a == 0, 0.0, value).astype(jnp.float32)
    return new_updates, NRSState(count=count, key=state.key, penalty=logged)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
