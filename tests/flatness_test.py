"""Flatness diagnostics against exact Hessians (jax.hessian + numpy.linalg.eigh) and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy.sparse import linalg as splinalg

import nrs_jax
from nrs_jax import flatness
from tests.conftest import enable_x64
from tests.conftest import mlp_apply
from tests.conftest import mlp_init

KEY = jax.random.key(0)


def _xent(p, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y).mean()


def _tiny64(sizes=(6, 12, 4), n=40):
  params = mlp_init(jax.random.key(1), sizes, dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(2), (n, sizes[0]), jnp.float64)
  y = jnp.arange(n) % sizes[-1]
  return params, (x, y)


def _exact_hessian(loss_fn, params, batch):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda v: loss_fn(unravel(v), batch))(flat))


@pytest.mark.slow
def test_hvp_matches_exact_hessian_product():
  with enable_x64(True):
    params, batch = _tiny64()
    H = _exact_hessian(_xent, params, batch)
    flat, unravel = ravel_pytree(params)
    v = np.random.default_rng(0).normal(size=flat.size)
    hv = ravel_pytree(jax.jit(flatness.hvp, static_argnums=0)(_xent, params, unravel(v), batch))[0]
    np.testing.assert_allclose(hv, H @ v, rtol=1e-10, atol=1e-12)


def test_top5_eigenvalues_match_eigh_of_exact_hessian():
  with enable_x64(True):
    params, batch = _tiny64()  # 6*12+12+12*4+4 = 136 params
    H = _exact_hessian(_xent, params, batch)
    exact = np.sort(np.linalg.eigvalsh(H))[::-1][:5]
    r = flatness.top_hessian_eigenvalues(_xent, params, batch, KEY, k=5, num_iters=136, tol=1e-10)
    np.testing.assert_allclose(r.eigenvalues, exact, rtol=1e-4)
    vecs = np.stack(
      [ravel_pytree(jax.tree_util.tree_map(lambda x: x[i], r.eigenvectors))[0] for i in range(5)]
    )
    for lam, v, res in zip(r.eigenvalues, vecs, r.residual_norms):
      assert abs(np.linalg.norm(v) - 1) < 1e-8
      np.testing.assert_allclose(H @ v, lam * v, atol=1e-5 * abs(exact[0]))
      assert res < 1e-5 * abs(exact[0])


def _quadratic(eigs, seed=0):
  rng = np.random.default_rng(seed)
  n = len(eigs)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  A = (q * np.asarray(eigs)) @ q.T
  loss = lambda p, b: 0.5 * p @ (b @ p)
  return A, loss


def test_planted_spectrum_with_negative_and_near_degenerate_top_pair():
  eigs = np.concatenate([[10.0, 10.0 - 1e-3, 5.0, 2.0], np.linspace(-3.0, 1.0, 60)])
  with enable_x64(True):
    A, loss = _quadratic(eigs)
    r = flatness.top_hessian_eigenvalues(
      loss, jnp.zeros(len(eigs)), jnp.asarray(A), KEY, k=4, num_iters=64, tol=1e-12
    )
    np.testing.assert_allclose(r.eigenvalues, [10.0, 10.0 - 1e-3, 5.0, 2.0], rtol=1e-8)
    # Largest magnitude sees the negative end too when it dominates.
    eigs2 = np.concatenate([[4.0], [-7.0], np.linspace(-1, 1, 30)])
    A2, _ = _quadratic(eigs2, seed=1)
    r2 = flatness.top_hessian_eigenvalues(
      loss, jnp.zeros(len(eigs2)), jnp.asarray(A2), KEY, k=2, which="LM", num_iters=32
    )
    np.testing.assert_allclose(r2.eigenvalues, [-7.0, 4.0], rtol=1e-8)


def test_trace_within_three_standard_errors_and_density_moments():
  with enable_x64(True):
    params, batch = _tiny64()
    H = _exact_hessian(_xent, params, batch)
    n = H.shape[0]
    tr = flatness.hessian_trace(_xent, params, batch, KEY, num_samples=200)
    assert abs(float(tr.trace) - np.trace(H)) <= 3 * float(tr.stderr)
    assert float(tr.stderr) > 0
    dens = flatness.hessian_spectral_density(_xent, params, batch, KEY, num_iters=40, num_runs=40)
    grid, d = np.asarray(dens["grid"]), np.asarray(dens["density"])
    dx = grid[1] - grid[0]
    np.testing.assert_allclose(d.sum() * dx, 1.0, rtol=1e-3)
    nodes, w = np.asarray(dens["nodes"]), np.asarray(dens["weights"])
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-10)
    m1 = (w * nodes).sum(1)  # v^T H v per run, E = tr(H)/n
    m2 = (w * nodes**2).sum(1)
    se1 = m1.std(ddof=1) / np.sqrt(len(m1))
    se2 = m2.std(ddof=1) / np.sqrt(len(m2))
    assert abs(m1.mean() - np.trace(H) / n) <= 4 * se1
    assert abs(m2.mean() - np.trace(H @ H) / n) <= 4 * se2
    # The broadened density has the same first moment.
    np.testing.assert_allclose((grid * d).sum() * dx, m1.mean(), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_multi_batch_equals_concatenated_batch():
  with enable_x64(True):
    params, (x, y) = _tiny64(n=30)
    parts = [(x[:10], y[:10]), (x[10:], y[10:])]  # unequal sizes: weighted by size
    a = flatness.top_hessian_eigenvalues(_xent, params, (x, y), KEY, k=2, num_iters=60, tol=1e-10)
    b = flatness.top_hessian_eigenvalues(_xent, params, parts, KEY, k=2, num_iters=60, tol=1e-10)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-8)
    t1 = flatness.hessian_trace(_xent, params, (x, y), KEY, num_samples=10)
    t2 = flatness.hessian_trace(_xent, params, parts, KEY, num_samples=10)
    np.testing.assert_allclose(t1.trace, t2.trace, rtol=1e-8)
    s1 = flatness.worst_case_sharpness(_xent, params, (x, y), rho=0.1)
    s2 = flatness.worst_case_sharpness(_xent, params, parts, rho=0.1)
    np.testing.assert_allclose(s1["sharpness/worst_case"], s2["sharpness/worst_case"], rtol=1e-8)


@pytest.mark.slow
def test_per_block_eigenvalues_and_trace_match_exact_sub_blocks():
  with enable_x64(True):
    params, batch = _tiny64()
    H = _exact_hessian(_xent, params, batch)
    # ravel_pytree order = flatten order: layer0/b, layer0/w, layer1/b, layer1/w
    sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
    starts = np.cumsum([0, *sizes])
    out = flatness.layerwise_hessian(_xent, params, batch, KEY, num_iters=100, num_samples=400)
    names = ["layer0/b", "layer0/w", "layer1/b", "layer1/w"]
    for i, name in enumerate(names):
      block = H[starts[i] : starts[i + 1], starts[i] : starts[i + 1]]
      np.testing.assert_allclose(
        out[f"hessian/{name}/lambda_max"], np.linalg.eigvalsh(block)[-1], rtol=1e-4
      )
      assert (
        abs(float(out[f"hessian/{name}/trace"]) - np.trace(block))
        < 0.2 * abs(np.trace(H)) / 4 + 1e-3
      )
    mod = flatness.layerwise_hessian(_xent, params, batch, KEY, group="module", num_iters=100)
    block = H[: starts[2], : starts[2]]
    np.testing.assert_allclose(
      mod["hessian/layer0/lambda_max"], np.linalg.eigvalsh(block)[-1], rtol=1e-4
    )
    pred = flatness.top_hessian_eigenvalues(
      _xent,
      params,
      batch,
      KEY,
      mask=lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "w", p),
      num_iters=120,
      tol=1e-10,
    )
    idx = np.r_[starts[1] : starts[2], starts[3] : starts[4]]
    np.testing.assert_allclose(
      pred.eigenvalues[0], np.linalg.eigvalsh(H[np.ix_(idx, idx)])[-1], rtol=1e-4
    )
    assert bool(jnp.all(pred.eigenvectors["layer0"]["b"] == 0))


@pytest.mark.slow
def test_100k_parameter_model_top3_agree_with_scipy_eigsh():
  params = mlp_init(jax.random.key(3), (64, 384, 192, 10))  # 100,618 params
  x = jax.random.normal(jax.random.key(4), (128, 64))
  y = jnp.arange(128) % 10
  batch = (x, y)
  n = ravel_pytree(params)[0].size
  assert 90_000 < n < 110_000
  r = flatness.top_hessian_eigenvalues(_xent, params, batch, KEY, k=3, num_iters=80, tol=1e-4)
  flat, unravel = ravel_pytree(params)
  mv = jax.jit(lambda v: ravel_pytree(flatness.hvp(_xent, params, unravel(v), batch))[0])
  op = splinalg.LinearOperator(
    (n, n),
    matvec=lambda v: np.asarray(mv(jnp.asarray(v, jnp.float32)), np.float64),
    dtype=np.float64,
  )
  ref = np.sort(splinalg.eigsh(op, k=3, which="LA", tol=1e-6, v0=np.ones(n))[0])[::-1]
  np.testing.assert_allclose(r.eigenvalues, ref, rtol=2e-3)


def test_average_sharpness_of_a_quadratic_is_half_r2_trace():
  eigs = np.linspace(0.5, 3.0, 50)
  with enable_x64(True):
    A, loss = _quadratic(eigs)
    out = flatness.average_sharpness(
      loss, jnp.zeros(50), jnp.asarray(A), KEY, radius=0.1, num_samples=400
    )
    # E[0.5 d^T A d] = 0.5 r^2 tr(A) for d ~ N(0, r^2 I)
    expected = 0.5 * 0.01 * eigs.sum()
    assert abs(float(out["sharpness/average"]) - expected) <= 4 * float(
      out["sharpness/average_stderr"]
    )
    sph = flatness.average_sharpness(
      loss, jnp.zeros(50), jnp.asarray(A), KEY, radius=0.1, noise="sphere", num_samples=400
    )
    # On the sphere of radius r in R^n: E = 0.5 r^2 tr(A) / n
    assert abs(float(sph["sharpness/average"]) - 0.5 * 0.01 * eigs.mean()) <= 4 * float(
      sph["sharpness/average_stderr"]
    )


def test_worst_case_sharpness_and_nrs_divergence_match_direct_computation(tiny):
  params, x, y, logits_fn = tiny
  batch = (x, y)
  out = flatness.worst_case_sharpness(_xent, params, batch, rho=0.05)
  g = jax.grad(_xent)(params, batch)
  gn = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g)))
  up = _xent(jax.tree_util.tree_map(lambda p, gi: p + 0.05 * gi / gn, params, g), batch)
  np.testing.assert_allclose(out["sharpness/worst_case"], up - _xent(params, batch), rtol=1e-4)
  assert float(out["sharpness/worst_case"]) > 0
  nd = flatness.nrs_divergence(
    lambda p, b: mlp_apply(p, b[0]), params, batch, KEY, radius=0.1, num_neighbors=4
  )
  ref = nrs_jax.nrs_penalty(logits_fn, params, KEY, radius=0.1, num_neighbors=4)
  np.testing.assert_allclose(nd["sharpness/nrs_divergence"], ref, rtol=1e-5)


def test_landscape_matches_quadratic_and_filter_normalisation():
  params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.ones(3)}
  d = flatness.filter_normalized_direction(params, KEY)
  np.testing.assert_allclose(
    jnp.linalg.norm(d["w"], axis=0), jnp.linalg.norm(params["w"], axis=0), rtol=1e-5
  )
  assert bool(jnp.all(d["b"] == 0))
  loss = lambda p, b: jnp.sum(b * p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  c = jnp.full((2, 3), 0.5)
  ls = flatness.loss_landscape_1d(loss, params, c, KEY, alphas=[-1.0, 0.0, 0.5])
  for a, v in zip(ls["alphas"], ls["losses"]):
    np.testing.assert_allclose(
      v, loss(jax.tree_util.tree_map(lambda p, di: p + a * di, params, d), c), rtol=1e-5
    )
  l2 = flatness.loss_landscape_2d(loss, params, c, KEY, alphas=[-0.5, 0.0, 0.5])
  assert l2["losses"].shape == (3, 3)
  np.testing.assert_allclose(l2["losses"][1, 1], loss(params, c), rtol=1e-6)


def test_hessian_metrics_is_a_flat_dict():
  with enable_x64(True):
    params, batch = _tiny64()
    m = flatness.hessian_metrics(_xent, params, batch, KEY, k=2, num_samples=10)
  assert set(m) == {
    "hessian/lambda_max",
    "hessian/lambda_1",
    "hessian/trace",
    "hessian/trace_stderr",
    "hessian/residual_max",
  }
  assert all(jnp.ndim(v) == 0 for v in m.values())


def test_bad_inputs_name_the_argument():
  params = {"w": jnp.ones(3)}
  loss = lambda p, b: jnp.sum(b * p["w"] ** 2)
  b = jnp.ones(3)
  with pytest.raises(ValueError, match="k=0"):
    flatness.top_hessian_eigenvalues(loss, params, b, KEY, k=0)
  with pytest.raises(ValueError, match="k=4 is larger than the number of parameters"):
    flatness.top_hessian_eigenvalues(loss, params, b, KEY, k=4)
  with pytest.raises(ValueError, match="num_iters=1 must be >= k=2"):
    flatness.top_hessian_eigenvalues(loss, params, b, KEY, k=2, num_iters=1)
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    flatness.top_hessian_eigenvalues(lambda p, b: b * p["w"], params, b, KEY)
  with pytest.raises(ValueError, match="data is empty"):
    flatness.hessian_trace(loss, params, [], KEY)
  with pytest.raises(ValueError, match="num_samples=1"):
    flatness.hessian_trace(loss, params, b, KEY, num_samples=1)
  with pytest.raises(ValueError, match="which='SA'"):
    flatness.top_hessian_eigenvalues(loss, params, b, KEY, which="SA")
  with pytest.raises(ValueError, match="group='layer'"):
    flatness.layerwise_hessian(loss, params, b, KEY, group="layer")
