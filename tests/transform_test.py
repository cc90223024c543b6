"""add_nrs_gradient: the optax battery, keys, NNX, and learning on a small problem."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import nrs_jax
from tests.conftest import assert_trees_f32_close
from tests.conftest import mlp_apply
from tests.conftest import mlp_init

ALPHA, RADIUS = 0.5, 0.2


def _setup():
  params = mlp_init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jnp.arange(16) % 3
  logits_fn = lambda p: mlp_apply(p, x)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()
  return params, logits_fn, loss


def _penalty_grad(params, logits_fn, key, **kw):
  return jax.grad(
    lambda p: nrs_jax.nrs_penalty(logits_fn, p, key, radius=RADIUS, num_neighbors=2, **kw)
  )(params)


def test_update_adds_alpha_times_penalty_gradient_with_split_key():
  params, logits_fn, loss = _setup()
  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2, key=3)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(
    grads, state, params
  )
  step_key = jax.random.fold_in(jax.random.key(3), 0)
  g_pen = _penalty_grad(params, logits_fn, step_key)
  expected = jax.tree_util.tree_map(lambda a, b: a + ALPHA * b, grads, g_pen)
  for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
    assert_trees_f32_close(a, b, rtol=1e-5)
  assert int(new_state.count) == 1
  assert isinstance(new_state, nrs_jax.NRSState)


def test_successive_steps_draw_different_neighbours_and_seed_reproduces():
  params, logits_fn, loss = _setup()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

  def run(seed, steps=3):
    tx = nrs_jax.add_nrs_gradient(1.0, RADIUS, key=seed)
    state = tx.init(params)
    out = []
    for _ in range(steps):
      u, state = tx.update(zeros, state, params, logits_fn=logits_fn)
      out.append(jax.flatten_util.ravel_pytree(u)[0])
    return out

  a, b, c = run(0), run(0), run(1)
  assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(a[0], c[0])
  # A typed key and a raw key work as seeds too.
  for key in (jax.random.key(0), jax.random.PRNGKey(0), jnp.asarray(0)):
    tx = nrs_jax.add_nrs_gradient(1.0, RADIUS, key=key)
    u, _ = tx.update(zeros, tx.init(params), params, logits_fn=logits_fn)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(u)[0], a[0], rtol=1e-6)


def test_alpha_zero_is_exactly_identity_and_schedule_is_used():
  params, logits_fn, loss = _setup()
  grads = jax.grad(loss)(params)
  for alpha in (0.0, optax.constant_schedule(0.0)):
    tx = nrs_jax.add_nrs_gradient(alpha, RADIUS)
    u, _ = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, logits_fn=logits_fn))(
      grads, tx.init(params), params
    )
    for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(grads)):
      np.testing.assert_array_equal(a, b)
  # A schedule is evaluated at the step count: 0 at step 0, then 2.
  sched = lambda count: jnp.where(count >= 1, 2.0, 0.0)
  tx = nrs_jax.add_nrs_gradient(sched, RADIUS, key=5)
  state = tx.init(params)
  u0, state = tx.update(grads, state, params, logits_fn=logits_fn)
  u1, state = tx.update(grads, state, params, logits_fn=logits_fn)
  np.testing.assert_array_equal(
    jax.flatten_util.ravel_pytree(u0)[0], jax.flatten_util.ravel_pytree(grads)[0]
  )
  assert not np.allclose(
    jax.flatten_util.ravel_pytree(u1)[0], jax.flatten_util.ravel_pytree(grads)[0]
  )


def test_radius_zero_is_exactly_identity():
  params, logits_fn, loss = _setup()
  grads = jax.grad(loss)(params)
  tx = nrs_jax.add_nrs_gradient(1.0, 0.0, 3)
  u, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(
    grads, tx.init(params), params
  )
  for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.slow_cases("adamw")
def test_inside_chain_with_sgd_and_adamw(opt):
  params, logits_fn, loss = _setup()
  inner = optax.sgd(0.1, momentum=0.9) if opt == "sgd" else optax.adamw(1e-2, weight_decay=1e-4)
  tx = optax.chain(nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2), inner)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p, logits_fn=logits_fn, unrelated_extra_arg=123)
    return optax.apply_updates(p, u), s, u

  # The first update is the inner optimiser's on grads + alpha * grad(penalty), exactly.
  g = jax.grad(loss)(params)
  g_pen = _penalty_grad(params, logits_fn, jax.random.fold_in(jax.random.key(0), 0))
  want, _ = inner.update(
    jax.tree_util.tree_map(lambda a, b: a + ALPHA * b, g, g_pen), inner.init(params), params
  )
  plain, _ = inner.update(g, inner.init(params), params)
  new_params, state, u = step(params, state)
  assert_trees_f32_close(u, want, rtol=1e-5)
  assert not np.allclose(ravel_pytree(u)[0], ravel_pytree(plain)[0])
  l0 = float(loss(params))
  params = new_params
  for _ in range(19):
    params, state, _ = step(params, state)
  assert float(loss(params)) < l0


def test_state_penalty_is_the_raw_penalty_of_the_update():
  params, logits_fn, loss = _setup()
  grads = jax.grad(loss)(params)
  tx = nrs_jax.add_nrs_gradient(0.5, RADIUS, 2, key=4)
  state = tx.init(params)
  assert float(state.penalty) == 0.0
  _, state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(grads, state, params)
  want = nrs_jax.nrs_penalty(
    logits_fn, params, jax.random.fold_in(jax.random.key(4), 0), radius=RADIUS, num_neighbors=2
  )
  np.testing.assert_allclose(state.penalty, want, rtol=1e-6)
  assert state.penalty.dtype == jnp.float32
  for alpha in (0.0, optax.constant_schedule(0.0)):
    tx0 = nrs_jax.add_nrs_gradient(alpha, RADIUS, key=4)
    _, s0 = tx0.update(grads, tx0.init(params), params, logits_fn=logits_fn)
    assert float(s0.penalty) == 0.0


def test_where_is_an_extra_argument_of_update():
  params, _, loss = _setup()
  x = jax.random.normal(jax.random.key(1), (4, 6, 5))  # [batch, tokens, features]
  where = jnp.arange(6)[None, :] < jnp.array([6, 3, 1, 4])[:, None]
  logits_fn = lambda p: mlp_apply(p, x)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = nrs_jax.add_nrs_gradient(1.0, RADIUS, key=2)
  u, s = tx.update(grads, tx.init(params), params, logits_fn=logits_fn, where=where)
  key = jax.random.fold_in(jax.random.key(2), 0)
  pen = lambda p: nrs_jax.nrs_penalty(logits_fn, p, key, radius=RADIUS, where=where)
  assert_trees_f32_close(u, jax.grad(pen)(params))
  np.testing.assert_allclose(s.penalty, pen(params), rtol=1e-6)
  u_all, _ = tx.update(grads, tx.init(params), params, logits_fn=logits_fn)
  assert not np.allclose(ravel_pytree(u)[0], ravel_pytree(u_all)[0])


def test_inject_hyperparams_alpha_and_radius_injectable():
  params, logits_fn, loss = _setup()
  tx = optax.inject_hyperparams(nrs_jax.add_nrs_gradient, static_args=("num_neighbors",))(
    alpha=ALPHA, radius=RADIUS, num_neighbors=2, key=3
  )
  state = tx.init(params)
  assert set(state.hyperparams) >= {"alpha", "radius"}
  grads = jax.grad(loss)(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))
  u, state2 = step(grads, state, params)
  ref_tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2, key=3)
  u_ref, _ = ref_tx.update(grads, ref_tx.init(params), params, logits_fn=logits_fn)
  assert_trees_f32_close(
    jax.flatten_util.ravel_pytree(u)[0],
    jax.flatten_util.ravel_pytree(u_ref)[0],
    rtol=1e-5,
  )
  # Changing the injected alpha to 0 (no recompilation) gives exactly the gradient.
  state.hyperparams["alpha"] = jnp.zeros_like(state.hyperparams["alpha"])
  u0, _ = step(grads, state, params)
  np.testing.assert_array_equal(
    jax.flatten_util.ravel_pytree(u0)[0], jax.flatten_util.ravel_pytree(grads)[0]
  )
  # num_neighbors must be static.
  bad = optax.inject_hyperparams(nrs_jax.add_nrs_gradient)(
    alpha=ALPHA, radius=RADIUS, num_neighbors=2
  )
  s_bad = bad.init(params)
  with pytest.raises(ValueError, match="static_args=\\('num_neighbors',\\)"):
    jax.jit(lambda g, s, p: bad.update(g, s, p, logits_fn=logits_fn))(grads, s_bad, params)


def test_multisteps_accumulates():
  # Inside MultiSteps the inner chain runs once per k micro-steps, on the mean
  # gradient, with the last micro-step's logits_fn and its own count.
  params, logits_fn, loss = _setup()
  tx = optax.MultiSteps(optax.chain(nrs_jax.add_nrs_gradient(ALPHA, RADIUS), optax.sgd(0.1)), 2)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))
  # Inside, the penalty is the last micro-batch's: a warning at trace time names the
  # outside-with-resample_every recipe.
  with pytest.warns(UserWarning, match=r"inside optax.MultiSteps.*resample_every=k"):
    u1, state = step(grads, state, params)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(u1))
  g2 = jax.tree_util.tree_map(lambda a: 3.0 * a, grads)
  u2, state = step(g2, state, params)
  g_pen = jax.grad(
    lambda p: nrs_jax.nrs_penalty(
      logits_fn, p, jax.random.fold_in(jax.random.key(0), 0), radius=RADIUS
    )
  )(params)
  want = jax.tree_util.tree_map(lambda a, b: -0.1 * (2.0 * a + ALPHA * b), grads, g_pen)
  assert_trees_f32_close(u2, want, rtol=1e-5)


def test_apply_if_finite_skips_nan_step():
  params, logits_fn, loss = _setup()
  tx = optax.apply_if_finite(
    optax.chain(nrs_jax.add_nrs_gradient(ALPHA, RADIUS), optax.sgd(0.1)), 3
  )
  state = tx.init(params)
  nan_grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
  u, state = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=logits_fn))(
    nan_grads, state, params
  )
  new_params = optax.apply_updates(params, u)
  for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert int(state.notfinite_count) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_and_shape_stable(dtype):
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), mlp_init(jax.random.key(0)))
  x = jnp.ones((4, 5), dtype)
  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=lambda q: mlp_apply(q, x)))
  u, new_state = step(params, state, params)
  for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(params)):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert bool(jnp.all(jnp.isfinite(a.astype(jnp.float32))))
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
    assert a.dtype == b.dtype and a.shape == b.shape


def test_missing_params_or_logits_fn_and_bad_construction():
  params, logits_fn, loss = _setup()
  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS)
  state = tx.init(params)
  with pytest.raises(ValueError, match="needs logits_fn.*logits_fn=lambda p"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, state, logits_fn=logits_fn)
  with pytest.raises(ValueError, match="alpha=-0.5"):
    nrs_jax.add_nrs_gradient(-0.5, RADIUS)
  with pytest.raises(ValueError, match="radius=-1"):
    nrs_jax.add_nrs_gradient(1.0, -1.0)
  with pytest.raises(ValueError, match="num_neighbors=0"):
    nrs_jax.add_nrs_gradient(1.0, 0.1, 0)
  with pytest.raises(ValueError, match="strategy='fast'"):
    nrs_jax.add_nrs_gradient(1.0, 0.1, strategy="fast")
  with pytest.raises(ValueError, match="neighbor_chunk_size=3"):
    nrs_jax.add_nrs_gradient(1.0, 0.1, 4, neighbor_chunk_size=3)
  with pytest.raises(ValueError, match="mask must be a pytree of bools"):
    nrs_jax.add_nrs_gradient(1.0, 0.1, mask={"w": True}).init(params)
  with pytest.raises(ValueError, match="no floating-point leaves"):
    nrs_jax.add_nrs_gradient(1.0, 0.1).init({"i": jnp.ones(2, jnp.int32)})


def test_nnx_optimizer_update_with_logits_fn():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(5, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  model = MLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jnp.arange(16) % 3
  tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.1, 2), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(model, optimizer):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    logits_fn = lambda p: nnx.merge(graphdef, p, rest)(x)
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads, logits_fn=logits_fn)

  l0 = float(loss(model))
  for _ in range(10):
    step(model, optimizer)
  assert float(loss(model)) < l0
  assert int(optimizer.opt_state[0].count) == 10


@pytest.mark.slow
def test_learning_reaches_baseline_accuracy_with_lower_divergence():
  """Two-moons-like problem: NRS matches SGD's accuracy and ends flatter in output space."""
  rng = np.random.default_rng(0)
  n = 512
  t = rng.uniform(0, np.pi, n)
  lab = rng.integers(0, 2, n)
  xs = np.stack([np.cos(t) + lab * 1.0, np.sin(t) * (1 - 2 * lab) + lab * 0.3], 1)
  xs = xs + 0.15 * rng.normal(size=xs.shape)
  x = jnp.asarray(xs, jnp.float32)
  y = jnp.asarray(lab)
  params0 = mlp_init(jax.random.key(0), (2, 64, 64, 2))
  logits_fn = lambda p: mlp_apply(p, x)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()

  def train(tx, steps=300):
    params, state = params0, tx.init(params0)

    @jax.jit
    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p, logits_fn=logits_fn)
      return optax.apply_updates(p, u), s

    for _ in range(steps):
      params, state = step(params, state)
    return params

  p_sgd = train(optax.sgd(0.2, momentum=0.9))
  p_nrs = train(optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.2, 2), optax.sgd(0.2, momentum=0.9)))
  acc = lambda p: float(jnp.mean(jnp.argmax(logits_fn(p), -1) == y))
  div = lambda p: float(
    nrs_jax.nrs_penalty(logits_fn, p, jax.random.key(99), radius=0.2, num_neighbors=16)
  )
  assert acc(p_sgd) > 0.9
  assert acc(p_nrs) >= acc(p_sgd) - 0.02
  assert div(p_nrs) < 0.7 * div(p_sgd), (div(p_nrs), div(p_sgd))


