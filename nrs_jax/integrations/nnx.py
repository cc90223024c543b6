"""Flax NNX helpers: a logits function for :func:`nrs_jax.add_nrs_gradient`, and
flatness inputs for :mod:`nrs_jax.flatness`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

__all__ = ("flatness_inputs", "logits_fn_for")


def _check_module(model: Any, fn: str) -> None:
  if not isinstance(model, nnx.Module):
    raise ValueError(
      f"{fn} takes a Flax NNX model (an nnx.Module) first, got {type(model).__name__}. "
      "For Linen or plain functions write the logits function yourself: "
      "lambda params: apply_fn(params, x)."
    )


def _frozen_split(node: Any, *filters: Any) -> tuple:
  """``nnx.split`` whose states are copies: later updates of ``node`` do not show in them.

  (Since Flax 0.12 a split ``State`` holds the model's own ``Variable`` objects,
  so a task pass that runs after the split would update the "snapshot" too.)
  """
  graphdef, *states = nnx.split(node, *filters)
  return (graphdef, *[jax.tree_util.tree_map(lambda x: x, st) for st in states])


def _snapshot_rngs(tree: Any) -> tuple[Callable[[], Any], bool]:
  """Freezes the ``nnx.Rngs`` in ``tree``; returns a rebuild function (fresh copies)."""
  is_rngs = lambda x: isinstance(x, nnx.Rngs)
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_rngs)
  frozen = [_frozen_split(x) if is_rngs(x) else None for x in leaves]

  def rebuild():
    out = [nnx.merge(*f, copy=True) if f is not None else x for x, f in zip(leaves, frozen)]
    return jax.tree_util.tree_unflatten(treedef, out)

  return rebuild, any(f is not None for f in frozen)


def logits_fn_for(
  model: nnx.Module, *args: Any, wrt: Any = nnx.Param, **kwargs: Any
) -> Callable[[Any], Any]:
  """``params -> model(*args, **kwargs)``, replaying the model's state as it is now.

  Call it **before** the task pass of the step. It snapshots the model's
  non-``wrt`` state (BatchNorm statistics, the counters of Dropout's own
  ``rngs``, and any ``nnx.Rngs`` passed in ``args``/``kwargs``); every call of
  the returned function rebuilds a copy of the model from the given params and
  that snapshot. So the neighbours see exactly the dropout masks and the
  BatchNorm mode of the task pass that follows, and never change the model:
  running statistics and RNG counters are updated by the task pass only. Works
  in train and eval mode, inside ``nnx.jit``, ``nnx.grad`` and
  ``nnx.value_and_grad``.

  Args:
    model: the NNX model (``nnx.Module``).
    args: the positional and keyword arguments (``*args, **kwargs``) the task
      pass calls ``model`` with: the batch, and an ``rngs=`` if you pass one.
    wrt: the filter of the state that ``params`` replaces (``nnx.Param``, as
      in ``nnx.Optimizer(..., wrt=nnx.Param)``).

  Returns:
    ``logits_fn(params) -> logits``, for ``optimizer.update(model, grads,
    logits_fn=...)`` or :func:`nrs_jax.nrs_penalty`.

  Raises:
    ValueError: if ``model`` is not an ``nnx.Module``.

  .. note::
    Order matters with Dropout: taken after the task pass, the snapshot holds
    advanced RNG counters and the neighbours draw other masks than the centre,
    so the penalty measures dropout noise as well as weight sensitivity.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import nrs_jax
    >>> from nrs_jax.integrations.nnx import logits_fn_for
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.linear = nnx.Linear(3, 4, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(4, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.dropout(self.bn(self.linear(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   logits_fn = logits_fn_for(model, x)  # before the task pass
    ...   loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    ...   grads = nnx.grad(loss)(model)
    ...   optimizer.update(model, grads, logits_fn=logits_fn)
    >>> before = nnx.clone(model)  # the same weights, statistics and dropout RNG state
    >>> train_step(model, optimizer, x, y)
    >>> want = nrs_jax.nrs_penalty(logits_fn_for(before, x), nnx.state(before, nnx.Param),
    ...                            jax.random.fold_in(jax.random.key(0), 0), radius=0.05)
    >>> int(optimizer.opt_state[0].count), bool(jnp.isclose(optimizer.opt_state[0].penalty, want, rtol=1e-3))
    (1, True)
  """
  _check_module(model, "logits_fn_for")
  graphdef, _, rest = _frozen_split(model, wrt, ...)
  rebuild_inputs, _ = _snapshot_rngs((args, kwargs))

  def logits_fn(params):
    m = nnx.merge(graphdef, params, rest, copy=True)
    a, kw = rebuild_inputs()
    return m(*a, **kw)

  return logits_fn


def flatness_inputs(
  model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], Any], *, wrt: Any = nnx.Param
) -> tuple[Callable[[Any, Any], Any], Any]:
  """``(loss(params, batch), params)`` for :mod:`nrs_jax.flatness`, from an NNX model.

  The Hessian of a trained model is taken over its parameters only (not the
  BatchNorm running statistics, which are state, not weights) with the model
  in eval mode (running statistics, no dropout). ``model`` itself is not
  changed: a copy is switched to eval mode.

  Args:
    model: the NNX model.
    loss_fn: ``(model, batch) -> scalar``, your loss on a batch.
    wrt: which state the Hessian is taken over (default ``nnx.Param``).

  Returns:
    ``(loss(params, batch) -> scalar, params)``: pass both to
    :func:`nrs_jax.flatness.top_hessian_eigenvalues`, ``hessian_trace``,
    ``layerwise_hessian(group="module")`` and the rest.

  Raises:
    ValueError: if ``model`` is not an ``nnx.Module``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from nrs_jax import flatness
    >>> from nrs_jax.integrations.nnx import flatness_inputs
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    >>> batch = (jnp.ones((16, 3)), jnp.arange(16) % 4)
    >>> xent = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()
    >>> loss, params = flatness_inputs(model, xent)
    >>> r = flatness.top_hessian_eigenvalues(loss, params, batch, jax.random.key(0))
    >>> flat, unravel = jax.flatten_util.ravel_pytree(params)  # the exact Hessian, by jax
    >>> exact = jnp.linalg.eigvalsh(jax.hessian(lambda v: loss(unravel(v), batch))(flat))[-1]
    >>> r.eigenvalues.shape, bool(jnp.isclose(r.eigenvalues[0], exact, rtol=1e-3))
    ((1,), True)
  """
  _check_module(model, "flatness_inputs")
  frozen = nnx.clone(model)
  frozen.eval()
  graphdef, params, rest = _frozen_split(frozen, wrt, ...)

  def loss(p, batch):
    return loss_fn(nnx.merge(graphdef, p, rest, copy=True), batch)

  return loss, params
