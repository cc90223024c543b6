"""Shared fixtures: tiny models and data, small enough for 2 CPU cores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special


def enable_x64(on=True):
  """``jax.enable_x64`` (jax >= 0.8), or ``jax.experimental.enable_x64`` at the jax floor."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(on)
  from jax import experimental

  return experimental.enable_x64(on)


def key_data_tree(tree):
  """Typed PRNG keys as their key data (chex at its floor cannot compare typed keys)."""
  is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def mlp_init(key, sizes=(5, 8, 3), dtype=jnp.float32, zero_bias=False):
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(keys[i], (a, b), dtype) / np.sqrt(a)
    bias = jnp.zeros((b,), dtype) if zero_bias else 0.1 * jax.random.normal(keys[i], (b,), dtype)
    params[f"layer{i}"] = {"w": w, "b": bias}
  return params


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    x = x @ layer["w"] + layer["b"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


@pytest.fixture
def tiny():
  """A 5-8-3 MLP, a batch of 16 and its logits function."""
  key = jax.random.key(0)
  params = mlp_init(key)
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jnp.arange(16) % 3
  return params, x, y, (lambda p: mlp_apply(p, x))


def np_divergence(name, center_logits, neighbor_logits):
  """Independent float64 reference of each divergence (``[..., 1]``: Bernoulli)."""

  def probs(z):
    z = np.asarray(z, np.float64)
    if z.shape[-1] == 1:  # one binary logit: Bernoulli(sigmoid(z))
      p = special.expit(z)
      return np.concatenate([1 - p, p], -1)
    return special.softmax(z, -1)

  p, q = probs(center_logits), probs(neighbor_logits)
  kl = lambda a, b: special.rel_entr(a, b).sum(-1)
  if name == "kl":
    return kl(p, q)
  if name == "reverse_kl":
    return kl(q, p)
  if name == "symmetric_kl":
    return 0.5 * (kl(p, q) + kl(q, p))
  m = 0.5 * (p + q)
  return 0.5 * (kl(p, m) + kl(q, m))