@pytest.mark.slow
def test_gradient_accumulation_outside_multisteps_equals_large_batch():
  """chain(add_nrs_gradient(resample_every=k), MultiSteps(sgd, k)) == one large batch."""
  params = mlp_init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (32, 5))
  y = jnp.arange(32) % 3
  lf = lambda xb: lambda p: mlp_apply(p, xb)
  loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
    mlp_apply(p, xb), yb
  ).mean()
  k = 4
  big = optax.chain(nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2, key=1), optax.sgd(0.1))
  u_big, _ = big.update(jax.grad(loss)(params, x, y), big.init(params), params, logits_fn=lf(x))
  acc = optax.chain(
    nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2, key=1, resample_every=k),
    optax.MultiSteps(optax.sgd(0.1), k).gradient_transformation(),
  )
  state = acc.init(params)
  step = jax.jit(lambda g, s, xb: acc.update(g, s, params, logits_fn=lf(xb)))
  with warnings.catch_warnings():  # the recipe itself does not warn
    warnings.simplefilter("error", UserWarning)
    for i in range(k):
      xb, yb = x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]
      u, state = step(jax.grad(loss)(params, xb, yb), state, xb)
  assert_trees_f32_close(
    jax.flatten_util.ravel_pytree(u)[0],
    jax.flatten_util.ravel_pytree(u_big)[0],
    rtol=1e-4,
  )
  with pytest.raises(ValueError, match="resample_every=0"):
    nrs_jax.add_nrs_gradient(ALPHA, RADIUS, resample_every=0)


