"""Helpers for the harness tests (they need the experiments extras)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import methods
from experiments import train


def recomputed_test_accuracy(config, workdir, rows=256):
  """Test accuracy of the run's final_state.npz, recomputed here in one numpy pass."""
  ds = train.load_data(config)
  model = train.Model(config, ds)
  tx = methods.make_optimizer(config, 1, ds.num_train, ds.num_classes)
  state = {
    "step": jnp.zeros([], jnp.int32),
    "params": model.params,
    "batch_stats": model.batch_stats,
    "opt_state": tx.init(model.params),
  }
  saved = np.load(os.path.join(workdir, "final_state.npz"))
  treedef = jax.tree_util.tree_structure(state)
  final = treedef.unflatten([saved[k] for k in sorted(saved.files)])
  correct = count = 0
  for i in range(0, len(ds.test.y), rows):
    x, y = ds.test.x[i : i + rows], np.asarray(ds.test.y[i : i + rows])
    logits, _ = model.apply(final["params"], final["batch_stats"], x, False, None)
    valid = y >= 0  # (token-level padding)
    correct += int(np.sum((np.argmax(np.asarray(logits), -1) == y) & valid))
    count += int(np.sum(valid))
  return correct / count
