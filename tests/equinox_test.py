"""nrs_jax.integrations.equinox: a CNN with BatchNorm and Dropout, as Equinox users write it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import nrs_jax
from nrs_jax import flatness
from nrs_jax.integrations.equinox import flatness_inputs
from nrs_jax.integrations.equinox import logits_fn_for


class CNN(eqx.Module):
  conv: eqx.nn.Conv2d
  bn: eqx.nn.BatchNorm
  dropout: eqx.nn.Dropout
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
    self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch")
    self.dropout = eqx.nn.Dropout(0.3)
    self.head = eqx.nn.Linear(4 * 6 * 6, 3, key=k2)

  def __call__(self, x, state, *, key=None):
    h, state = self.bn(jax.nn.relu(self.conv(x)), state)
    return self.head(self.dropout(h.reshape(-1), key=key)), state


def _data(n=8):
  x = jax.random.normal(jax.random.key(1), (n, 1, 6, 6))
  return x, jnp.arange(n) % 3


def _task_pass(model, state, x, y, key):
  """The user's loss: returns the loss and (new state, logits)."""
  keys = jax.random.split(key, x.shape[0])
  run = jax.vmap(
    lambda xi, st, ki: model(xi, st, key=ki), (0, None, 0), (0, None), axis_name="batch"
  )
  logits, new_state = run(x, state, keys)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, (new_state, logits)


@eqx.filter_jit
def _step(model, state, opt_state, tx, x, y, key):
  logits_fn = logits_fn_for(model, x, state=state, key=key)  # before the task pass
  (loss, (state, _)), grads = eqx.filter_value_and_grad(_task_pass, has_aux=True)(
    model, state, x, y, key
  )
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, logits_fn=logits_fn)
  return eqx.apply_updates(model, updates), state, opt_state, loss