@pytest.mark.slow
def test_bfloat16_compute_is_finite_and_close_to_float32():
  """Params in float32, compute in bfloat16, divergence accumulated in float32."""
  params = mlp_init(jax.random.key(0), (5, 64, 10))
  x = jax.random.normal(jax.random.key(1), (64, 5))

  def logits_fn(p, dtype):
    cast = jax.tree_util.tree_map(lambda a: a.astype(dtype), p)
    return mlp_apply(cast, x.astype(dtype))

  def value_and_grad(dtype):
    f = lambda p: nrs_jax.nrs_penalty(
      lambda q: logits_fn(q, dtype), p, jax.random.key(2), radius=0.1, num_neighbors=4
    )
    return jax.jit(jax.value_and_grad(f))(params)

  v32, g32 = value_and_grad(jnp.float32)
  v16, g16 = value_and_grad(jnp.bfloat16)
  assert v16.dtype == jnp.float32
  assert bool(jnp.isfinite(v16))
  np.testing.assert_allclose(v16, v32, rtol=0.1)
  a, b = jax.flatten_util.ravel_pytree(g16)[0], jax.flatten_util.ravel_pytree(g32)[0]
  assert a.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a)))
  cos = float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  assert cos > 0.95, cos


def test_center_logits_shares_the_centre_pass_with_stop_gradient_center():
  params, logits_fn, loss = _setup()
  key = jax.random.key(1)
  calls = []

  def counted(p):
    calls.append(1)  # counts traces of a forward pass
    return logits_fn(p)

  # (The loop traces each neighbour once; auto's platform choice would trace both loop and vmap.)
  tx = nrs_jax.add_nrs_gradient(
    ALPHA, RADIUS, 2, key=key, stop_gradient_center=True, strategy="loop"
  )
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  center = logits_fn(params)
  shared, _ = jax.jit(lambda g, s, p, z: tx.update(g, s, p, logits_fn=counted, center_logits=z))(
    grads, state, params, center
  )
  assert len(calls) == 2  # the K neighbours only
  calls.clear()
  recomputed, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, logits_fn=counted))(
    grads, state, params
  )
  assert len(calls) == 3  # the centre too
  jax.tree_util.tree_map(lambda a, b: assert_trees_f32_close(a, b, rtol=1e-5), shared, recomputed)
  # And it is the fused loss's gradient with a fixed centre.
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
  y = jnp.arange(16) % 3
  fused = nrs_jax.make_nrs_loss(
    lambda p, _: logits_fn(p),
    lambda z, _: optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
    alpha=ALPHA,
    radius=RADIUS,
    num_neighbors=2,
    stop_gradient_center=True,
  )
  g_fused = jax.grad(lambda p: fused(p, None, step_key)[0])(params)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), shared, g_fused
  )


