"""Equinox helpers: a logits function for :func:`nrs_jax.add_nrs_gradient`, and
flatness inputs for :mod:`nrs_jax.flatness` (needs Equinox: ``pip install ".[equinox]"`` from a
clone of this repository)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Optional

import equinox as eqx
import jax

__all__ = ("flatness_inputs", "logits_fn_for")


def _check_module(model: Any, fn: str) -> None:
  if not isinstance(model, eqx.Module):
    raise ValueError(
      f"{fn} takes an Equinox model (an eqx.Module) first, got {type(model).__name__}. "
      "For Flax use nrs_jax.integrations.nnx; for plain functions write the logits "
      "function yourself: lambda params: apply_fn(params, x)."
    )


def logits_fn_for(
  model: eqx.Module,
  x: Any,
  *,
  state: Optional[eqx.nn.State] = None,
  key: Optional[jax.Array] = None,
  axis_name: str = "batch",
) -> Callable[[Any], jax.Array]:
  """``params -> logits`` of ``model`` on the batch ``x``, for NRS.

  The model follows Equinox conventions: it maps one example,
  ``model(x_i, key=k_i)``, or ``model(x_i, state, key=k_i) -> (logits, state)``
  when given a ``state``; with ``key=None`` it is called without ``key``
  (``model(x_i)``, ``model(x_i, state)``), so key-less modules work as they are.
  The helper vmaps it over the batch under
  ``axis_name`` (BatchNorm's axis name). ``params`` is what optax sees:
  ``eqx.filter(model, eqx.is_inexact_array)``.

  Args:
    model: the Equinox model (its structure and non-array fields are kept).
    x: the batch, mapped over its leading axis.
    state: the ``eqx.nn.State`` the task pass starts from. It is copied now: the
      centre and every neighbour run on that copy, and the state they produce is
      discarded. (A task pass under ``jax.vmap`` or ``eqx.filter_jit`` leaves the
      caller's object usable; one that calls ``State.set`` on it, as an eager,
      unbatched call does, makes Equinox refuse it afterwards, the copy not.)
    key: the dropout key of the step; the per-example keys
      ``jax.random.split(key, len(x))`` are the same for the centre and every
      neighbour. ``None`` for a model without randomness or in
      ``eqx.nn.inference_mode``.
    axis_name: the name of the batch axis (``eqx.nn.BatchNorm(axis_name=...)``).

  Returns:
    ``logits_fn(params) -> logits [batch, ...]``.

  Raises:
    ValueError: if ``model`` is not an ``eqx.Module``. A model's own error reaches
      you as itself; an unbound axis name (BatchNorm under another ``axis_name``)
      carries a note naming this function's ``axis_name=``.

  .. note::
    Build it before the task pass, from the same ``state`` and ``key``, so the
    neighbours see the task pass's batch statistics mode and dropout masks.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax
    >>> import nrs_jax
    >>> from nrs_jax.integrations.equinox import logits_fn_for
    >>> model = eqx.nn.MLP(3, 4, 8, 1, key=jax.random.key(0))
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> params = eqx.filter(model, eqx.is_inexact_array)
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(
    ...     jax.vmap(m)(x), y).mean()
    >>> grads = eqx.filter_grad(loss)(model)
    >>> logits_fn = logits_fn_for(model, x)
    >>> updates, opt_state = tx.update(grads, opt_state, params, logits_fn=logits_fn)
    >>> model = eqx.apply_updates(model, updates)
    >>> want = nrs_jax.nrs_penalty(logits_fn, params, jax.random.fold_in(jax.random.key(0), 0),
    ...                            radius=0.05)  # the transform's first update: fold_in(key, 0)
    >>> int(opt_state[0].count), bool(jnp.isclose(opt_state[0].penalty, want, rtol=1e-3))
    (1, True)
  """
  _check_module(model, "logits_fn_for")
  _, static = eqx.partition(model, eqx.is_inexact_array)
  keys = None if key is None else jax.random.split(key, jax.tree_util.tree_leaves(x)[0].shape[0])
  if state is not None:
    state_leaves, state_def = jax.tree_util.tree_flatten(state)  # the copy

  def logits_fn(params):
    m = eqx.combine(params, static)
    try:
      if state is None:
        return jax.vmap(lambda xi, ki: _call(m, xi, ki), axis_name=axis_name)(x, keys)
      fresh = jax.tree_util.tree_unflatten(state_def, state_leaves)  # a new State per use
      run = jax.vmap(
        lambda xi, st, ki: _call(m, xi, ki, st),
        axis_name=axis_name,
        in_axes=(0, None, 0 if keys is not None else None),
        out_axes=(0, None),
      )
      return run(x, fresh, keys)[0]
    except NameError as e:
      if "unbound axis name" in str(e):
        e.add_note(
          f"nrs_jax.integrations.equinox.logits_fn_for maps the batch under axis_name="
          f"{axis_name!r}; pass the axis name the model's BatchNorm uses: "
          "logits_fn_for(model, x, state=state, axis_name=...)."
        )
      raise

  return logits_fn


def _call(m: Any, xi: Any, ki: Any, *state: Any) -> Any:
  """``m(xi[, state], key=ki)``; without a key, ``m(xi[, state])``, so that a module written
  ``__call__(self, x)`` (no ``key``) works too."""
  return m(xi, *state) if ki is None else m(xi, *state, key=ki)


def flatness_inputs(
  model: eqx.Module,
  loss_fn: Callable[..., Any],
  *,
  state: Optional[eqx.nn.State] = None,
) -> tuple[Callable[[Any, Any], Any], Any]:
  """``(loss(params, batch), params)`` for :mod:`nrs_jax.flatness`, from an Equinox model.

  The Hessian is taken over the model's inexact arrays, with the model in
  ``eqx.nn.inference_mode`` (BatchNorm's running statistics, no dropout).

  Args:
    model: the Equinox model (not changed).
    loss_fn: ``(model, batch) -> scalar``, or ``(model, state, batch) -> scalar``
      when ``state`` is given (a copy of it is passed each call).
    state: the model's ``eqx.nn.State``, if it has one.

  Returns:
    ``(loss(params, batch) -> scalar, params)``.

  Raises:
    ValueError: if ``model`` is not an ``eqx.Module``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax
    >>> from nrs_jax import flatness
    >>> from nrs_jax.integrations.equinox import flatness_inputs
    >>> model = eqx.nn.MLP(3, 4, 8, 1, key=jax.random.key(0))
    >>> batch = (jnp.ones((16, 3)), jnp.arange(16) % 4)
    >>> xent = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(
    ...     jax.vmap(m)(b[0]), b[1]).mean()
    >>> loss, params = flatness_inputs(model, xent)
    >>> r = flatness.top_hessian_eigenvalues(loss, params, batch, jax.random.key(0))
    >>> flat, unravel = jax.flatten_util.ravel_pytree(params)  # the exact Hessian, by jax
    >>> exact = jnp.linalg.eigvalsh(jax.hessian(lambda v: loss(unravel(v), batch))(flat))[-1]
    >>> r.eigenvalues.shape, bool(jnp.isclose(r.eigenvalues[0], exact, rtol=1e-3))
    ((1,), True)
  """
  _check_module(model, "flatness_inputs")
  params, static = eqx.partition(eqx.nn.inference_mode(model), eqx.is_inexact_array)
  if state is not None:
    state_leaves, state_def = jax.tree_util.tree_flatten(state)

  def loss(p, batch):
    m = eqx.combine(p, static)
    if state is None:
      return loss_fn(m, batch)
    return loss_fn(m, jax.tree_util.tree_unflatten(state_def, state_leaves), batch)

  return loss, params
