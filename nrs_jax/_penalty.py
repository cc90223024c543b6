"""The NRS penalty and loss: the single implementation every entry point uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _neighbors
from nrs_jax import _random
from nrs_jax import _strategies
from nrs_jax._options import NRSOptions
from nrs_jax._options import check_nonnegative
from nrs_jax._options import is_static_number
from nrs_jax._options import is_static_zero

Scalar = Union[float, jax.Array]


def _check_logits(logits: Any, what: str) -> jax.Array:
  if not hasattr(logits, "dtype") or not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(
      f"logits_fn must return floating-point logits of shape [..., num_classes]; "
      f"{what} got {getattr(logits, 'dtype', type(logits))}."
    )
  if jnp.ndim(logits) == 0:
    raise ValueError(
      f"logits_fn must return logits of shape [..., num_classes], not a scalar "
      f"({what}); did you pass a loss function instead of a logits function?"
    )
  return logits


def nrs_penalty(
  logits_fn: Callable[[Any], jax.Array],
  params: Any,
  key: jax.Array,
  *,
  radius: Scalar,
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: Union[str, Callable] = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: Optional[int] = None,
  center_logits: Optional[jax.Array] = None,
  where: Optional[jax.Array] = None,
  axis_name: Optional[str] = None,
  per_replica_neighbors: bool = False,
) -> jax.Array:
  r"""The NRS divergence between a model and K sampled neighbours.

  ``A_k D_B(w, w + delta_k)`` with ``delta_k ~ Q_r(w)`` sampled from ``key``
  (see :func:`sample_perturbations`) and treated as constants, ``D_B`` the
  batch-mean divergence between output distributions and ``A`` the mean or the
  max over the K neighbours. Differentiable in ``params`` through both the
  centre and the neighbour outputs (unless ``stop_gradient_center``).

  Args:
    logits_fn: ``params -> logits`` of shape ``[..., num_classes]``; it closes
      over the batch, the dropout rng and any non-trainable state. Logits, not
      probabilities: a model that ends in a softmax gives a wrong penalty
      (nothing can tell the two apart without looking at values). A last axis
      of size 1 is one binary logit (a sigmoid classifier): the divergence is
      then between Bernoulli distributions. Leading axes (batch, tokens) are
      averaged over.
    params: the centre ``w``, any pytree.
    key: PRNG key for the perturbations.
    radius: neighbourhood radius ``r`` (>= 0; 0 gives exactly 0).
    num_neighbors: K, a static int >= 1.
    noise: ``"gaussian"`` (default), ``"ball"`` or ``"sphere"``.
    scale: ``"absolute"`` (default), ``"tensor"``, ``"filter"``,
      ``"elementwise"``.
    divergence: ``"kl"`` (KL(p_w || p_w'), default), ``"reverse_kl"``,
      ``"symmetric_kl"``, ``"js"`` or a callable ``(center_logits,
      neighbor_logits) -> per-example divergence``.
    aggregation: ``"mean"`` (default) or ``"max"`` over the K neighbours.
    mask: leaves to perturb, optax's convention (as in ``optax.masked``):
      ``None`` (all float leaves), a pytree of bools like ``params`` (or a
      prefix of it), or a callable ``params ->`` such a pytree. By path:
      ``lambda p: jax.tree_util.tree_map_with_path(lambda path, x: ..., p)``.
    stop_gradient_center: treat the centre outputs as a fixed target.
    strategy: how the K neighbours are evaluated: ``"loop"`` (unrolled),
      ``"vmap"``, ``"chunked"`` (chunks of ``neighbor_chunk_size`` neighbours,
      each drawn when it is needed and differentiated in the forward pass
      through a custom VJP, so one chunk's perturbations and activations are
      alive at a time with no recomputation; chunks of one run unrolled, larger
      chunks are vmapped under ``lax.scan``), or ``"auto"`` (the rule is in
      ``nrs_jax._strategies``: a loop for one neighbour; for a model that runs
      a convolution, a loop below 8 neighbours and chunks of one from 8; for
      other models a loop on CPU up to 8 neighbours and ``vmap`` otherwise).
      ``"accumulate"`` is a deprecated alias of ``"chunked"``. All give the
      same value and gradient to float tolerance, gradients with respect to
      values ``logits_fn`` closes over included, and all support
      ``jax.hessian``; ``jax.jvp`` of the penalty needs ``"loop"`` or
      ``"vmap"`` (``"chunked"`` raises a ValueError saying so). On GPUs,
      float32 convolutions and matmuls run in TF32 by default and batched
      kernels (``vmap``, chunks) round differently from ``loop``; use
      ``jax.default_matmul_precision("highest")`` to compare them.
    neighbor_chunk_size: neighbours per chunk of ``"chunked"`` (default 1);
      must divide ``num_neighbors``. Setting it with ``"auto"`` means
      ``"chunked"``.
    center_logits: the centre's logits if already computed (shares the centre
      forward pass with the task loss).
    where: optional boolean array, broadcastable to the logits' leading shape
      ``logits.shape[:-1]`` (as in optax's losses): only the ``True`` positions
      count, e.g. the non-padding tokens of ``[B, T, V]`` logits. The mean runs
      over valid positions (over the global batch with ``axis_name``); no valid
      position at all gives 0.
    axis_name: for ``pmap`` / ``shard_map`` users whose batch is split over a
      named axis: each neighbour's divergence is averaged over the axis
      (``lax.pmean``) before aggregation, so the value is the global-batch
      penalty on every replica (equal local batch sizes) and ``max`` picks the
      globally worst neighbour. Gradients follow JAX's collective autodiff: each
      replica's gradient is its local contribution, so ``pmean`` the gradients
      over the axis exactly as for the task loss. Not needed under ``jax.jit``
      with shardings, where the batch is already global.
    per_replica_neighbors: with ``axis_name``, fold the replica index into the
      key so each replica draws its own neighbours (default: every replica
      uses the same neighbours, drawn from the shared key).

  Returns:
    A float32 (or wider) scalar.

  Raises:
    ValueError: for an invalid option (at trace time).

  .. note::
    Memory: ``vmap`` and ``loop`` keep K neighbours' activations for the
    backward pass; ``chunked`` keeps one chunk's. Dropout:
    ``logits_fn`` must close over one dropout rng so the centre and every
    neighbour share a mask. BatchNorm: ``logits_fn`` should run in the centre's
    mode and discard updated statistics; only the centre pass may update them.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> x = jnp.ones((8, 3))
    >>> params = {"w": jnp.ones((3, 4)) * 0.1}
    >>> logits_fn = lambda p: x @ p["w"]
    >>> pen = nrs_jax.nrs_penalty(logits_fn, params, jax.random.key(0),
    ...                           radius=0.1, num_neighbors=2)
    >>> bool(pen > 0)
    True
    >>> float(nrs_jax.nrs_penalty(logits_fn, params, jax.random.key(0), radius=0.0))
    0.0

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
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
  check_nonnegative("radius", radius)
  return penalty(
    options,
    logits_fn,
    params,
    key,
    radius,
    center_logits=center_logits,
    where=where,
    axis_name=axis_name,
    per_replica_neighbors=per_replica_neighbors,
  )


def penalty(
  options: NRSOptions,
  logits_fn: Callable[[Any], jax.Array],
  params: Any,
  key: jax.Array,
  radius: Scalar,
  *,
  center_logits: Optional[jax.Array] = None,
  where: Optional[jax.Array] = None,
  axis_name: Optional[str] = None,
  per_replica_neighbors: bool = False,
) -> jax.Array:
  """:func:`nrs_penalty` with its options already validated (every entry point calls this)."""
  k = options.num_neighbors
  div_fn = options.divergence_fn
  # The perturbations are constants: stopping the radius's gradient here (rather than only
  # the draw's) keeps a differentiated radius out of the chunked strategy's custom VJP.
  # (Building the sampler also checks the mask against params, before any model call.)
  sampler = _neighbors.make_sampler(
    params,
    radius=jax.lax.stop_gradient(radius),
    noise=options.noise,
    scale=options.scale,
    mask=options.mask,
  )
  if per_replica_neighbors and axis_name is None:
    raise ValueError("per_replica_neighbors=True needs axis_name, the mapped axis.")
  if center_logits is None:
    center_logits = logits_fn(params)
  center = _check_logits(center_logits, "the centre")
  weights = _position_weights(where, center.shape[:-1], axis_name)
  if options.stop_gradient_center:
    center = jax.lax.stop_gradient(center)
  out_dtype = jnp.promote_types(center.dtype, jnp.float32)
  if is_static_zero(radius):
    return jnp.zeros((), out_dtype)

  key = _random.as_key(key)
  if per_replica_neighbors:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  keys = jax.random.split(key, k)

  def one_at(p, c, deltas):
    z = _check_logits(logits_fn(_neighbors.apply_perturbation(p, deltas)), "a neighbour")
    if z.shape != c.shape:
      raise ValueError(
        f"logits_fn returned shape {z.shape} for a neighbour but {c.shape} for "
        "the centre (or center_logits); they must match."
      )
    d = div_fn(c, z)
    if weights is None:
      return jnp.mean(d).astype(out_dtype)
    return jnp.sum(jnp.where(weights > 0, d * weights, 0.0)).astype(out_dtype)

  def divs_of(p, c, deltas):  # deltas with a leading axis of n neighbours -> [n]
    n = next(d.shape[0] for d in deltas if d is not None)
    if n == 1:
      return one_at(p, c, [None if d is None else d[0] for d in deltas])[None]
    return jax.vmap(lambda d: one_at(p, c, d))(deltas)

  strategy = options.strategy
  if strategy == "auto":
    strategy = _strategies.choose(
      k, k > 1 and _strategies.runs_convolution(logits_fn, params, sampler.selected)
    )
  value = _strategies.evaluate(
    strategy,
    divs_of,
    sampler.draw,
    params,
    center,
    keys,
    chunk_size=options.neighbor_chunk_size or 1,
    aggregation=options.aggregation,
    axis_name=axis_name,
    fixed_center=options.stop_gradient_center,
  )
  if not is_static_number(radius):
    value = jnp.where(radius == 0, jnp.zeros_like(value), value)
  return value


def _position_weights(where, leading_shape, axis_name):
  """Per-position weights whose sum over the global batch is the mean: None without ``where``.

  With ``axis_name`` each replica's divergence is later ``pmean``-ed over the
  axis, so a replica's weights are ``R / (valid positions over all replicas)``.
  """
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


def strided_subset(tree: Any, size: int, *, batch_size: Optional[int] = None) -> Any:
  """Rows ``0, B/size, 2 B/size, ...`` of every leaf whose leading dim is the batch size ``B``.

  The subset the penalty sees with ``neighbor_batch_size``: spread evenly over
  the batch, so with the batch sharded over ``S`` devices (``S`` dividing
  ``size``) each shard keeps its own rows and nothing moves between devices.
  It is written as a reshape to ``[size, B / size, ...]`` and the first
  column. Leaves with another leading dim (a key, a scalar) pass through.

  Args:
    tree: an array or a pytree of arrays (a batch, logits).
    size: how many rows to keep; must divide ``B``.
    batch_size: ``B``; default: the largest leading dim among the leaves.

  Raises:
    ValueError: if ``size`` is not a positive int that divides ``B``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import nrs_jax
    >>> nrs_jax.strided_subset({"x": jnp.arange(8), "key": jnp.zeros(2)}, 4)["x"]
    Array([0, 2, 4, 6], dtype=int32)
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if batch_size is None:
    dims = [jnp.shape(x)[0] for x in leaves if jnp.ndim(x) >= 1]
    if not dims:
      raise ValueError("strided_subset needs an array with a leading (batch) dimension.")
    batch_size = max(dims)
  b = batch_size
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size <= b:
    raise ValueError(
      f"neighbor_batch_size={size!r} must be a positive int no larger than the batch size {b}."
    )
  if b % size:
    raise ValueError(
      f"neighbor_batch_size={size} must divide the batch size {b}: pick a divisor of {b} "
      "(under data-parallel sharding, also a multiple of the number of data shards)."
    )

  def take(x):
    if jnp.ndim(x) == 0 or jnp.shape(x)[0] != b:
      return x
    return jnp.reshape(x, (size, b // size, *jnp.shape(x)[1:]))[:, 0]

  return jax.tree_util.tree_map(take, tree)


def make_nrs_loss(
  apply_fn: Callable[[Any, Any], Any],
  task_loss_fn: Callable[[jax.Array, Any], jax.Array],
  *,
  alpha: Scalar,
  radius: Scalar,
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  divergence: Union[str, Callable] = "kl",
  aggregation: str = "mean",
  mask: Any = None,
  stop_gradient_center: bool = False,
  strategy: str = "auto",
  neighbor_chunk_size: Optional[int] = None,
  where_fn: Optional[Callable[[Any], jax.Array]] = None,
  neighbor_batch_size: Optional[int] = None,
  reuse_center_logits: bool = False,
  has_aux: bool = False,
) -> Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]:
  """Builds ``loss(params, batch, key) -> (task_loss + alpha * penalty, aux)``.

  The centre forward pass is shared between the task loss and the penalty, so
  a step costs one forward/backward for the centre plus one per neighbour.
  With ``neighbor_batch_size=m`` the penalty is taken on ``m`` of the ``B``
  examples (the task loss still sees all of them): ``1 + (K + 1) m / B`` passes
  by default, ``1 + K m / B`` with ``reuse_center_logits=True``.

  Args:
    apply_fn: ``(params, batch) -> logits`` (logits, not probabilities; shape
      ``[..., num_classes]``, or ``[..., 1]`` for one binary logit); with
      ``has_aux=True``, ``(params, batch) -> (logits, model_aux)`` where
      ``model_aux`` (e.g. updated BatchNorm statistics) is taken from the centre
      pass only. ``batch`` is whatever you pass to the loss, unchanged.
    task_loss_fn: ``(logits, batch) -> scalar``, e.g. ``lambda z, b:
      optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean()``.
    alpha: weight of the penalty (>= 0; 0 gives exactly the task loss).
    radius, num_neighbors, noise, scale, divergence, aggregation, mask, stop_gradient_center, strategy, neighbor_chunk_size: as
      in :func:`nrs_penalty`.
    where_fn: optional ``batch -> where``, a boolean mask over the logits'
      leading dims (e.g. the non-padding tokens) passed to :func:`nrs_penalty`
      as ``where``. The task loss is yours: mask it there as you need.
    neighbor_batch_size: ``None`` (the whole batch) or ``m``, a positive int
      dividing the batch size ``B`` (the logits' leading dim): the penalty is
      taken on the strided subset of ``m`` examples, rows ``0, B/m, 2B/m, ...``
      (see :func:`strided_subset`), spread evenly over the batch so that under
      data-parallel sharding every shard holds ``m / shards`` of them and
      nothing is gathered (the number of data shards must then divide ``m``).
      Every leaf of ``batch`` whose leading dim is ``B`` is subset (and
      ``where_fn`` sees the subset batch); other leaves (a dropout key,
      scalars) pass through unchanged.
    reuse_center_logits: with ``neighbor_batch_size``, take the centre's
      logits from the full task pass (subset) instead of re-evaluating the
      centre on the subset. Exact only for models whose outputs are
      per-example and deterministic given the batch row: not with train-mode
      BatchNorm (batch statistics of B vs m examples) or a dropout mask drawn
      for the batch shape. By default the centre is re-evaluated on the
      subset, so centre and neighbours share statistics and masks and
      ``radius=0`` gives exactly 0 for every model.
    has_aux: whether ``apply_fn`` returns ``(logits, model_aux)``.

  Returns:
    ``loss(params, batch, key) -> (total, aux)`` with ``aux`` a dict holding
    ``task_loss``, ``nrs_penalty``, ``logits`` (and ``model_aux``). Use it with
    ``jax.value_and_grad(loss, has_aux=True)``.

  .. note::
    BatchNorm: return the updated statistics as ``model_aux`` and apply only
    those; neighbour passes never update them. Dropout: put the dropout rng in
    ``batch`` (or close over it) so the centre and the neighbours share a mask.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import nrs_jax
    >>> apply_fn = lambda p, b: b["x"] @ p["w"]
    >>> task = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(
    ...     z, b["y"]).mean()
    >>> loss = nrs_jax.make_nrs_loss(apply_fn, task, alpha=1.0, radius=0.05)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.array([0, 1, 2, 3])}
    >>> params = {"w": jnp.full((3, 4), 0.1)}
    >>> (total, aux), grads = jax.value_and_grad(loss, has_aux=True)(
    ...     params, batch, jax.random.key(0))
    >>> sorted(aux)
    ['logits', 'nrs_penalty', 'task_loss']

  References:
    Zhao and Zhang, Neighborhood Region Smoothing Regularization for Finding
    Flat Minima In Deep Neural Networks, arXiv 2201.06064, 2022.
  """
  check_nonnegative("alpha", alpha)
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
  m = neighbor_batch_size
  if m is not None and (isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1):
    raise ValueError(
      f"neighbor_batch_size={m!r} must be a positive int (examples the penalty sees) or None."
    )
  if reuse_center_logits and m is None:
    raise ValueError("reuse_center_logits=True needs neighbor_batch_size (a sub-batch).")
  skip = is_static_zero(alpha)

  def logits_of(out):
    return out[0] if has_aux else out

  def loss(params, batch, key):
    out = apply_fn(params, batch)
    logits = logits_of(out)
    task = task_loss_fn(logits, batch)
    if skip:
      value = jnp.zeros((), jnp.promote_types(jnp.result_type(task), jnp.float32))
      total = task
    else:
      pen_batch, center = batch, logits
      if m is not None:
        pen_batch = strided_subset(batch, m, batch_size=jnp.shape(logits)[0])
        center = strided_subset(logits, m) if reuse_center_logits else None
      value = penalty(
        options,
        lambda p: logits_of(apply_fn(p, pen_batch)),
        params,
        key,
        radius,
        center_logits=center,
        where=None if where_fn is None else where_fn(pen_batch),
      )
      total = task + alpha * value
    aux = {"task_loss": task, "nrs_penalty": value, "logits": logits}
    if has_aux:
      aux["model_aux"] = out[1]
    return total, aux

  return loss
