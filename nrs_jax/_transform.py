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
  if logits_fn is None:  # (with reuse=..., None asks for a reuse step, not this check)
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


def _selected_grads(grads, selected, axis_name) -> list:
  """Per leaf (flatten order), the penalty gradient where selected (``pmean``-ed), else None."""
  mean = (lambda g: g) if axis_name is None else (lambda g: jax.lax.pmean(g, axis_name))
  return [mean(g) if s else None for g, s in zip(jax.tree_util.tree_leaves(grads), selected)]


def _add_selected(treedef, updates, terms: list, a):
  """``updates + a * term`` where a leaf of ``treedef`` (the params') has a term (``a == 0``:
  ``updates`` unchanged); ``updates`` may hold None at a leaf."""
  out = []
  for u, g in zip(treedef.flatten_up_to(updates), terms):
    if u is not None and g is not None:
      u = jnp.where(a == 0, u, u + (a * g).astype(u.dtype))
    out.append(u)
  return treedef.unflatten(out)


def _elements(params, mask) -> list:
  """Per leaf, the bool array of a per-element mask, else None (a whole leaf or none of it)."""
  return [m if isinstance(m, np.ndarray) else None for m in _neighbors.resolve_mask(params, mask)]


def _dot(xs: list, ys: list) -> jax.Array:
  """The float32 inner product over the leaves present in both lists."""
  pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
  f32 = lambda v: v.astype(jnp.promote_types(v.dtype, jnp.float32))
  return sum((jnp.vdot(f32(x), f32(y)) for x, y in pairs), jnp.zeros([], jnp.float32))


def _task_part(treedef, updates, terms: list, elements: list) -> list:
  """The incoming (task) gradient on the leaves, and elements, that have a penalty term."""
  out = []
  for u, g, e in zip(treedef.flatten_up_to(updates), terms, elements):
    out.append(None if g is None or u is None else (u if e is None else jnp.where(e, u, 0)))
  return out


class NRSState(NamedTuple):
  """State of :func:`add_nrs_gradient`: ``count`` (int32, the schedules' argument), ``key``
  (raw base key data, never changed: update ``t`` draws from ``fold_in(key, t //
  resample_every)``) and ``penalty`` (the last raw penalty, for logging; 0 when ``alpha`` is).
  With ``reuse``: ``reused``, the term a reuse step adds (a tree like params, None off the
  mask), ``task_norm``, the task gradient's norm at the refresh, and ``refreshed_at``, the
  count of the last refresh (-1 before any); without, the three are None.

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
  reused: Any = None
  task_norm: Any = None
  refreshed_at: Any = None


def _stored_term(rule: str, terms: list, task: list) -> tuple[list, jax.Array]:
  """What a refresh stores: the penalty gradient (``"plain"``), or its part orthogonal to the
  task gradient (``"orthogonal"``); and the task gradient's norm."""
  tt = _dot(task, task)
  if rule == "plain":
    return terms, jnp.sqrt(tt)
  c = jnp.where(tt > 0, _dot(terms, task) / jnp.where(tt > 0, tt, 1.0), 0.0)
  out = [None if g is None else g - (c * t).astype(g.dtype) for g, t in zip(terms, task)]
  return out, jnp.sqrt(tt)


def _reused_term(rule: str, state: NRSState, stored: list, task: list) -> list:
  """A reuse step's term: the stored one (``"orthogonal"``: times the task gradient's norm now
  over its norm at the refresh); NaN before any refresh (documented: never a silent zero)."""
  factor = jnp.ones([], jnp.float32)
  if rule == "orthogonal":
    now = jnp.sqrt(_dot(task, task))
    factor = jnp.where(
      state.task_norm > 0, now / jnp.where(state.task_norm > 0, state.task_norm, 1.0), 1.0
    )
  factor = jnp.where(state.refreshed_at >= 0, factor, jnp.nan)
  return [None if g is None else (factor * g).astype(g.dtype) for g in stored]


def _with_resolved_mask(options: _options.NRSOptions, params: Any) -> _options.NRSOptions:
  """A callable mask is called once per update: the penalty gets the tree it resolved to."""
  if options.mask is None or not _options.is_function(options.mask):
    return options
  resolved = _neighbors.resolve_mask(params, options.mask)
  treedef = jax.tree_util.tree_structure(params)
  return dataclasses.replace(options, mask=jax.tree_util.tree_unflatten(treedef, resolved))