def test_cnn_with_batchnorm_and_dropout_trains_under_filter_jit():
  model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
  tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.05, num_neighbors=2), optax.adam(1e-2))
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  x, y = _data()
  losses = []
  for i in range(12):
    model, state, opt_state, loss = _step(model, state, opt_state, tx, x, y, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses
  assert float(opt_state[0].penalty) > 0


def test_centre_reproduces_the_task_pass_and_state_is_left_to_the_task_pass():
  model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
  x, y = _data()
  key = jax.random.key(3)
  logits_fn = logits_fn_for(model, x, state=state, key=key)
  _, (new_state, logits) = _task_pass(model, state, x, y, key)
  params = eqx.filter(model, eqx.is_inexact_array)
  np.testing.assert_array_equal(logits_fn(params), logits)  # same state copy, same masks
  np.testing.assert_allclose(jax.jit(logits_fn)(params), logits, rtol=1e-5, atol=1e-6)
  # a neighbour's pass does not touch the task pass's new state
  before = [np.asarray(v) for v in jax.tree_util.tree_leaves(new_state)]
  nrs_jax.nrs_penalty(logits_fn, params, jax.random.key(0), radius=0.1, num_neighbors=2)
  for a, b in zip(before, jax.tree_util.tree_leaves(new_state)):
    np.testing.assert_array_equal(a, b)


def test_neighbours_share_the_centres_dropout_masks():
  model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
  x, _ = _data()
  params = eqx.filter(model, eqx.is_inexact_array)
  fn = logits_fn_for(model, x, state=state, key=jax.random.key(5))
  tiny = nrs_jax.nrs_penalty(fn, params, jax.random.key(0), radius=1e-6)
  other = logits_fn_for(model, x, state=state, key=jax.random.key(6))
  masks_differ = nrs_jax.output_divergence(fn(params), other(params))
  assert float(tiny) < 1e-6 < float(masks_differ)


def test_when_equinox_refuses_an_old_state_and_the_helper_still_works():
  """What the tutorial says about "Attempted to use old state", checked: a vmapped task pass
  (as in the tutorial) leaves the caller's ``state`` usable, so building the helper after it
  works too; an eager, unbatched call that sets state on that object makes Equinox refuse it,
  and a helper built before still runs on its copy."""

  class Counting(eqx.Module):  # a layer with state (a counter), set on every call
    lin: eqx.nn.Linear
    index: eqx.nn.StateIndex

    def __init__(self, key):
      self.lin = eqx.nn.Linear(36, 3, key=key)
      self.index = eqx.nn.StateIndex(jnp.zeros(()))

    def __call__(self, x, state, *, key=None):
      count = state.get(self.index)
      return self.lin(x.reshape(-1)) + 0.0 * count, state.set(self.index, count + 1)

  model, state = eqx.nn.make_with_state(Counting)(jax.random.key(0))
  x, _ = _data()
  params = eqx.filter(model, eqx.is_inexact_array)
  before = logits_fn_for(model, x, state=state, key=jax.random.key(3))
  want = before(params)
  run = jax.vmap(lambda xi, st: model(xi, st, key=None), (0, None), (0, None))
  run(x, state)  # the tutorial's kind of task pass: Equinox sets state on a copy
  after = logits_fn_for(model, x, state=state, key=jax.random.key(3))
  np.testing.assert_array_equal(after(params), want)
  model(x[0], state, key=jax.random.key(0))  # eager and unbatched: sets state on `state`
  with pytest.raises(ValueError, match="Attempted to use old state"):
    model(x[0], state, key=jax.random.key(0))
  np.testing.assert_array_equal(before(params), want)  # the helper's copy is unaffected


def test_inference_mode_model_without_key_or_state():
  model = eqx.nn.inference_mode(
    eqx.nn.Sequential([eqx.nn.Linear(5, 8, key=jax.random.key(0)), eqx.nn.Dropout(0.5)])
  )
  x = jax.random.normal(jax.random.key(1), (6, 5))
  params = eqx.filter(model, eqx.is_inexact_array)
  fn = logits_fn_for(model, x)
  np.testing.assert_allclose(fn(params), jax.vmap(model)(x), rtol=1e-6)
  assert float(nrs_jax.nrs_penalty(fn, params, jax.random.key(0), radius=0.1)) > 0


def test_an_equinox_module_of_bools_is_a_mask_tree_and_masked_leaves_pass_through():
  model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  # A Module (callable) whose leaves are bools: optax's rule says a tree, never a function.
  mask = jax.tree_util.tree_map(lambda _: True, params)
  mask = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias), mask, (False, False))
  assert callable(mask)
  x = jax.random.normal(jax.random.key(1), (8, 4))
  tx = nrs_jax.add_nrs_gradient(1.0, 0.1, mask=mask)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params, logits_fn=logits_fn_for(model, x))
  np.testing.assert_array_equal(updates.layers[0].weight, grads.layers[0].weight)
  np.testing.assert_array_equal(updates.layers[0].bias, grads.layers[0].bias)
  assert not np.array_equal(updates.layers[1].weight, grads.layers[1].weight)


@pytest.mark.slow
def test_flatness_inputs_hvp_matches_the_exact_hessian():
  model = eqx.nn.MLP(3, 2, 4, 1, activation=jnp.tanh, key=jax.random.key(0))
  batch = (jax.random.normal(jax.random.key(1), (16, 3)), jnp.arange(16) % 2)
  xent = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(
    jax.vmap(m)(b[0]), b[1]
  ).mean()
  loss, params = flatness_inputs(model, xent)
  flat, unravel = ravel_pytree(params)
  exact = jax.hessian(lambda v: loss(unravel(v), batch))(flat)
  v = jax.random.normal(jax.random.key(2), flat.shape)
  got = flatness.hvp(loss, params, unravel(v), batch)
  np.testing.assert_allclose(ravel_pytree(got)[0], exact @ v, rtol=1e-4, atol=1e-6)


