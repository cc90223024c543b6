"""The NRS penalty and loss: the single implementation every entry point uses."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _divergence
from nrs_jax import _neighbors
from nrs_jax import _options
from nrs_jax import _strategies


def _check_logits(logits: Any, what: str, source: str = "logits_fn") -> jax.Array:
  """``logits`` if float ``[..., C]``; else a ValueError naming ``source``, the user's function."""
  if isinstance(logits, (tuple, list, dict)):
    raise ValueError(
      f"{source} must return the logits alone, an array [..., num_classes]; {what} got a "
      f"{type(logits).__name__} of {len(logits)} items (logits and a model state, as from "
      "Equinox or Linen's mutable=?). Return the logits alone: lambda p: f(p)[0]"
      + (", or pass has_aux=True to make_nrs_loss." if source == "apply_fn" else ".")
    )
  if not _neighbors.is_float(logits) or jnp.ndim(logits) == 0:
    raise ValueError(
      f"{source} must return floating-point logits of shape [..., num_classes], not a scalar"
      f" (a loss function?); {what} got {getattr(logits, 'dtype', type(logits).__name__)}"
      f" {getattr(logits, 'shape', '')}."
    )
  if jnp.ndim(logits) == 1:
    raise ValueError(
      f"{source} returned 1-d logits of shape {tuple(logits.shape)} for {what}, which could be "
      "one example's classes or one binary logit per example, so they are refused. Return "
      "[B, 1] (logits[:, None]) for a binary logit per example, [1, C] (logits[None]) for one "
      "example's classes (a function vmapped over examples)."
    )
  return logits


