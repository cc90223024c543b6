"""Flax Linen helper: a ``TrainState`` whose ``apply_gradients`` forwards ``logits_fn``."""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state

__all__ = ("NRSTrainState",)


class NRSTrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` that passes extra args to ``tx.update``.

  Linen's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
  params)`` and cannot pass ``logits_fn``; this one forwards every keyword
  argument that is not a field of the state.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import nrs_jax
    >>> from nrs_jax.integrations.linen import NRSTrainState
    >>> model = nn.Dense(4)
    >>> x, y = jnp.ones((8, 3)), jnp.arange(8) % 4
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05), optax.sgd(0.1))
    >>> state = NRSTrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> logits_fn = lambda p: state.apply_fn({"params": p}, x)
    >>> loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits_fn(p), y).mean()
    >>> params0 = state.params
    >>> state = state.apply_gradients(grads=jax.grad(loss)(state.params),
    ...                               logits_fn=logits_fn)
    >>> want = nrs_jax.nrs_penalty(logits_fn, params0, jax.random.fold_in(jax.random.key(0), 0),
    ...                            radius=0.05)  # the transform's first update: fold_in(key, 0)
    >>> int(state.step), bool(jnp.isclose(state.opt_state[0].penalty, want, rtol=1e-3))
    (1, True)
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> NRSTrainState:
    fields = set(self.__dataclass_fields__)
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    new_params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **replace)
