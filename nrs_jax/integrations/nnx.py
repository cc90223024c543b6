"""Flax NNX helpers for :func:`nrs_jax.add_nrs_gradient`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def logits_fn_for(
  model: nnx.Module, *args: Any, wrt: Any = nnx.Param, **kwargs: Any
) -> Callable[[Any], Any]:
  """``params -> model(*args, **kwargs)`` for the ``wrt`` state of ``model``.

  The returned function rebuilds the model from the given params and the
  model's current other state (BatchNorm statistics, ...), calls it and returns
  its output, leaving ``model`` untouched: neighbours never update running
  statistics. Pass it as ``logits_fn`` to ``nnx.Optimizer.update``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import nrs_jax
    >>> from nrs_jax.integrations.nnx import logits_fn_for
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    >>> grads = nnx.grad(loss)(model)
    >>> _ = optimizer.update(model, grads, logits_fn=logits_fn_for(model, x))
  """
  graphdef, _, rest = nnx.split(model, wrt, ...)

  def logits_fn(params):
    return nnx.merge(graphdef, params, rest)(*args, **kwargs)

  return logits_fn
