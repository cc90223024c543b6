"""Tutorial code: sklearn's 8x8 digits, a Flax NNX CNN with BatchNorm and Dropout in the
style of the Flax tutorial, trained with optax with or without NRS.

Used by the tutorials "Flax NNX: a CNN with BatchNorm and Dropout" (which shows it) and
"Is my minimum flat?" (which reuses it).
"""

import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import nrs_jax
from nrs_jax.integrations.nnx import logits_fn_for


def load_data(num_train=1400, seed=0):
  """(x_train, y_train), (x_test, y_test): images [N, 8, 8, 1] in [0, 1], labels [N]."""
  digits = load_digits()  # bundled with scikit-learn: no download
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  return (x[:num_train], y[:num_train]), (x[num_train:], y[num_train:])


class CNN(nnx.Module):
  """Conv-BatchNorm-ReLU twice, average pooling, Dropout, a linear head."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.linear = nnx.Linear(32 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), window_shape=(2, 2), strides=(2, 2))
    return self.linear(self.dropout(x.reshape(x.shape[0], -1)))


def make_optimizer(model, *, nrs: bool, learning_rate=0.05, alpha=1.0, radius=0.05):
  """SGD with momentum and weight decay; with ``nrs``, NRS first in the chain."""
  first = [nrs_jax.add_nrs_gradient(alpha=alpha, radius=radius, key=0)] if nrs else []
  tx = optax.chain(*first, optax.add_decayed_weights(5e-4), optax.sgd(learning_rate, momentum=0.9))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  # The logits function is taken BEFORE the task pass: it snapshots BatchNorm statistics
  # and Dropout's RNG state, so the neighbours replay the task pass's masks and batch
  # statistics and never update the model. (A plain optax chain ignores it.)
  logits_fn = logits_fn_for(model, x)
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, logits_fn=logits_fn)
  return loss


@nnx.jit
def evaluate(model, x, y):
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, (logits.argmax(-1) == y).mean()


def train(*, nrs: bool, epochs=20, batch_size=64, seed=0, **optimizer_kwargs):
  """Trains a CNN; returns (model, per-epoch history of losses and accuracies)."""
  (x_train, y_train), (x_test, y_test) = load_data()
  model = CNN(rngs=nnx.Rngs(seed))
  optimizer = make_optimizer(model, nrs=nrs, **optimizer_kwargs)
  rng = np.random.default_rng(seed)
  history = []
  for epoch in range(1, epochs + 1):
    model.train()  # BatchNorm on batch statistics, Dropout on
    perm = rng.permutation(len(x_train))
    for i in range(0, len(perm) - batch_size + 1, batch_size):
      idx = perm[i : i + batch_size]
      train_step(model, optimizer, x_train[idx], y_train[idx])
    model.eval()  # running statistics, no dropout
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    history.append(
      {
        "epoch": epoch,
        "train_loss": float(train_loss),
        "train_accuracy": float(train_acc),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
      }
    )
  return model, history
