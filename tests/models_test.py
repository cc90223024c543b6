"""Every model of experiments/models.py builds and trains one step in train mode (BatchNorm on
batch statistics, dropout on), under the Flax the install resolves and at the floor (this
file is in `make test-compat`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import models

# Small versions of each (what the configs build at full size), input shape, classes.
CASES = {
  "mlp": ((40,), dict(hidden=(16,), dropout=0.1)),
  "bn_mlp": ((40,), dict(hidden=(16, 16))),
  "cnn1d": ((40,), dict(channels=(4, 4), kernel=3)),
  "cnn": ((8, 8, 1), dict(channels=(4, 4), kernel=3)),
  "resnet18": ((8, 8, 3), dict(stage_sizes=(1, 1), width=4)),
  "resnet50": ((16, 16, 3), dict(width=2)),
  "wrn28_10": ((8, 8, 3), dict(depth=10, widen=1)),  # the paper's block, depth 10
  "vit": ((8, 8, 3), dict(patch=(4, 4), dim=8, depth=1, heads=2, mlp_dim=16, dropout=0.1)),
  "lm": ((6,), dict(dim=8, depth=1, heads=2, mlp_dim=16, dropout=0.1)),
}


def test_every_model_has_a_case():
  assert set(CASES) == set(models.MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_builds_and_trains_a_step(name):
  shape, kwargs = CASES[name]
  n_classes = 5
  model = models.create_model(name, shape, n_classes, 0, **kwargs)
  if name == "lm":
    x = jax.random.randint(jax.random.key(1), (4, *shape), 0, n_classes)
    y = x
  else:
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    y = jnp.arange(4) % n_classes
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = jax.tree_util.tree_map(np.array, nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer, key):
    def loss_fn(m):
      logits = m(x, train=True, dropout_key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  loss = step(model, optimizer, jax.random.key(2))
  assert np.isfinite(float(loss))
  after = nnx.state(model, nnx.Param)
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
  moved = jax.tree_util.tree_leaves(moved)
  # (ResNet-50's residual BatchNorm scales start at zero: the convolutions before them only
  # start moving on the second step.)
  assert any(moved) if name == "resnet50" else all(moved), f"{sum(moved)} of {len(moved)} moved"
  logits = model(x, train=False)
  assert logits.shape == (*y.shape, n_classes)
