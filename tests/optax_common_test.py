"""optax's common battery for optimizers (as in ``optax/contrib/_common_test.py``), per strategy.

The NRS transform needs logits: each target's params are read as the logits of
a 2-example batch (``_logits``), so the penalty is the divergence of
``softmax(params)`` and moves every parameter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nrs_jax
from tests.conftest import assert_trees_f32_close

STRATEGIES = [("auto", None), ("loop", None), ("vmap", None), ("chunked", None), ("chunked", 2)]
# make test runs auto and the scanned chunks (the strategies' agreement is
# strategies_test's); make test-slow runs every strategy.
FAST = [("auto", None), ("chunked", 2)]


def _strategies():
  return [
    pytest.param(s, c, marks=() if (s, c) in FAST else pytest.mark.slow) for s, c in STRATEGIES
  ]


def _dtype_cases():
  out = []
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    for s, c in STRATEGIES:
      fast = s == "auto" or (dtype == jnp.bfloat16 and (s, c) == ("chunked", 2))
      out.append(pytest.param(s, c, dtype, marks=() if fast else pytest.mark.slow))
  return out


def _logits(params):
  flat = jnp.concatenate(
    [jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(params)]
  )
  return jnp.stack([flat, -0.5 * flat])


def _nrs(strategy, chunk, alpha=1e-3, radius=1e-2):
  return nrs_jax.add_nrs_gradient(
    alpha, radius, 2, key=1, strategy=strategy, neighbor_chunk_size=chunk
  )


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return jnp.array([-1.0, 10.0, 1.0], dtype), final, lambda p: jnp.sum(jnp.square(p - final))


def _rosenbrock(dtype):
  return (
    jnp.zeros(2, dtype),
    jnp.array([1.0, 1.0], dtype),
    lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2),
  )


def _matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum(jnp.square(p - final))


def _mixed(dtype):
  f1, f2 = jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
  obj = lambda p: jnp.sum(jnp.square(p[0] - f1)) + jnp.sum(jnp.square(p[1] - f2))
  return (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2), obj


@pytest.mark.parametrize("strategy,chunk", _strategies())
@pytest.mark.slow_cases("chunked-2")
def test_battery(strategy, chunk):
  # 1. Extra args (unknown ones are ignored) and no recompilation on a second call.
  tx = optax.chain(_nrs(strategy, chunk), optax.adam(0.05))
  params, _, obj = _rosenbrock(jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(obj)(params)
    updates, state = tx.update(
      grads, state, params, logits_fn=_logits, unexpected_extra_arg_nobody_expects=1
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state)
  size = step._cache_size()
  params, state = step(params, state)
  assert step._cache_size() == size == 1

  # 2. Convergence on optax's targets (the penalty is small), and tree_map_params.
  for target in (_parabola, _rosenbrock, _matrix_parabola, _mixed):
    params, final, obj = target(jnp.float32)
    tx = optax.chain(_nrs(strategy, chunk), optax.adam(0.05))
    state = optax.tree_utils.tree_map_params(tx, lambda v: v, tx.init(params))

    def body(carry, _, obj=obj, tx=tx):
      p, s = carry
      u, s = tx.update(jax.grad(obj)(p), s, p, logits_fn=_logits)
      return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=3000))((params, state))
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(final)):
      np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2, err_msg=target.__name__)
    assert float(state[0].penalty) > 0

  # 3. inject_hyperparams: same update and state as the plain transform.
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  plain = _nrs(strategy, chunk, alpha=0.5, radius=0.1)
  injected = optax.inject_hyperparams(
    nrs_jax.add_nrs_gradient, static_args=("num_neighbors", "neighbor_chunk_size")
  )(alpha=0.5, radius=0.1, num_neighbors=2, key=1, strategy=strategy, neighbor_chunk_size=chunk)
  u1, s1 = jax.jit(lambda g, s, p: plain.update(g, s, p, logits_fn=_logits))(
    grads, plain.init(params), params
  )
  u2, s2 = jax.jit(lambda g, s, p: injected.update(g, s, p, logits_fn=_logits))(
    grads, injected.init(params), params
  )
  for a, b in zip(
    jax.tree_util.tree_leaves((u1, s1)), jax.tree_util.tree_leaves((u2, s2.inner_state))
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy,chunk,dtype", _dtype_cases())
@pytest.mark.slow_cases("chunked-2-bfloat16", "auto-None-float16")
def test_dtype_state_and_gradient_accumulation(strategy, chunk, dtype):
  tx = optax.chain(_nrs(strategy, chunk), optax.sgd(0.1, momentum=0.9))
  params, _, obj = _parabola(dtype)
  grads = jax.grad(obj)(params)
  state = jax.jit(tx.init)(params)

  # Updates keep the params' dtype; state shape and dtype are stable through a
  # lax.cond on a value the compiler cannot see.
  @jax.jit
  def step(params, state):
    g = jax.grad(obj)(params)
    pick = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, new = jax.lax.cond(
      pick,
      lambda: tx.update(g, state, params, logits_fn=_logits),
      lambda: (jax.tree_util.tree_map(jnp.zeros_like, params), state),
    )
    return optax.apply_updates(params, updates), new, updates

  for _ in range(2):
    params, state, updates = step(params, state)
    assert updates.dtype == params.dtype == dtype

  # optax.MultiSteps passes logits_fn through; after 4 equal micro-steps its update is
  # this transform's first update (the inner state, and so the neighbours' key, at count 0).
  ms = optax.MultiSteps(tx, every_k_schedule=4)
  ms_update = jax.jit(lambda g, s, p: ms.update(g, s, p, logits_fn=_logits))
  ms_state = ms.init(params)
  with pytest.warns(UserWarning, match="inside optax.MultiSteps"):
    for _ in range(4):
      updates, ms_state = ms_update(grads, ms_state, params)
  want, _ = tx.update(grads, tx.init(params), params, logits_fn=_logits)
  assert_trees_f32_close(updates, want, rtol=1e-5)
  assert float(jnp.abs(want).max()) > 0