def _check_not_inside_multisteps(reuse: str | None) -> None:
  """Inside ``optax.MultiSteps``: a ValueError with ``reuse`` (a refresh would store one
  micro-batch's gradient), else a warning (the penalty is the last micro-batch's)."""
  if not _inside_multisteps():
    return
  if reuse is not None:
    raise ValueError(
      f"add_nrs_gradient(reuse={reuse!r}) runs inside optax.MultiSteps, where each update "
      "sees one micro-batch's gradient: a refresh would store a partial one. Chain it "
      "outside, optax.chain(nrs_jax.add_nrs_gradient(..., reuse=..., resample_every=k), "
      "optax.MultiSteps(opt, k).gradient_transformation()), with "
      "nrs_jax.RefreshSchedule(every, accumulation_steps=k) choosing the refresh steps."
    )
  warnings.warn(
    "add_nrs_gradient runs inside optax.MultiSteps: its penalty is the last micro-batch's. "
    "For the accumulated batch's chain it outside, new neighbours every k micro-batches: "
    "optax.chain(nrs_jax.add_nrs_gradient(alpha, radius, resample_every=k), "
    "optax.MultiSteps(opt, k).gradient_transformation()).",
    stacklevel=3,
  )


def _with_nothing_stored(state: NRSState, params: Any, selected: list) -> NRSState:
  """The reuse fields before any refresh: zeros like the selected leaves, ``refreshed_at`` -1."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  zeros = [jnp.zeros_like(x) if m else None for x, m in zip(leaves, selected)]
  stored = jax.tree_util.tree_unflatten(treedef, zeros)
  never = jnp.full([], -1, jnp.int32)
  return state._replace(reused=stored, task_norm=jnp.zeros([], jnp.float32), refreshed_at=never)


def _stored(rule: str, treedef, state: NRSState, terms: list, task: list) -> NRSState:
  """``state`` after a refresh at ``state.count - 1``: the term its rule stores."""
  stored, norm = _stored_term(rule, terms, task)
  refreshed_at = state.count - 1
  return state._replace(reused=treedef.unflatten(stored), task_norm=norm, refreshed_at=refreshed_at)


def _refreshed(rule: str | None, updates, state: NRSState, params: Any, mask: Any, terms, a):
  """A refresh's updates (``terms`` added) and state (with ``rule``, the term it stores)."""
  treedef: Any = jax.tree_util.tree_structure(params)
  if rule is not None:
    state = _stored(
      rule, treedef, state, terms, _task_part(treedef, updates, terms, _elements(params, mask))
    )
  return _add_selected(treedef, updates, terms, a), state


