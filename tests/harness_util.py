"""Helpers for the harness tests (they need the experiments extras)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import optimizers
from experiments import train

_LAST: dict = {}  # the last run read: its final state, model and data (recomputations share it)


def final_state(config, workdir):
  """The run's ``final_state.npz`` as the harness's state tree, and the model and data. The
  last run read is kept (keyed by its config and file), so that a test's recomputations of
  the same run load the data and build the model once."""
  path = os.path.join(workdir, "final_state.npz")
  key = (config.to_json_best_effort(), path, os.stat(path).st_mtime_ns)
  if _LAST.get("key") != key:
    _LAST.clear()
    _LAST.update(key=key, value=_final_state(config, workdir))
  return _LAST["value"]


def _final_state(config, workdir):
  ds = train.load_data(config)
  model = train.Model(config, ds)
  tx = optimizers.make_optimizer(config, 1, ds.num_train, ds.num_classes)
  state = {
    "step": jnp.zeros([], jnp.int32),
    "params": model.params,
    "batch_stats": model.batch_stats,
    "opt_state": tx.init(model.params),
  }
  saved = np.load(os.path.join(workdir, "final_state.npz"))
  treedef = jax.tree_util.tree_structure(state)
  return treedef.unflatten([saved[k] for k in sorted(saved.files)]), model, ds


def _logits_in_chunks(final, model, data, rows):
  """``(logits, labels)`` of each chunk of ``rows`` examples: the model in evaluation mode,
  jitted here (not the harness's evaluation step); the labels as numpy."""
  apply = _LAST.get("apply") if _LAST.get("model") is model else None
  if apply is None:  # (one compilation per model and chunk shape)
    apply = jax.jit(lambda p, bs, x: model.apply(p, bs, x, False, None)[0])
    _LAST.update(model=model, apply=apply)
  for i in range(0, len(data.y), rows):
    x, y = data.x[i : i + rows], np.asarray(data.y[i : i + rows])
    yield np.asarray(apply(final["params"], final["batch_stats"], x)), y


def recomputed_test_accuracy(config, workdir, rows=256):
  """Test accuracy of the run's final_state.npz, recomputed here in one numpy pass."""
  final, model, ds = final_state(config, workdir)
  correct = count = 0
  for logits, y in _logits_in_chunks(final, model, ds.test, rows):
    valid = y >= 0  # (token-level padding)
    correct += int(np.sum((np.argmax(np.asarray(logits), -1) == y) & valid))
    count += int(np.sum(valid))
  return correct / count


def recomputed_loss(config, workdir, split="validation", rows=256):
  """Mean cross-entropy per valid token (label >= 0) of the run's final state on ``split``,
  in numpy (scipy's logsumexp): the reference for the recorded ``val_loss``/``test_loss``."""
  from scipy.special import logsumexp

  final, model, ds = final_state(config, workdir)
  total = count = 0.0
  for logits, y in _logits_in_chunks(final, model, getattr(ds, split), rows):
    z = np.asarray(logits, np.float64)
    picked = np.take_along_axis(z, np.maximum(y, 0)[..., None], -1)[..., 0]
    valid = y >= 0
    total += float(np.sum((logsumexp(z, -1) - picked)[valid]))
    count += float(np.sum(valid))
  return total / count
