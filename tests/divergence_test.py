"""Divergences against scipy.special.rel_entr, and numerical safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nrs_jax
from tests.conftest import np_divergence


@pytest.mark.parametrize("name", nrs_jax.DIVERGENCES)
@pytest.mark.parametrize("jit", [False, True])
def test_matches_scipy(name, jit):
  rng = np.random.default_rng(0)
  z0 = rng.normal(size=(32, 7)) * 3
  z1 = z0 + rng.normal(size=(32, 7))
  fn = nrs_jax.get_divergence(name)
  if jit:
    fn = jax.jit(fn)
  got = fn(jnp.asarray(z0, jnp.float32), jnp.asarray(z1, jnp.float32))
  np.testing.assert_allclose(got, np_divergence(name, z0, z1), rtol=2e-4, atol=1e-6)
  mean = jax.jit(nrs_jax.output_divergence, static_argnums=2)(z0, z1, name)
  np.testing.assert_allclose(mean, np_divergence(name, z0, z1).mean(), rtol=2e-4)


@pytest.mark.parametrize("name", nrs_jax.DIVERGENCES)
def test_identical_inputs_give_zero(name):
  z = jax.random.normal(jax.random.key(0), (10, 5)) * 10
  assert float(nrs_jax.output_divergence(z, z, name)) == 0.0


@pytest.mark.parametrize("name", nrs_jax.DIVERGENCES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_and_nonnegative_for_extreme_logits(name, dtype):
  key0, key1 = jax.random.split(jax.random.key(3))
  z0 = (jax.random.normal(key0, (64, 10)) * 1e4).astype(dtype)
  z1 = (jax.random.normal(key1, (64, 10)) * 1e4).astype(dtype)
  z0 = z0.at[0].set(jnp.array([1e4] + [-1e4] * 9, dtype))
  z1 = z1.at[0].set(jnp.array([-1e4] * 9 + [1e4], dtype))
  fn = jax.jit(nrs_jax.get_divergence(name))
  vals = fn(z0, z1)
  assert vals.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(vals)))
  assert float(jnp.min(vals)) >= -1e-6
  grads = jax.grad(lambda a: jnp.sum(fn(a, z1)))(z0.astype(jnp.float32))
  assert bool(jnp.all(jnp.isfinite(grads)))
  assert bool(jnp.all(fn(z0, z0) == 0))


def test_js_bounded_by_log2():
  z0 = jnp.array([[50.0, -50.0]])
  z1 = jnp.array([[-50.0, 50.0]])
  np.testing.assert_allclose(nrs_jax.js(z0, z1), np.log(2), rtol=1e-5)


def test_custom_callable_and_unknown_name():
  z0 = jnp.ones((2, 3))
  fn = lambda a, b: jnp.sum((a - b) ** 2, -1)
  assert float(nrs_jax.output_divergence(z0, z0 + 1, fn)) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="divergence='hellinger'.*'kl'"):
    nrs_jax.get_divergence("hellinger")
