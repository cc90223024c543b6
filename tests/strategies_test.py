"""Every strategy against ``loop`` (the one strategy-agreement battery): random pytrees x K x
divergence x aggregation x scale x fixed or differentiable centre, the loss and transform
paths, keys under vmap, closed-over values, jvp, hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nrs_jax
from tests.conftest import assert_trees_f32_close
from tests.conftest import enable_x64

KEY = jax.random.key(0)
# (strategy, chunk size); "chunked" without a size is chunks of one (unrolled).
VARIANTS = [("vmap", None), ("chunked", None), ("chunked", 2), ("auto", None)]


def _random_tree(seed, dtype=jnp.float32):
  """Params of mixed leaves, a mask of them, and a logits_fn that uses every float leaf
  (``dtype``: float32 with one bfloat16 leaf, or float64 throughout under x64)."""
  rng = np.random.default_rng(seed)
  shapes = {
    "dense": (int(rng.integers(2, 5)), 3),
    "conv": (3, 3, int(rng.integers(1, 3)), 2),
    "scalar": (),
    "vector": (int(rng.integers(1, 4)),),
  }
  params = {
    name: jnp.asarray(rng.normal(size=shape) * 0.5, dtype) for name, shape in shapes.items()
  }
  half = jnp.bfloat16 if dtype == jnp.float32 else dtype
  params["half"] = jnp.asarray(rng.normal(size=(4,)), half)
  params["count"] = jnp.asarray(3, jnp.int32)
  params["empty"] = jnp.zeros((0, 2), dtype)
  params = {"a": {k: params[k] for k in ("dense", "conv", "count")}, "b": params}
  for k in ("dense", "conv", "count"):
    del params["b"][k]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  mask = [bool(rng.random() < 0.7) for _ in leaves]
  mask[0] = True  # at least one non-empty float leaf moves
  mask = jax.tree_util.tree_unflatten(treedef, mask)
  coef = [jnp.asarray(rng.normal(size=jnp.shape(x)), dtype) for x in leaves]
  heads = jnp.asarray(rng.normal(size=(len(leaves), 3)), dtype)
  x = jnp.asarray(rng.normal(size=(6, 3)), dtype)

  def logits_fn(p, x=x):
    feats = [
      jnp.tanh(jnp.sum(jnp.asarray(leaf, dtype) * c) + 0.1 * i)
      for i, (leaf, c) in enumerate(zip(jax.tree_util.tree_leaves(p), coef))
    ]
    return jnp.tanh(x @ jnp.ones((3, 3), dtype)) * (jnp.stack(feats) @ heads) + x

  return params, mask, logits_fn


def _close(a, b, rtol=1e-4, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if x.dtype == jax.dtypes.float0:
      continue
    tol = 3e-2 if x.dtype == jnp.bfloat16 else rtol
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=atol + tol * 1e-2
    )


# seed -> (divergence, aggregation, scale, stop_gradient_center): every divergence, both
# aggregations, three scales and both centres over the four random pytrees.
CASES = [
  ("kl", "mean", "absolute", False),
  ("js", "max", "filter", True),
  ("reverse_kl", "mean", "tensor", True),
  ("symmetric_kl", "max", "filter", False),
]


# make test: every seed (so every divergence, aggregation, scale and centre) once, K = 1, 2
# and 4 each at least once, and seeds 0 and 1 at K = 2 (the loss and transform paths);
# make test-slow: the whole grid.
FAST_CASES = {(0, 2), (1, 2), (2, 4), (3, 4), (3, 1)}
RANDOM_CASES = [
  pytest.param(seed, k, marks=() if (seed, k) in FAST_CASES else pytest.mark.slow)
  for k in (1, 2, 4)
  for seed in range(4)
]


@pytest.mark.parametrize("seed,k", RANDOM_CASES)
@pytest.mark.slow_cases("3-1", "3-4", "1-2", "0-2")
def test_every_strategy_equals_the_loop_on_random_pytrees(seed, k):
  params, mask, logits_fn = _random_tree(seed)
  variants = [(s, c) for s, c in VARIANTS if c is None or k % c == 0]
  divergence, agg, scale, fixed = CASES[seed]
  kw = dict(radius=0.3, num_neighbors=k, mask=mask, scale=scale, aggregation=agg)
  kw.update(divergence=divergence, stop_gradient_center=fixed)

  def pen(p, strategy, chunk):
    return nrs_jax.nrs_penalty(
      logits_fn, p, KEY, strategy=strategy, neighbor_chunk_size=chunk, **kw
    )

  @jax.jit
  def all_of(p):
    vg = lambda s, c: jax.value_and_grad(lambda q: pen(q, s, c), allow_int=True)(p)
    return vg("loop", None), [vg(s, c) for s, c in variants]

  (v_loop, g_loop), results = all_of(params)
  assert float(v_loop) > 0
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(g_loop["a"])[:2])
  for (s, c), (v, g) in zip(variants, results):
    np.testing.assert_allclose(v, v_loop, rtol=1e-5, err_msg=f"{s}/{c}")
    _close(g, g_loop)
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(g_loop)
    assert all(a.dtype == b.dtype for a, b in zip(*map(jax.tree_util.tree_leaves, (g, g_loop))))
  if k != 2 or seed > 1:  # seeds 0 and 1: both centres, both aggregations
    return
  # The loss and transform paths, with the last strategy: the same penalty and gradient.
  s, c = variants[-1]
  loss = nrs_jax.make_nrs_loss(
    lambda p, _: logits_fn(p),
    lambda z, _: 0.0 * jnp.sum(z),
    alpha=1.0,
    strategy=s,
    neighbor_chunk_size=c,
    **kw,
  )
  vg = jax.jit(jax.value_and_grad(loss, has_aux=True, allow_int=True))
  (v, _), g = vg(params, None, KEY)
  np.testing.assert_allclose(v, v_loop, rtol=1e-4)
  _close(g, g_loop)
  tx = nrs_jax.add_nrs_gradient(1.0, key=0, strategy=s, neighbor_chunk_size=c, **kw)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  update = jax.jit(lambda g, st, p: tx.update(g, st, p, logits_fn=logits_fn))
  updates, _ = update(zeros, tx.init(params), params)
  step_key = jax.random.fold_in(jax.random.key(0), 0)
  pen_at = lambda q: nrs_jax.nrs_penalty(logits_fn, q, step_key, **kw)
  want = jax.jit(jax.grad(pen_at, allow_int=True))(params)
  selected = jax.tree_util.tree_leaves(mask)
  for u, w, m in zip(*map(jax.tree_util.tree_leaves, (updates, want)), selected):
    if jnp.issubdtype(u.dtype, jnp.floating) and m:
      _close(u, w)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_every_strategy_equals_the_loop_in_float64_under_x64(seed):
  """Under ``jax_enable_x64`` with float64 params every strategy agrees with the loop to
  float64 precision, value and gradient. The bug it caught: the chunked strategy drew its
  noise in float32 inside a scan, where XLA compiles the normal's erf_inv differently, so it
  differed from vmap and loop by 2.7e-9 (relative) where float64 agrees to about 1e-15."""
  with enable_x64():
    params, mask, logits_fn = _random_tree(seed, jnp.float64)
    divergence, agg, scale, fixed = CASES[seed]
    for k in (4,):  # (every variant: chunks of one and of two)
      kw = dict(radius=0.3, num_neighbors=k, mask=mask, scale=scale, aggregation=agg)
      kw.update(divergence=divergence, stop_gradient_center=fixed)

      @jax.jit
      def all_of(p, kw=kw, k=k):
        vg = lambda s, c: jax.value_and_grad(
          lambda q: nrs_jax.nrs_penalty(logits_fn, q, KEY, strategy=s, neighbor_chunk_size=c, **kw),
          allow_int=True,
        )(p)
        return vg("loop", None), [vg(s, c) for s, c in VARIANTS if c is None or k % c == 0]

      (v_loop, g_loop), results = all_of(params)
      assert v_loop.dtype == jnp.float64 and float(v_loop) > 0
      for v, g in results:
        np.testing.assert_allclose(v, v_loop, rtol=1e-12)
        for a, b in zip(*map(jax.tree_util.tree_leaves, (g, g_loop))):
          if a.dtype == jax.dtypes.float0:
            continue
          assert a.dtype == b.dtype
          scale_ = float(np.max(np.abs(np.asarray(b)))) if b.size else 0.0
          np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * scale_ + 1e-300)


@pytest.mark.parametrize(
  "strategy,chunk",
  [
    pytest.param(s, c, marks=() if (s, c) in (("auto", None), ("chunked", 2)) else pytest.mark.slow)
    for s, c in [("loop", None), *VARIANTS]
  ],
)
@pytest.mark.slow_cases("chunked-2", "auto-None")
def test_penalty_and_gradient_under_vmap_over_keys_equal_a_loop_over_keys(strategy, chunk):
  params, mask, logits_fn = _random_tree(7)
  keys = jax.random.split(KEY, 3)
  f = lambda p, key: nrs_jax.nrs_penalty(
    logits_fn,
    p,
    key,
    radius=0.3,
    num_neighbors=4,
    mask=mask,
    strategy=strategy,
    neighbor_chunk_size=chunk,
  )
  vg = jax.value_and_grad(f, allow_int=True)
  mapped_v, mapped_g = jax.jit(jax.vmap(vg, in_axes=(None, 0)))(params, keys)
  for i, key in enumerate(keys):
    v, g = jax.jit(vg)(params, key)
    np.testing.assert_allclose(mapped_v[i], v, rtol=1e-5)
    _close(jax.tree_util.tree_map(lambda a, i=i: a[i] if a.ndim else a, mapped_g), g)


def _tiny():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.zeros(4)}
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  return params, x, lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) * 2.0


ALL = [("loop", None), *VARIANTS]


def _pen(logits, params, strategy, chunk, radius=0.3, k=4):
  return nrs_jax.nrs_penalty(
    logits,
    params,
    KEY,
    radius=radius,
    num_neighbors=k,
    strategy=strategy,
    neighbor_chunk_size=chunk,
  )


@pytest.mark.slow
def test_gradients_with_respect_to_closed_over_values_under_every_strategy():
  params, x, apply = _tiny()
  # The input (adversarial use): logits_fn closes over x, which is being differentiated.
  gx = {
    s + str(c): jax.jit(jax.grad(lambda x, s=s, c=c: _pen(lambda p: apply(p, x), params, s, c)))(x)
    for s, c in ALL
  }
  assert float(jnp.abs(gx["loopNone"]).sum()) > 0
  for name, g in gx.items():
    assert_trees_f32_close(g, gx["loopNone"], rtol=1e-4, err_msg=name)
  # Input and params together, and a radius being differentiated: the perturbations
  # are constants (drawn under stop_gradient), so d/d radius is 0 under every strategy.
  for s, c in ALL:
    gp, gxx, gr = jax.grad(
      lambda p, x, r, s=s, c=c: _pen(lambda q: apply(q, x), p, s, c, radius=r), argnums=(0, 1, 2)
    )(params, x, 0.3)
    _close(gxx, gx["loopNone"])
    _close(gp, jax.grad(lambda p: _pen(lambda q: apply(q, x), p, "loop", None))(params))
    assert float(gr) == 0.0, (s, c)


def test_jvp_and_hessian_of_the_penalty_under_every_strategy():
  params, x, apply = _tiny()
  logits = lambda p: apply(p, x)
  tangent = jax.tree_util.tree_map(jnp.ones_like, params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hess = lambda s, c: jax.jit(jax.hessian(lambda v: _pen(logits, unravel(v), s, c, k=2)))(flat)
  jvp = lambda s, c: jax.jit(lambda p, t: jax.jvp(lambda q: _pen(logits, q, s, c), (p,), (t,)))(
    params, tangent
  )
  ref_jvp = jvp("loop", None)
  ref_hess = hess("loop", None)
  assert float(jnp.abs(ref_hess).max()) > 0
  for s, c in VARIANTS:
    np.testing.assert_allclose(hess(s, c), ref_hess, rtol=1e-4, atol=1e-6, err_msg=f"{s}/{c}")
    # chunked's custom JVP rule (gradient . tangent) gives forward mode too
    np.testing.assert_allclose(jvp(s, c), ref_jvp, rtol=1e-5)