def test_flatness_inputs_with_state_runs_batchnorm_in_inference_mode():
  model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
  x, y = _data()

  def xent(m, st, b):
    logits, _ = jax.vmap(lambda xi: m(xi, st), axis_name="batch")(b[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

  loss, params = flatness_inputs(model, xent, state=state)
  one = (x[:1], y[:1])
  got = float(loss(params, one))
  np.testing.assert_allclose(got, float(xent(eqx.nn.inference_mode(model), state, one)), rtol=1e-6)
  train_bn = eqx.tree_at(lambda m: m.dropout, model, eqx.nn.Dropout(0.3, inference=True))
  assert abs(got - float(xent(train_bn, state, one))) > 1e-3  # train mode: batch statistics


def test_not_an_equinox_module_is_a_clear_error():
  with pytest.raises(ValueError, match="takes an Equinox model"):
    logits_fn_for(lambda x: x, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="takes an Equinox model"):
    flatness_inputs({"w": jnp.ones(2)}, lambda m, b: 0.0)


class _KeylessMLP(eqx.Module):
  """Common Equinox style: ``__call__(self, x)``, no ``key`` argument at all."""

  lin: eqx.nn.Linear

  def __init__(self, key):
    self.lin = eqx.nn.Linear(3, 4, key=key)

  def __call__(self, x):
    return self.lin(x)


class _KeylessWithState(eqx.Module):
  """``__call__(self, x, state)``, BatchNorm, no ``key``."""

  lin: eqx.nn.Linear
  bn: eqx.nn.BatchNorm

  def __init__(self, key, axis_name="batch"):
    self.lin = eqx.nn.Linear(3, 4, key=key)
    self.bn = eqx.nn.BatchNorm(4, axis_name=axis_name, mode="batch")

  def __call__(self, x, state):
    return self.bn(self.lin(x), state)


class _KeyedMLP(_KeylessMLP):
  def __call__(self, x, *, key=None):
    return self.lin(x) + (0.0 if key is None else jax.random.normal(key, (4,)))


@pytest.mark.parametrize(
  "make, with_state, with_key",
  [
    (_KeylessMLP, False, False),
    (_KeyedMLP, False, False),
    (_KeyedMLP, False, True),
    (_KeylessWithState, True, False),
    (CNN, True, True),
  ],
)
def test_keyless_and_key_taking_modules_with_and_without_state(make, with_state, with_key):
  model = make(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (8, 1, 6, 6) if make is CNN else (8, 3))
  state = eqx.nn.State(model) if with_state else None
  key = jax.random.key(2) if with_key else None
  logits_fn = logits_fn_for(model, x, state=state, key=key)
  params = eqx.filter(model, eqx.is_inexact_array)
  # The centre is the user's own vmapped call, written out.
  keys = None if key is None else jax.random.split(key, 8)
  k_axis = None if keys is None else 0
  if state is None:
    f = (lambda xi, ki: model(xi)) if key is None else (lambda xi, ki: model(xi, key=ki))
    want = jax.vmap(f, in_axes=(0, k_axis), axis_name="batch")(x, keys)
  else:
    f = (
      (lambda xi, st, ki: model(xi, st))
      if key is None
      else (lambda xi, st, ki: model(xi, st, key=ki))
    )
    run = jax.vmap(f, in_axes=(0, None, k_axis), out_axes=(0, None), axis_name="batch")
    want = run(x, eqx.nn.State(model), keys)[0]
  np.testing.assert_allclose(np.asarray(logits_fn(params)), np.asarray(want), rtol=1e-6)
  pen = jax.jit(lambda p: nrs_jax.nrs_penalty(logits_fn, p, jax.random.key(3), radius=0.1))
  assert float(pen(params)) > 0


def test_an_unbound_batchnorm_axis_name_carries_a_note_naming_axis_name():
  model = _KeylessWithState(jax.random.key(0), axis_name="examples")
  state = eqx.nn.State(model)
  logits_fn = logits_fn_for(model, jnp.ones((4, 3)), state=state)
  with pytest.raises(NameError) as info:
    logits_fn(eqx.filter(model, eqx.is_inexact_array))
  assert "axis_name=" in "".join(getattr(info.value, "__notes__", []))
