"""Shared fixtures: tiny models and data, small enough for 2 CPU cores."""

import os
import tempfile

# One XLA compilation cache for the run's processes (both xdist workers and the tests'
# subprocesses): many tests compile the same small programs. Set before JAX reads it.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nrs_jax_tests_xla")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import special  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


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


def assert_trees_f32_close(actual, desired, rtol=1e-5, scale_tol=1e-5, err_msg=""):
  """Float32 leaves of two programs that compute the same thing (jitted and eager, one
  strategy and another). XLA:CPU compiles each for the host's instruction set (FMA or not,
  vector width, fusion), so an element near zero can differ by a few float32 ulps of the
  array's scale, not of its own value (seen on AMD EPYC: 1.2e-8 at 1.8e-4, relative 6.7e-5).
  So ``atol = scale_tol * max|desired|`` per leaf (about 84 float32 ulps of the scale at
  the default), on top of ``rtol``; a real bug (another key, radius or neighbour) is off by
  far more. Integer and key leaves are compared exactly."""
  a_leaves, d_leaves = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired)
  assert len(a_leaves) == len(d_leaves)
  for a, d in zip(a_leaves, d_leaves):
    a, d = np.asarray(a), np.asarray(d)
    if not np.issubdtype(d.dtype, np.floating) and d.dtype.name != "bfloat16":
      np.testing.assert_array_equal(a, d)
      continue
    a, d = a.astype(np.float64), d.astype(np.float64)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    np.testing.assert_allclose(a, d, rtol=rtol, atol=scale_tol * scale + 1e-30, err_msg=err_msg)


def pytest_collection_modifyitems(config, items):
  """``@pytest.mark.slow_cases("id", ...)`` on a parametrized test marks those cases slow
  (``make test`` leaves them out; ``make test-slow`` and CI run them), next to the test."""
  for item in items:
    marker = item.get_closest_marker("slow_cases")
    callspec = getattr(item, "callspec", None)
    if marker is not None and callspec is not None and callspec.id in marker.args:
      item.add_marker(pytest.mark.slow)