def test_center_logits_with_differentiable_centre_is_an_error():
  params, logits_fn, loss = _setup()
  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS, 2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="center_logits.*stop_gradient_center=True"):
    tx.update(
      jax.grad(loss)(params), state, params, logits_fn=logits_fn, center_logits=logits_fn(params)
    )


def test_callable_mask_of_bool_arrays_updates_only_the_selected_elements():
  params, logits_fn, loss = _setup()
  first = jax.tree_util.tree_leaves(params)[0]
  sel = np.zeros(first.shape, bool)
  sel.flat[::2] = True

  def mask(p):  # numpy arrays: static per-element masks
    leaves, treedef = jax.tree_util.tree_flatten(p)
    return jax.tree_util.tree_unflatten(treedef, [sel] + [False] * (len(leaves) - 1))

  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS, mask=mask)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  u, _ = jax.jit(lambda s: tx.update(zeros, s, params, logits_fn=logits_fn))(tx.init(params))
  got = jax.tree_util.tree_leaves(u)
  assert np.all(np.asarray(got[0])[~sel] == 0) and np.any(np.asarray(got[0])[sel] != 0)
  assert all(np.all(np.asarray(g) == 0) for g in got[1:])


def test_missing_logits_fn_names_every_route():
  params, _, _ = _setup()
  tx = nrs_jax.add_nrs_gradient(ALPHA, RADIUS)
  with pytest.raises(ValueError) as info:
    tx.update(params, tx.init(params), params)
  msg = str(info.value)
  assert "logits_fn=" in msg and "optimizer.update(model, grads, logits_fn" in msg
  assert "NRSTrainState" in msg and "apply_gradients(grads=grads, logits_fn=" in msg


def test_the_penalty_is_read_from_any_optimiser_state_with_tree_get():
  """optax.tree_utils.tree_get(state, "penalty") finds NRSState.penalty under wrappers."""
  params, logits_fn, loss = _setup()
  nrs = nrs_jax.add_nrs_gradient(ALPHA, RADIUS)
  wrapped = optax.apply_if_finite(
    optax.chain(
      optax.inject_hyperparams(nrs_jax.add_nrs_gradient)(alpha=ALPHA, radius=RADIUS),
      optax.sgd(0.1),
    ),
    3,
  )
  for tx in (optax.chain(nrs, optax.sgd(0.1)), wrapped):
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss)(params), state, params, logits_fn=logits_fn)
    penalty = optax.tree_utils.tree_get(state, "penalty")
    want = nrs_jax.nrs_penalty(
      logits_fn, params, jax.random.fold_in(jax.random.key(0), 0), radius=RADIUS
    )
    np.testing.assert_allclose(float(penalty), float(want), rtol=1e-5)
