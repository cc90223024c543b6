"""NRS in the code Flax users write: the NNX tutorial CNN (Conv, BatchNorm, Dropout with
its own rngs) in train mode under nnx.jit, and a Linen TrainState loop."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nrs_jax
from nrs_jax.integrations.nnx import flatness_inputs
from nrs_jax.integrations.nnx import logits_fn_for
from tests.conftest import key_data_tree


class CNN(nnx.Module):
  """The Flax NNX MNIST tutorial's CNN, shrunk to 8x8 inputs."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.1, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(2 * 2 * 16, 32, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    return self.linear2(x)


def _data(n=64, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, n)
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32) + y[:, None, None, None] / 5.0
  return jnp.asarray(x), jnp.asarray(y)


def _loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


def _tx(alpha=1.0, **kw):
  return optax.chain(nrs_jax.add_nrs_gradient(alpha, 0.05, **kw), optax.sgd(0.05, momentum=0.9))


# The README's NNX recipe: the logits function is taken before the task pass, so its
# neighbours replay the task pass's dropout masks and batch statistics.
@nnx.jit
def train_step(model, optimizer, x, y):
  logits_fn = logits_fn_for(model, x)
  (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
  optimizer.update(model, grads, logits_fn=logits_fn)
  return loss


@nnx.jit
def train_step_fixed_centre(model, optimizer, x, y):
  logits_fn = logits_fn_for(model, x)
  (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, x, y)
  optimizer.update(model, grads, logits_fn=logits_fn, center_logits=logits)
  return loss


@pytest.mark.parametrize("fixed_centre", [False, True])
@pytest.mark.slow_cases("True")
def test_nnx_tutorial_cnn_trains_in_train_mode(fixed_centre):
  model = CNN(rngs=nnx.Rngs(0))
  model.train()
  tx = _tx(stop_gradient_center=fixed_centre)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step = train_step_fixed_centre if fixed_centre else train_step
  x, y = _data()
  losses = [float(step(model, optimizer, x, y)) for _ in range(25)]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  nrs_state = optimizer.opt_state[0]
  assert int(nrs_state.count) == 25 and float(nrs_state.penalty) > 0


def test_nnx_neighbours_never_change_model_state():
  x, y = _data()
  model = CNN(rngs=nnx.Rngs(0))
  model.train()
  reference = nnx.clone(model)
  optimizer = nnx.Optimizer(model, _tx(num_neighbors=2), wrt=nnx.Param)
  train_step(model, optimizer, x, y)
  # The centre pass alone on a clone: the same BatchNorm statistics and RNG counters.
  nnx.jit(lambda m: _loss(m, x, y))(reference)
  chex.assert_trees_all_close(
    nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat), rtol=1e-6
  )
  chex.assert_trees_all_equal(
    key_data_tree(nnx.state(model, nnx.RngState)), key_data_tree(nnx.state(reference, nnx.RngState))
  )


def test_nnx_logits_fn_replays_the_task_pass_exactly():
  x, y = _data()
  model = CNN(rngs=nnx.Rngs(0))
  model.train()

  @nnx.jit
  def both(model):
    logits_fn = logits_fn_for(model, x)
    _, logits = _loss(model, x, y)  # the task pass: draws masks, updates statistics
    return logits, logits_fn(nnx.state(model, nnx.Param))

  task, replay = both(model)
  np.testing.assert_allclose(replay, task, rtol=1e-6, atol=1e-6)
  # Dropout is really on: a second task pass draws other masks.
  again, _ = both(model)
  assert not np.allclose(again, task)


def test_nnx_passed_rngs_are_replayed_too():
  x, y = _data()
  model = CNN(rngs=nnx.Rngs(0))
  model.train()
  rngs = nnx.Rngs(dropout=5)

  @nnx.jit
  def both(model, rngs):
    logits_fn = logits_fn_for(model, x, rngs=rngs)
    task = model(x, rngs=rngs)
    return task, logits_fn(nnx.state(model, nnx.Param))

  task, replay = both(model, rngs)
  np.testing.assert_allclose(replay, task, rtol=1e-6, atol=1e-6)