def _reuse_step(rule: str, updates, state: NRSState, params: Any, mask: Any, count, a):
  """A reuse step (``logits_fn=None``): the stored term added by ``rule``; eagerly, a
  ValueError before any refresh."""
  if not isinstance(state.refreshed_at, jax.core.Tracer) and int(state.refreshed_at) < 0:
    raise ValueError(
      "add_nrs_gradient got a reuse step (logits_fn=None) before any refresh: nothing is "
      "stored yet. Make the first update a refresh (pass logits_fn), as "
      "nrs_jax.RefreshSchedule does at step 0."
    )
  like = updates if params is None else params
  treedef: Any = jax.tree_util.tree_structure(like)
  elements = _elements(like, mask)
  stored = treedef.flatten_up_to(state.reused)
  terms = _reused_term(rule, state, stored, _task_part(treedef, updates, stored, elements))
  return _add_selected(treedef, updates, terms, a), state._replace(count=count)


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
  reuse: str | None = None,
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
    reuse: ``None``, ``"plain"`` or ``"orthogonal"`` (LookSAM's rule): an ``update`` with
      ``logits_fn=None`` is then a reuse step, adding the last refresh's penalty gradient by
      that rule (:class:`RefreshSchedule` picks the steps on the host; docs: method, reuse).
      Before any refresh: a ValueError eagerly, a NaN term under ``jit`` (never zero).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`NRSState`.

  Raises:
    ValueError: at construction for an invalid option (``alpha`` or ``radius`` not a finite
      number >= 0, e.g. a string; an unknown choice; a non-int ``num_neighbors``); at
      ``init`` / ``update`` (trace time) for params with ``optax.MaskedNode`` leaves or no
      float leaf, a missing ``params`` or ``logits_fn`` (without ``reuse``), a mask or radius
      tree that does not fit params, logits that are not ``[..., C]`` (a tuple, a scalar, a
      1-d vector), and ``reuse`` inside ``optax.MultiSteps``.

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
  if reuse is not None:
    _options.check_choice("reuse", reuse, _options.REUSE_RULES)
  # The implementation of the base key (its data is made in init: no backend before).
  impl = None if isinstance(key, (int, np.integer)) else jax.random.key_impl(_neighbors.as_key(key))
  alpha_is_zero = _options.is_static_zero(alpha)
  radius_at = radius if _options.is_function(radius) else lambda _: radius

  def init_fn(params):
    _check_not_masked(params)
    zero = jnp.zeros([], jnp.float32)
    state = NRSState(jnp.zeros([], jnp.int32), jax.random.key_data(_neighbors.as_key(key)), zero)
    if not jax.tree_util.tree_leaves(params):  # (optax.tree_utils.tree_map_params: no leaves)
      return state
    s = _neighbors.Sampler(params, radius=radius_at(0), noise=noise, scale=scale, mask=mask)
    return state if reuse is None else _with_nothing_stored(state, params, s.selected)

  def update_fn(
    updates, state, params=None, *, logits_fn=None, center_logits=None, where=None, **extra_args
  ):
    del extra_args
    reuse_step = reuse is not None and logits_fn is None
    if not reuse_step:
      _check_update(params, logits_fn, center_logits, options)
    _check_not_inside_multisteps(reuse)
    count = optax.safe_int32_increment(state.count)
    if alpha_is_zero:
      return updates, state._replace(count=count, penalty=jnp.zeros([], jnp.float32))
    a = alpha(state.count) if callable(alpha) else alpha
    if reuse_step:
      return _reuse_step(reuse, updates, state, params, mask, count, a)
    base = jax.random.wrap_key_data(state.key, impl=impl)
    step_key = jax.random.fold_in(base, state.count // resample_every)
    opts = _with_resolved_mask(options, params)
    r, kw = radius_at(state.count), {"center_logits": center_logits, "where": where}
    penalty = lambda p: _penalty.penalty(
      opts, logits_fn, p, step_key, r, per_replica_neighbors, axis_name=axis_name, **kw
    )
    value, grads = jax.value_and_grad(penalty, allow_int=True)(params)
    terms = _selected_grads(grads, _neighbors.perturbed_leaf_mask(params, opts.mask), axis_name)
    new = state._replace(count=count, penalty=jnp.where(a == 0, 0.0, value).astype(jnp.float32))
    return _refreshed(reuse, updates, new, params, opts.mask, terms, a)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
  """The host-side schedule of ``add_nrs_gradient(reuse=...)``: ``schedule(step)`` is True on
  a refresh step (call ``update`` with ``logits_fn``), False on a reuse step
  (``logits_fn=None``). Step 0 refreshes; then every ``every``-th update, or with
  ``accumulation_steps=k`` (the transform chained outside ``optax.MultiSteps(opt, k)``) every
  micro-step of every ``every``-th accumulated update, never part of one.

  >>> s = RefreshSchedule(every=3)
  >>> [t for t in range(10) if s(t)]  # the refresh steps
  [0, 3, 6, 9]
  >>> [t for t in range(10) if RefreshSchedule(2, accumulation_steps=2)(t)]
  [0, 1, 4, 5, 8, 9]
  """

  every: int
  accumulation_steps: int = 1

  def __post_init__(self):
    for name in ("every", "accumulation_steps"):
      value = getattr(self, name)
      try:
        _options.check_positive_int(name, value)
      except ValueError:
        raise ValueError(
          f"RefreshSchedule({name}={value!r}): {name} must be a Python int >= 1 ("
          + (
            "every=1 refreshes on every update, which is full NRS; every=5 refreshes on one "
            "update in five)."
            if name == "every"
            else "the k of optax.MultiSteps(opt, k); 1 without accumulation)."
          )
        ) from None

  def __call__(self, step: int) -> bool:
    if isinstance(step, jax.core.Tracer):
      raise ValueError(
        "RefreshSchedule is decided on the host: call it with the Python int step outside "
        "jit, and run one of two jitted steps (with logits_fn, or with logits_fn=None)."
      )
    return (int(step) // self.accumulation_steps) % self.every == 0