def nrs_penalty(
  logits_fn: Callable[[Any], jax.Array],
  params: Any,
  key: jax.Array,
  *,
  radius: Any,
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: str | Callable = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  multilabel: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: int | None = None,
  center_logits: jax.Array | None = None,
  where: jax.Array | None = None,
  axis_name: str | None = None,
  per_replica_neighbors: bool = False,
) -> jax.Array:
  r"""The NRS divergence ``A_k D_B(w, w + delta_k)`` between a model and K neighbours.

  ``delta_k ~ Q_r(w)`` is drawn from ``key`` and held constant, ``D_B`` is the
  batch mean of a divergence between output distributions and ``A`` the mean or
  max over the K neighbours. The reference for every entry point's options.

  Args:
    logits_fn: ``params -> logits [..., C]`` closing over the batch, one dropout rng
      and non-trainable state. ``C == 1`` is one binary logit; leading axes averaged.
      It reads inputs only: the batch may be unlabeled.
    params: the centre ``w``, any pytree.
    key: PRNG key (typed, raw, or an int seed).
    radius: ``r >= 0``, a scalar or a pytree of scalars, a prefix of ``params``.
      0 everywhere gives exactly 0; a leaf of radius 0 is not perturbed but,
      unlike one ``mask`` leaves out, gets the gradient of its centre effect.
    num_neighbors: K, a static int >= 1.
    noise: ``v`` in ``delta = r * s(w) * v``: ``"gaussian"`` N(0, 1) per element,
      ``"rademacher"`` +-1 per element (the same variance, a cheaper draw: one hash per
      32 elements), ``"ball"`` / ``"sphere"`` uniform in / on the unit L2 ball over all.
    scale: ``s(w)``: ``"absolute"`` 1; ``"tensor"`` the leaf's norm (over
      sqrt(size) for gaussian, rademacher); ``"filter"`` the norm of the element's output
      unit, the last axis (over sqrt(fan-in) for those two; the leaf norm for
      0-d and 1-d leaves); ``"elementwise"`` ``|w_i| + 0.01``.
    divergence: ``"kl"`` KL(p_w || p_w'), ``"reverse_kl"``, ``"symmetric_kl"``,
      ``"js"``, or ``(center_logits, neighbor_logits) -> per-position values``.
    aggregation: ``"mean"`` or ``"max"`` (gradient through the worst).
    mask: the leaves NRS perturbs and gives the penalty gradient, as in
      ``optax.masked``: ``None`` (every float leaf), a pytree of bools (or a
      prefix), or a function ``params ->`` one (when all its leaves are
      callable); a static numpy bool array for a leaf selects its elements.
    stop_gradient_center: treat the centre's outputs as a fixed target.
    multilabel: read ``[..., L]`` logits as L independent sigmoid outputs (the sum
      over labels of each one's Bernoulli divergence), not one softmax.
    strategy: ``"auto"``, ``"loop"``, ``"vmap"`` or ``"chunked"`` (chunks of
      ``neighbor_chunk_size``, default 1, one alive at a time): the same derivatives.
    neighbor_chunk_size: divides K; with ``"auto"`` it means ``"chunked"``.
    center_logits: the centre's logits if already computed (shares the pass).
    where: bools broadcastable to ``logits.shape[:-1]``: the positions that count.
    axis_name: the batch axis under ``pmap`` / ``shard_map``: divergences are
      ``pmean``-ed (the global-batch penalty). Not needed under ``jax.jit``.
    per_replica_neighbors: with ``axis_name``, each replica draws its own.

  Returns:
    A float32 (or wider) scalar (float64 under x64 with float64 logits).

  Raises:
    ValueError: for an invalid option (``radius`` not finite and >= 0, e.g. a string; an
      unknown choice; ``neighbor_chunk_size`` not dividing K), a mask or radius that does
      not fit ``params``, a ``where`` that is not boolean or does not broadcast, and
      ``logits_fn`` output that is not float logits ``[..., C]``: a tuple such as
      ``(logits, state)``, a scalar, or a 1-d ``[B]`` vector (return ``[B, 1]`` for one
      binary logit per example).

  Examples:
    >>> import jax, jax.numpy as jnp, nrs_jax
    >>> x, params = jnp.ones((8, 3)), {"w": jnp.full((3, 4), 0.1)}
    >>> pen = nrs_jax.nrs_penalty(lambda p: x @ p["w"], params, jax.random.key(0),
    ...                           radius=0.1, num_neighbors=2)
    >>> d = nrs_jax.sample_perturbations(params, jax.random.key(0), radius=0.1, num_neighbors=2)
    >>> logq = [jax.nn.log_softmax(x @ (params["w"] + dw)) for dw in d.deltas[0]]  # neighbours
    >>> kl = [jnp.sum(0.25 * (jnp.log(0.25) - q), -1).mean() for q in logq]  # centre: uniform
    >>> bool(jnp.isclose(pen, (kl[0] + kl[1]) / 2, rtol=1e-4))  # the mean over the K = 2 draws
    True

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
  _options.check_nonnegative("radius", radius, tree=True)
  opts = _options.NRSOptions.of(locals())
  kw: dict[str, Any] = dict(center_logits=center_logits, where=where, axis_name=axis_name)
  return penalty(opts, logits_fn, params, key, radius, per_replica_neighbors, **kw)


def penalty(
  options: _options.NRSOptions,
  logits_fn: Callable[[Any], jax.Array],
  params: Any,
  key: Any,
  radius: Any,
  per_replica_neighbors: bool = False,
  *,
  center_logits: jax.Array | None = None,
  where: jax.Array | None = None,
  axis_name: str | None = None,
  source: str = "logits_fn",
) -> jax.Array:
  """:func:`nrs_penalty` with validated options (every entry point calls this); ``source``
  names the user's function in errors."""
  if per_replica_neighbors and axis_name is None:
    raise ValueError("per_replica_neighbors=True needs axis_name, the mapped axis.")
  # The perturbations are constants, the radius included (it stays out of custom rules).
  radius = jax.tree_util.tree_map(jax.lax.stop_gradient, radius)
  sampler = _neighbors.Sampler(
    params, radius=radius, noise=options.noise, scale=options.scale, mask=options.mask
  )
  leaves, treedef = jax.tree_util.tree_flatten(params)
  masks = zip(leaves, sampler.selected, sampler.elements)
  held = [_held_constant(x, s, e) for x, s, e in masks]
  if any(h is not x for h, x in zip(held, leaves)):  # no penalty gradient off the mask
    params = jax.tree_util.tree_unflatten(treedef, held)
    if not options.stop_gradient_center:
      center_logits = None  # given logits would carry the gradient to every leaf
  if center_logits is None:
    center_logits = logits_fn(params)
  center = _check_logits(center_logits, "the centre", source)
  weights = _position_weights(where, center.shape[:-1], axis_name)
  if options.stop_gradient_center:
    center = jax.lax.stop_gradient(center)
  out_dtype = jnp.promote_types(center.dtype, jnp.float32)
  if _options.is_static_zero(radius):
    return jnp.zeros((), out_dtype)
  key = _neighbors.as_key(key)
  if per_replica_neighbors:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  div_fn = _divergence.get_divergence(options.divergence)
  if options.multilabel:
    div_fn = _divergence.independent_labels(div_fn)

  def one_at(p, c, deltas):
    z = _check_logits(logits_fn(_neighbors.apply_perturbation(p, deltas)), "a neighbour", source)
    if z.shape != c.shape:
      raise ValueError(
        f"{source} returned shape {z.shape} for a neighbour but {c.shape} for "
        "the centre (or center_logits); they must match."
      )
    d = div_fn(c, z)
    if weights is None:
      return jnp.mean(d).astype(out_dtype)
    return jnp.sum(jnp.where(weights > 0, d * weights, 0.0)).astype(out_dtype)

  def divs_of(p, c, deltas):  # deltas with a leading axis of n neighbours -> [n]
    if next(d.shape[0] for d in deltas if d is not None) == 1:
      return one_at(p, c, [None if d is None else d[0] for d in deltas])[None]
    return jax.vmap(lambda d: one_at(p, c, d))(deltas)

  k = options.num_neighbors
  strategy: str | tuple[str, str] = options.strategy
  if strategy == "auto":
    strategy = _strategies.choose(
      k, k > 1 and _strategies.runs_convolution(logits_fn, params, sampler.moving)
    )
  keys = jax.random.split(key, k)
  value = _strategies.evaluate(
    strategy, divs_of, sampler.draw, params, center, keys, options, axis_name
  )
  radii = [r for r, m in zip(sampler.radii, sampler.moving) if m]
  if not all(_options.is_static_number(r) for r in radii):  # a traced radius may be 0 everywhere
    value = jnp.where(jnp.all(jnp.stack([jnp.asarray(r) == 0 for r in radii])), 0.0, value)
  return value