def test_nnx_eval_mode_and_value_and_grad_of_the_penalty():
  x, _ = _data(16)
  model = CNN(rngs=nnx.Rngs(0))
  model.eval()

  @nnx.jit
  def pen(model):
    logits_fn = logits_fn_for(model, x)
    params = nnx.state(model, nnx.Param)
    return jax.value_and_grad(
      lambda p: nrs_jax.nrs_penalty(logits_fn, p, jax.random.key(0), radius=0.05)
    )(params)

  before = nnx.state(model)
  value, grads = pen(model)
  assert float(value) > 0
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(
    nnx.state(model, nnx.Param)
  )
  chex.assert_trees_all_equal(key_data_tree(nnx.state(model)), key_data_tree(before))


def test_logits_fn_for_rejects_what_is_not_a_module():
  with pytest.raises(ValueError, match="nnx.Module"):
    logits_fn_for(lambda x: x, jnp.ones(3))


@pytest.mark.slow
def test_flatness_inputs_match_a_split_by_hand():
  from nrs_jax import flatness

  x, y = _data(32)
  model = CNN(rngs=nnx.Rngs(0))
  model.train()
  nnx.jit(lambda m: _loss(m, x, y))(model)  # some non-trivial running statistics
  loss_fn, params = flatness_inputs(model, lambda m, b: _loss(m, *b)[0])
  graphdef, by_hand, rest = nnx.split(model, nnx.Param, ...)

  def reference(p, b):
    m = nnx.merge(graphdef, p, rest, copy=True)
    m.eval()
    return _loss(m, *b)[0]

  chex.assert_trees_all_equal(params, by_hand)
  np.testing.assert_allclose(loss_fn(params, (x, y)), reference(by_hand, (x, y)), rtol=1e-6)
  got = flatness.top_hessian_eigenvalues(loss_fn, params, (x, y), jax.random.key(0), num_iters=12)
  want = flatness.top_hessian_eigenvalues(
    reference, by_hand, (x, y), jax.random.key(0), num_iters=12
  )
  np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=1e-4)
  # No BatchNorm statistic among the parameters, and the model is left in train mode.
  assert not any("mean" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
  assert model.dropout1.deterministic is False
  groups = flatness.layerwise_hessian(
    loss_fn, params, (x, y), jax.random.key(0), group="module", num_iters=3, num_samples=2
  )
  names = {k.split("/")[1] for k in groups if k.count("/") >= 2}
  assert {"conv1", "batch_norm1", "linear2"} <= names, sorted(groups)


def test_linen_train_state_with_batchnorm_and_dropout():
  import flax.linen as nn

  from nrs_jax.integrations.linen import NRSTrainState

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(32)(x.reshape(x.shape[0], -1))
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
      return nn.Dense(10)(x)

  class TrainState(NRSTrainState):
    batch_stats: dict

  x, y = _data()
  net = Net()
  variables = net.init(jax.random.key(0), x, train=False)
  state = TrainState.create(
    apply_fn=net.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=_tx(),
  )

  @jax.jit
  def step(state, x, y, dropout_key):
    def logits_and_stats(params):
      return state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        x,
        train=True,
        rngs={"dropout": dropout_key},
        mutable=["batch_stats"],
      )

    def loss(params):
      logits, updates = logits_and_stats(params)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, updates)

    (task, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    # Neighbours: train mode on the batch, the task pass's dropout rng, statistics
    # discarded (mutable=False is not allowed with BatchNorm in train mode; the
    # updated statistics are simply dropped).
    logits_fn = lambda p: logits_and_stats(p)[0]
    replay = logits_fn(state.params)
    state = state.apply_gradients(
      grads=grads, logits_fn=logits_fn, batch_stats=updates["batch_stats"]
    )
    return state, task, logits, replay

  state0 = state
  losses = []
  for i in range(25):
    state, task, _, _ = step(state, x, y, jax.random.key(i))
    losses.append(float(task))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  assert float(state.opt_state[0].penalty) > 0

  # One step: statistics are the centre pass's; the neighbours' logits function
  # replays the task pass exactly (same dropout mask, same batch statistics).
  new, _, logits, replay = step(state0, x, y, jax.random.key(7))
  np.testing.assert_allclose(replay, logits, rtol=1e-6, atol=1e-6)
  _, ref_updates = net.apply(
    {"params": state0.params, "batch_stats": state0.batch_stats},
    x,
    train=True,
    rngs={"dropout": jax.random.key(7)},
    mutable=["batch_stats"],
  )
  chex.assert_trees_all_close(new.batch_stats, ref_updates["batch_stats"], rtol=1e-6)
