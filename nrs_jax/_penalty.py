"""The NRS penalty and loss: the single implementation every entry point uses."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _divergence
from nrs_jax import _neighbors
from nrs_jax import _random

AGGREGATIONS = ("mean", "max")
STRATEGIES = ("auto", "vmap", "loop", "accumulate", "chunked")

Scalar = Union[float, jax.Array]


def _is_static_number(x: Any) -> bool:
  if isinstance(x, jax.core.Tracer):
    return False
  try:
    float(x)
  except (TypeError, ValueError):
    return False
  return jnp.ndim(x) == 0


def check_nonnegative(name: str, value: Any, *, allow_schedule: bool = False) -> None:
  """Raises if a static scalar is negative or not finite; traced values pass."""
  if callable(value):
    if allow_schedule:
      return
    raise ValueError(f"{name} must be a finite scalar >= 0, not a callable.")
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be a finite scalar >= 0.") from None
  if not math.isfinite(v) or v < 0:
    raise ValueError(f"{name}={value!r} must be a finite scalar >= 0.")


def validate_options(
  *,
  radius: Any,
  num_neighbors: Any,
  noise: str,
  scale: str,
  divergence: Any,
  aggregation: str,
  strategy: str,
  neighbor_chunk_size: Optional[int],
) -> tuple[int, str]:
  """Checks the static options; returns (K, resolved strategy or 'auto')."""
  check_nonnegative("radius", radius)
  k = _neighbors.static_num_neighbors(num_neighbors)
  _neighbors.check_choice("noise", noise, _neighbors.NOISES)
  _neighbors.check_choice("scale", scale, _neighbors.SCALES)
  _divergence.get_divergence(divergence)
  _neighbors.check_choice("aggregation", aggregation, AGGREGATIONS)
  _neighbors.check_choice("strategy", strategy, STRATEGIES)
  if neighbor_chunk_size is not None:
    c = neighbor_chunk_size
    if isinstance(c, bool) or not isinstance(c, int) or c <= 0 or k % c:
      raise ValueError(
        f"neighbor_chunk_size={c!r} must be a positive int that divides num_neighbors={k}, or None."
      )
    if strategy in ("vmap", "loop", "accumulate"):
      raise ValueError(
        f"neighbor_chunk_size={c} asks for chunked evaluation but strategy={strategy!r}; "
        "use strategy='chunked' or 'auto' with a chunk size, or drop the chunk size."
      )
    return k, "chunked"
  if strategy == "chunked":
    raise ValueError(
      "strategy='chunked' needs neighbor_chunk_size, a positive int dividing num_neighbors."
    )
  return k, strategy


def resolve_strategy(strategy: str, k: int, params_leaves: list, selected: list[bool]) -> str:
  """Picks the neighbour strategy for ``strategy='auto'``.

  The rule (the measurements behind it are in the README's benchmark section
  and ``experiments/results/``):

  - one neighbour: ``loop`` (nothing to batch);
  - a model with a perturbed kernel of 3 or more dims (a convolution), on any
    backend: ``loop`` for K < 8, ``accumulate`` for K >= 8 (one neighbour's
    activations alive at a time). vmap over K conv kernels becomes a grouped
    convolution, slower than K separate ones on the CPU and the GPU measured;
  - dense-only models: on CPU ``loop`` for K <= 8 and ``vmap`` above (the
    loop's compile time grows with K); on GPU/TPU ``vmap``.

  ``accumulate`` is reverse-mode only: for ``jax.jvp`` of the penalty name a
  strategy.
  """
  if strategy != "auto":
    return strategy
  if k == 1:
    return "loop"
  if any(s and jnp.ndim(x) >= 3 for x, s in zip(params_leaves, selected)):
    return "accumulate" if k >= 8 else "loop"
  if jax.default_backend() == "cpu":
    return "loop" if k <= 8 else "vmap"
  return "vmap"


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
    strategy: how the K neighbours are evaluated: ``"vmap"``, ``"loop"``
      (unrolled), ``"accumulate"`` (unrolled, each neighbour drawn when needed
      and its gradient taken in the forward pass through a custom VJP, so one
      neighbour's perturbation and activations are alive at a time with no
      recomputation; reverse-mode only: ``jax.jvp``/``jax.hessian`` of the
      penalty need another strategy), ``"chunked"`` (the same over chunks of
      ``neighbor_chunk_size`` vmapped neighbours under ``lax.scan``: memory
      holds one chunk at a time, also reverse-mode only; on CPU, conv nets run
      slowly this way, as XLA:CPU is slow at conv gradients inside loops),
      or ``"auto"`` (see :func:`resolve_strategy`; chunked when
      ``neighbor_chunk_size`` is set). All give the same value and gradient
      to float tolerance. On GPUs, float32 convolutions and matmuls run in TF32
      by default and ``vmap``/``chunked`` (batched kernels) round differently
      from ``loop``: on a small ResNet on an H200 they differed by 1e-4 in value
      and 1% in gradient norm, and by 1e-6 under
      ``jax.default_matmul_precision("highest")``.
    neighbor_chunk_size: neighbours per chunk; must divide ``num_neighbors``.
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
    backward pass; ``accumulate`` keeps one neighbour's, ``neighbor_chunk_size``
    one chunk's. Dropout:
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
  k, strategy = validate_options(
    radius=radius,
    num_neighbors=num_neighbors,
    noise=noise,
    scale=scale,
    divergence=divergence,
    aggregation=aggregation,
    strategy=strategy,
    neighbor_chunk_size=neighbor_chunk_size,
  )
  div_fn = _divergence.get_divergence(divergence)
  selected = _neighbors.perturbed_leaf_mask(params, mask)
  if center_logits is None:
    center_logits = logits_fn(params)
  center = _check_logits(center_logits, "the centre")
  weights = _position_weights(where, center.shape[:-1], axis_name)
  if stop_gradient_center:
    center = jax.lax.stop_gradient(center)
  out_dtype = jnp.promote_types(center.dtype, jnp.float32)
  if _is_static_number(radius) and float(radius) == 0.0:
    return jnp.zeros((), out_dtype)

  key = _random.as_key(key)
  if per_replica_neighbors:
    if axis_name is None:
      raise ValueError("per_replica_neighbors=True needs axis_name, the mapped axis.")
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  keys = jax.random.split(key, k)
  leaves = jax.tree_util.tree_leaves(params)

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

  def deltas_of(p, ks):  # the perturbations of keys ks, with a leading len(ks) axis
    return _neighbors.make_sampler(p, radius=radius, noise=noise, scale=scale, mask=mask)(ks)

  if strategy != "chunked":
    strategy = resolve_strategy(strategy, k, leaves, selected)
  if strategy in ("accumulate", "chunked"):
    # Chunks of neighbours, each drawn when it is needed and differentiated in the
    # forward pass: unrolled one by one (accumulate) or a lax.scan over vmapped chunks.
    c = 1 if strategy == "accumulate" else neighbor_chunk_size

    def divs_of(p, z, deltas):
      if c == 1:
        return one_at(p, z, _neighbors.neighbor_deltas(deltas, 0))[None]
      return jax.vmap(lambda d: one_at(p, z, d))(deltas)

    value = _accumulated(
      divs_of,
      deltas_of,
      params,
      center,
      keys.reshape((k // c, c)),
      unrolled=strategy == "accumulate",
      aggregation=aggregation,
      axis_name=axis_name,
      fixed_center=stop_gradient_center,
    )
  else:
    deltas = deltas_of(params, keys)
    if strategy == "loop":
      divs = jnp.stack(
        [one_at(params, center, _neighbors.neighbor_deltas(deltas, i)) for i in range(k)]
      )
    else:
      divs = jax.vmap(lambda d: one_at(params, center, d))(deltas)
    value = _aggregate(divs, aggregation, axis_name)
  if not _is_static_number(radius):
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


def _global_divs(divs: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Each neighbour's divergence averaged over the mapped axis (global batch), if any."""
  return divs if axis_name is None else jax.lax.pmean(divs, axis_name)


def _aggregate(divs: jax.Array, aggregation: str, axis_name: Optional[str]) -> jax.Array:
  """``A_k d_k``: the mean or the max of the K (global) divergences."""
  divs = _global_divs(divs, axis_name)
  return jnp.mean(divs) if aggregation == "mean" else jnp.max(divs)


def _accumulated(
  divs_of, deltas_of, params, center, key_groups, *, unrolled, aggregation, axis_name, fixed_center
):
  """``A_k d_k`` whose gradient is taken group by group in the forward pass.

  A custom VJP. The forward pass visits the groups of neighbours (a row of
  ``key_groups`` each): it draws the group's perturbations, runs ``jax.vjp`` of
  its divergences and applies the group's share of the cotangent at once (1/K
  each for ``mean``; one-hot on the group's largest for ``max``), keeping only
  the running value and gradient. So one group's perturbations and activations
  are alive at a time and nothing is recomputed; the backward pass scales the
  kept gradient by the incoming cotangent. Groups run unrolled (``unrolled``,
  for XLA:CPU, ordered by a data dependence) or under ``lax.scan``. Same value
  and gradient as differentiating the whole; exact ties under ``max`` take the
  first neighbour instead of splitting, and a NaN divergence propagates.
  Reverse mode only.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  floats = [_neighbors.is_float(x) for x in leaves]
  n_groups, group = key_groups.shape
  k = n_groups * group

  def tree(fl, all_leaves):
    it = iter(fl)
    return jax.tree_util.tree_unflatten(
      treedef, [next(it) if f else x for x, f in zip(all_leaves, floats)]
    )

  @jax.custom_vjp
  def run(all_leaves, c):
    p = jax.tree_util.tree_unflatten(treedef, all_leaves)
    group_divs = lambda ks: divs_of(p, c, deltas_of(p, ks))
    if unrolled:
      divs = jnp.concatenate([group_divs(ks) for ks in key_groups])
    else:
      divs = jax.lax.map(group_divs, key_groups).reshape(k)
    return _aggregate(divs, aggregation, axis_name)

  def fwd(all_leaves, c):
    p = jax.tree_util.tree_unflatten(treedef, all_leaves)
    fl = [x for x, f in zip(all_leaves, floats) if f]
    acc = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))

    def visit(carry, ks):
      value, g_fl, g_c, tie = carry
      ds = deltas_of(p, ks)
      if unrolled:
        # A zero that depends on the previous group's gradients, added to this group's
        # deltas (fused into w + delta): XLA must finish that backward pass before this
        # forward pass. (An optimization_barrier does not order XLA:CPU's schedule.)
        ds = [None if x is None else x + tie.astype(x.dtype) for x in ds]
      divs, vjp = jax.vjp(lambda q, z: divs_of(tree(q, all_leaves), z, ds), fl, c)
      divs_g = _global_divs(divs, axis_name)  # under max, the global divergence decides
      if aggregation == "mean":
        gq, gz = vjp(jnp.full(divs.shape, 1.0 / k, divs.dtype))
        value = value + jnp.sum(divs_g) / k
        g_fl = [a + acc(b) for a, b in zip(g_fl, gq)]
        g_c = g_c + acc(gz)
      else:
        j = jnp.argmax(divs_g)
        gq, gz = vjp(jax.nn.one_hot(j, group, dtype=divs.dtype))
        d = divs_g[j]
        take = (d > value) | jnp.isnan(d)
        value = jnp.where(take, d, value)
        g_fl = [jnp.where(take, acc(b), a) for a, b in zip(g_fl, gq)]
        g_c = jnp.where(take, acc(gz), g_c)
      if unrolled:  # (lax.scan orders the groups itself)
        t = sum(g.reshape(-1)[0] for g in g_fl if g.size) + jnp.sum(g_c.reshape(-1)[:1])
        tie = jnp.where(jnp.isfinite(t), t, 0.0) * 0.0
      return (value, g_fl, g_c, tie), None

    dtype = jnp.promote_types(c.dtype, jnp.float32)
    start = jnp.zeros((), dtype) if aggregation == "mean" else jnp.full((), -jnp.inf, dtype)
    carry = (
      start,
      [jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for x in fl],
      jnp.zeros(c.shape, dtype),
      jnp.zeros((), dtype),
    )
    if unrolled:
      for ks in key_groups:
        carry, _ = visit(carry, ks)
    else:
      carry, _ = jax.lax.scan(visit, carry, key_groups)
    value, g_fl, g_c, _ = carry
    return value, (g_fl, g_c)

  def bwd(res, ct):
    g_fl, g_c = res
    it = iter(g_fl)
    ct_leaves = [
      (ct * next(it)).astype(x.dtype) if f else np.zeros(jnp.shape(x), jax.dtypes.float0)
      for x, f in zip(leaves, floats)
    ]
    ct_c = jnp.zeros(center.shape, center.dtype) if fixed_center else ct * g_c
    return ct_leaves, ct_c.astype(center.dtype)

  run.defvjp(fwd, bwd)
  return run(leaves, center)


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
    radius, num_neighbors, noise, scale, divergence, aggregation, mask,
      stop_gradient_center, strategy, neighbor_chunk_size: as in
      :func:`nrs_penalty`.
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
  validate_options(
    radius=radius,
    num_neighbors=num_neighbors,
    noise=noise,
    scale=scale,
    divergence=divergence,
    aggregation=aggregation,
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
  skip = _is_static_number(alpha) and float(alpha) == 0.0

  def logits_of(out):
    return out[0] if has_aux else out

  def loss(params, batch, key):
    out = apply_fn(params, batch)
    logits = logits_of(out)
    task = task_loss_fn(logits, batch)
    if skip:
      penalty = jnp.zeros((), jnp.promote_types(jnp.result_type(task), jnp.float32))
      total = task
    else:
      pen_batch, center = batch, logits
      if m is not None:
        pen_batch = strided_subset(batch, m, batch_size=jnp.shape(logits)[0])
        center = strided_subset(logits, m) if reuse_center_logits else None
      penalty = nrs_penalty(
        lambda p: logits_of(apply_fn(p, pen_batch)),
        params,
        key,
        radius=radius,
        num_neighbors=num_neighbors,
        noise=noise,
        scale=scale,
        divergence=divergence,
        aggregation=aggregation,
        mask=mask,
        stop_gradient_center=stop_gradient_center,
        strategy=strategy,
        neighbor_chunk_size=neighbor_chunk_size,
        center_logits=center,
        where=None if where_fn is None else where_fn(pen_batch),
      )
      total = task + alpha * penalty
    aux = {"task_loss": task, "nrs_penalty": penalty, "logits": logits}
    if has_aux:
      aux["model_aux"] = out[1]
    return total, aux

  return loss