def _held_constant(x: Any, selected: bool, elements: Any) -> Any:
  """``x`` with no penalty gradient where the mask leaves it out (all of it, or some elements)."""
  if elements is not None:
    return jnp.where(elements, x, jax.lax.stop_gradient(x))
  return jax.lax.stop_gradient(x) if not selected and _neighbors.is_float(x) else x


def _position_weights(where, leading_shape, axis_name):
  """Weights summing to 1 over the global batch's valid positions (None without ``where``)."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise ValueError(
      f"where must be a boolean array (True for positions that count), got dtype {where.dtype}."
    )
  try:
    where = jnp.broadcast_to(where, leading_shape)
  except ValueError:
    raise ValueError(
      f"where has shape {where.shape}, which does not broadcast to the logits' leading "
      f"shape {tuple(leading_shape)} (logits.shape[:-1]); pass a mask of that shape, "
      "e.g. [batch, tokens] for [batch, tokens, vocab] logits."
    ) from None
  count = jnp.sum(where, dtype=jnp.float32)
  replicas = 1.0
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    replicas = jax.lax.psum(1.0, axis_name)
  return where * (replicas / jnp.maximum(count, 1.0))


def strided_subset(tree: Any, size: int, *, batch_size: int | None = None) -> Any:
  """Rows ``0, B/size, 2 B/size, ...`` of each leaf whose leading dim is the batch size ``B``
  (default: the largest), ``size`` dividing ``B``: the ``neighbor_batch_size`` subset (each
  of ``S`` data shards keeps its own rows when ``S`` divides ``size``).

  Raises:
    ValueError: when ``size`` is not a positive int dividing the batch size, or no leaf
      has a leading (batch) dimension.

  Examples:
    >>> import jax.numpy as jnp, nrs_jax
    >>> nrs_jax.strided_subset({"x": jnp.arange(8), "key": jnp.zeros(2)}, 4)["x"]
    Array([0, 2, 4, 6], dtype=int32)
  """
  dims = [jnp.shape(x)[0] for x in jax.tree_util.tree_leaves(tree) if jnp.ndim(x) >= 1]
  if not (batch_size or dims):
    raise ValueError("strided_subset needs an array with a leading (batch) dimension.")
  b = batch_size or max(dims)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size <= b:
    raise ValueError(
      f"neighbor_batch_size={size!r} must be a positive int no larger than the batch size {b}."
    )
  if b % size:
    raise ValueError(
      f"neighbor_batch_size={size} must divide the batch size {b}: pick a divisor of {b} "
      "(under data-parallel sharding, also a multiple of the number of data shards)."
    )

  take = lambda x: jnp.reshape(x, (size, b // size, *jnp.shape(x)[1:]))[:, 0]
  return jax.tree_util.tree_map(lambda x: take(x) if jnp.ndim(x) and x.shape[0] == b else x, tree)


def make_nrs_loss(
  apply_fn: Callable[[Any, Any], Any],
  task_loss_fn: Callable[[jax.Array, Any], jax.Array],
  *,
  alpha: float | jax.Array,
  radius: Any,
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: str | Callable = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  multilabel: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: int | None = None,
  where_fn: Callable[[Any], jax.Array] | None = None,
  neighbor_batch_size: int | None = None,
  reuse_center_logits: bool = False,
  has_aux: bool = False,
) -> Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]:
  """``loss(params, batch, key) -> (task_loss + alpha * penalty, aux)``, one centre pass.

  Args:
    apply_fn: ``(params, batch) -> logits``, or ``-> (logits, model_aux)`` with
      ``has_aux=True`` (e.g. new BatchNorm statistics, from the centre only).
    task_loss_fn: ``(logits, batch) -> scalar``.
    alpha: weight of the penalty, >= 0 (0: exactly the task loss).
    radius, num_neighbors, noise, scale, divergence, aggregation, mask, stop_gradient_center, multilabel, strategy, neighbor_chunk_size: see :func:`nrs_penalty`.
    where_fn: ``batch -> where`` (see :func:`nrs_penalty`).
    neighbor_batch_size: ``m`` dividing the batch size ``B``: the penalty on the
      :func:`strided_subset` of ``m`` examples, ``1 + (K + 1) m / B`` passes.
    reuse_center_logits: with ``m``, the centre's logits from the task pass
      (``1 + K m / B`` passes); exact only for per-example deterministic outputs.
    has_aux: whether ``apply_fn`` returns ``(logits, model_aux)``.

  Returns:
    ``loss(params, batch, key, penalty_batch=None) -> (total, aux)``, ``aux`` holding
    ``task_loss``, ``nrs_penalty``, ``logits`` (and ``model_aux``). The penalty reads
    inputs, never labels: ``penalty_batch`` (e.g. an unlabeled batch, or the labelled
    and unlabeled inputs together) is what it sees instead of ``batch``, with its own
    centre pass; ``task_loss_fn`` sees ``batch`` alone, ``model_aux`` comes from
    ``batch``'s pass, and ``neighbor_batch_size`` and ``where_fn`` apply to it.

  Raises:
    ValueError: at construction for an invalid option (as :func:`nrs_penalty`) or a
      ``neighbor_batch_size`` that is not a positive int; at trace time for one that does
      not divide the batch, logits that are not ``[..., C]``, a ``penalty_batch`` whose
      entries do not have ``batch``'s shape per example (or on which ``apply_fn`` fails),
      and ``penalty_batch`` with ``reuse_center_logits``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, nrs_jax
    >>> apply_fn = lambda p, b: b["x"] @ p["w"]
    >>> task = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(
    ...     z, b["y"]).mean()
    >>> loss = nrs_jax.make_nrs_loss(apply_fn, task, alpha=1.0, radius=0.05)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.array([0, 1, 2, 3])}
    >>> (total, aux), grads = jax.value_and_grad(loss, has_aux=True)(
    ...     {"w": jnp.full((3, 4), 0.1)}, batch, jax.random.key(0))
    >>> sorted(aux), round(float(aux["task_loss"]), 4)  # equal logits: log 4
    (['logits', 'nrs_penalty', 'task_loss'], 1.3863)
    >>> d = nrs_jax.sample_perturbations({"w": jnp.zeros((3, 4))}, jax.random.key(0), radius=0.05)
    >>> q = jax.nn.log_softmax(batch["x"] @ (0.1 + d.deltas[0][0]))  # centre: uniform
    >>> kl = jnp.mean(jnp.sum(0.25 * (jnp.log(0.25) - q), -1))
    >>> bool(jnp.isclose(aux["nrs_penalty"], kl, rtol=1e-4) & jnp.isclose(total, aux["task_loss"] + kl))
    True
  """
  _options.check_nonnegative("alpha", alpha)
  _options.check_nonnegative("radius", radius, tree=True)
  options = _options.NRSOptions.of(locals())
  m = neighbor_batch_size
  if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
    raise ValueError(
      f"neighbor_batch_size={m!r} must be a positive int (examples the penalty sees) or None."
    )
  if reuse_center_logits and m is None:
    raise ValueError("reuse_center_logits=True needs neighbor_batch_size (a sub-batch).")
  skip = _options.is_static_zero(alpha)
  logits_of = (lambda out: out[0]) if has_aux else (lambda out: out)

  def loss(params, batch, key, penalty_batch=None):
    out = apply_fn(params, batch)
    logits = logits_of(out)
    task = task_loss_fn(logits, batch)
    value = jnp.zeros((), jnp.promote_types(jnp.result_type(task), jnp.float32))
    total = task
    if not skip:
      pen_batch, center, own = batch, logits, penalty_batch is not None
      if own:
        pen_batch, center = _check_penalty_batch(penalty_batch, batch, reuse_center_logits), None
      if m is not None:
        pen_batch = strided_subset(pen_batch, m, batch_size=None if own else jnp.shape(logits)[0])
        center = strided_subset(logits, m) if reuse_center_logits else None
      where = None if where_fn is None else where_fn(pen_batch)
      pen_logits = lambda p: logits_of(_apply_to_penalty_batch(apply_fn, p, pen_batch, own))
      value = penalty(
        options,
        pen_logits,
        params,
        key,
        radius,
        center_logits=center,
        where=where,
        source="apply_fn",
      )
      total = task + alpha * value
    aux = {"task_loss": task, "nrs_penalty": value, "logits": logits}
    if has_aux:
      aux["model_aux"] = out[1]
    return total, aux

  return loss


def _check_penalty_batch(penalty_batch: Any, batch: Any, reuse_center_logits: bool) -> Any:
  """``penalty_batch`` as given, after the checks that name it: each entry it shares with a
  mapping ``batch`` has that entry's shape per example (its leading, batch, axis may differ)."""
  if reuse_center_logits:
    raise ValueError(
      "penalty_batch needs reuse_center_logits=False: the task pass's logits are of batch, "
      "not of penalty_batch."
    )
  if isinstance(penalty_batch, Mapping) and isinstance(batch, Mapping):
    for k in penalty_batch.keys() & batch.keys():
      a, b = jnp.shape(penalty_batch[k]), jnp.shape(batch[k])
      if len(a) != len(b) or a[1:] != b[1:]:
        raise ValueError(
          f"penalty_batch[{k!r}] has shape {a} but batch[{k!r}] has {b}: the penalty's "
          f"inputs must have the task batch's shape per example, [N, *{b[1:]}] (any N)."
        )
  return penalty_batch


def _apply_to_penalty_batch(apply_fn: Callable, params: Any, pen_batch: Any, own: bool) -> Any:
  """``apply_fn(params, pen_batch)``; an error on a separate ``penalty_batch`` reaches the
  caller as itself, with a note that names ``penalty_batch``."""
  try:
    return apply_fn(params, pen_batch)
  except Exception as e:
    if own:
      shapes = jax.tree_util.tree_map(jnp.shape, pen_batch)
      e.add_note(
        f"nrs_jax: apply_fn failed on penalty_batch (shapes {shapes}), the inputs the NRS "
        "penalty reads instead of batch: they must be inputs the model takes, as batch's are."
      )
    raise
