"""Noise statistics for every shape and scale, masks, and no gradient through sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import nrs_jax
from tests.conftest import mlp_apply
from tests.conftest import mlp_init


def _flat(tree):
  return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree_util.tree_leaves(tree)], 1)


def _sample(params, **kw):
  kw.setdefault("radius", 0.1)
  kw.setdefault("num_neighbors", 1)
  perts = jax.jit(
    lambda p, k: nrs_jax.sample_perturbations(p, k, **kw).as_tree(p),
  )(params, jax.random.key(kw.pop("seed", 0)))
  return perts


def test_gaussian_absolute_std():
  params = {"a": jnp.zeros((200, 50)), "b": jnp.zeros(1000)}
  d = _sample(params, radius=0.3, num_neighbors=4)
  flat = np.asarray(_flat(d))
  assert flat.shape == (4, 11000)
  assert abs(flat.std() / 0.3 - 1) < 0.02
  assert abs(flat.mean()) < 0.01
  # Kolmogorov-Smirnov against N(0, 0.3^2)
  assert stats.kstest(flat.ravel()[:5000] / 0.3, "norm").pvalue > 1e-3
  # K neighbours are independent draws
  assert abs(np.corrcoef(flat[0], flat[1])[0, 1]) < 0.05


@pytest.mark.parametrize("scale", nrs_jax.SCALES)
def test_sphere_norm_is_exactly_r_in_scaled_coordinates(scale):
  params = mlp_init(jax.random.key(0), (6, 7, 3))
  d = _sample(params, radius=0.2, num_neighbors=5, noise="sphere", scale=scale)
  if scale == "absolute":
    np.testing.assert_allclose(np.linalg.norm(_flat(d), axis=1), 0.2, rtol=1e-5)
  # Undo the scale on every leaf: the unit-scale sample, over all leaves together,
  # lies exactly on the sphere of radius r.

  def unscale(w, dw):
    if scale == "tensor" or (scale == "filter" and w.ndim <= 1):
      return dw / jnp.linalg.norm(w)
    if scale == "filter":
      return dw / jnp.linalg.norm(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
    if scale == "elementwise":
      return dw / (jnp.abs(w) + 0.01)
    return dw

  v = jax.tree_util.tree_map(unscale, params, d)
  np.testing.assert_allclose(np.linalg.norm(_flat(v), axis=1), 0.2, rtol=1e-4)


def test_ball_radius_distribution():
  # Uniform in the ball in R^N: P(||v|| <= t r) = t^N, so (||v||/r)^N ~ U(0, 1).
  params = {"w": jnp.zeros((3,))}
  d = _sample(params, radius=2.0, num_neighbors=4000, noise="ball")
  norms = np.linalg.norm(np.asarray(d["w"]), axis=1)
  assert norms.max() <= 2.0 + 1e-6
  assert stats.kstest((norms / 2.0) ** 3, "uniform").pvalue > 1e-3
  # Directions are uniform: the mean direction is near 0.
  dirs = np.asarray(d["w"]) / norms[:, None]
  assert np.linalg.norm(dirs.mean(0)) < 0.05


def test_tensor_scale_gaussian_std_per_leaf():
  params = {"big": jnp.full((100, 100), 3.0), "small": jnp.full((50, 40), 0.01)}
  d = _sample(params, radius=0.1, num_neighbors=2, scale="tensor")
  for name, leaf in params.items():
    sigma = 0.1 * float(jnp.linalg.norm(leaf)) / np.sqrt(leaf.size)
    assert abs(float(jnp.std(d[name])) / sigma - 1) < 0.05, name


def test_filter_scale_gaussian_std_per_unit():
  w = jnp.tile(jnp.array([0.1, 1.0, 10.0]), (400, 1))  # [fan_in=400, out=3]
  d = _sample({"w": w}, radius=0.1, num_neighbors=8, scale="filter")["w"]
  stds = np.asarray(jnp.std(d, axis=(0, 1)))
  expected = 0.1 * np.linalg.norm(np.asarray(w), axis=0) / np.sqrt(400)
  np.testing.assert_allclose(stds, expected, rtol=0.05)


def test_elementwise_scale_std_and_floor():
  w = jnp.concatenate([jnp.zeros(4000), jnp.full(4000, 2.0)])
  d = _sample({"w": w}, radius=0.1, num_neighbors=4, scale="elementwise")["w"]
  np.testing.assert_allclose(float(jnp.std(d[:, :4000])), 0.1 * 0.01, rtol=0.05)
  np.testing.assert_allclose(float(jnp.std(d[:, 4000:])), 0.1 * 2.01, rtol=0.05)


def test_mask_pytree_callable_and_prefix_leave_unselected_leaves_untouched():
  # optax's convention (optax.masked): a pytree of bools, a prefix of one, or a
  # callable params -> such a pytree; selection by path through tree_map_with_path.
  params = mlp_init(jax.random.key(0))
  mask = jax.tree_util.tree_map(lambda x: x.ndim == 2, params)
  d = _sample(params, mask=mask, num_neighbors=2)
  by_path = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "w", p)
  d2 = _sample(params, mask=by_path, num_neighbors=2)
  d3 = _sample(params, mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim == 2, p))
  for tree in (d, d2, d3):
    for layer in tree.values():
      assert bool(jnp.all(layer["b"] == 0))
      assert bool(jnp.all(layer["w"] != 0))
  perts = nrs_jax.sample_perturbations(params, jax.random.key(0), radius=0.1, mask=mask)
  assert sum(x is None for x in perts.deltas) == 2
  prefix = _sample(params, mask={"layer0": True, "layer1": False})
  assert bool(jnp.all(prefix["layer0"]["b"] != 0)) and bool(jnp.all(prefix["layer0"]["w"] != 0))
  assert bool(jnp.all(prefix["layer1"]["b"] == 0)) and bool(jnp.all(prefix["layer1"]["w"] == 0))


def test_non_float_leaves_are_never_perturbed():
  params = {"w": jnp.ones((3,)), "step": jnp.array(3, jnp.int32)}
  d = _sample(params)
  assert d["step"].dtype == jnp.int32 and bool(jnp.all(d["step"] == 0))


def test_dtype_follows_leaf():
  params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  assert _sample(params)["w"].dtype == jnp.bfloat16


def test_keys_and_seeds():
  params = {"w": jnp.zeros((10,))}
  a = _sample(params, seed=0)["w"]
  b = _sample(params, seed=0)["w"]
  c = _sample(params, seed=1)["w"]
  assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))
  raw = nrs_jax.sample_perturbations(params, jax.random.PRNGKey(0), radius=0.1).deltas[0]
  assert raw.shape == (1, 10)


@pytest.mark.parametrize("scale", nrs_jax.SCALES)
@pytest.mark.parametrize("noise", nrs_jax.NOISES)
def test_no_gradient_through_sampling_and_no_nan_at_zero_bias(noise, scale):
  params = mlp_init(jax.random.key(0), zero_bias=True)
  x = jax.random.normal(jax.random.key(1), (8, 5))

  def f(p):
    perts = nrs_jax.sample_perturbations(
      p, jax.random.key(2), radius=0.1, num_neighbors=2, noise=noise, scale=scale
    )
    return jnp.sum(perts.as_tree(p)["layer0"]["w"]) + jnp.sum(
      jax.vmap(lambda t: mlp_apply(t, x))(
        jax.tree_util.tree_map(lambda a, b: a + b, p, perts.as_tree(p))
      )
    )

  g = jax.jit(jax.grad(f))(params)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(g))
  # d/dw sum(delta) is 0: the delta is a constant; the rest is the forward grad.
  perts = nrs_jax.sample_perturbations(
    params, jax.random.key(2), radius=0.1, num_neighbors=2, noise=noise, scale=scale
  ).as_tree(params)
  g_ref = jax.grad(
    lambda p: jnp.sum(
      jax.vmap(lambda t: mlp_apply(t, x))(jax.tree_util.tree_map(lambda a, b: a + b, p, perts))
    )
  )(params)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
  params = {"w": jnp.ones(3)}
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="noise='uniform'"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, noise="uniform")
  with pytest.raises(ValueError, match="scale='layer'"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, scale="layer")
  with pytest.raises(ValueError, match="no floating-point leaves"):
    nrs_jax.sample_perturbations({"i": jnp.ones(3, jnp.int32)}, key, radius=0.1)
  with pytest.raises(ValueError, match="mask must be a pytree of bools with the structure"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, mask={"v": True})
  with pytest.raises(ValueError, match="returned by the callable mask"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, mask=lambda p: {"v": True})
  with pytest.raises(ValueError, match="tree_map_with_path"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, mask=lambda path, leaf: True)
  with pytest.raises(ValueError, match="Python bools"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, mask={"w": 1.0})
  with pytest.raises(ValueError, match="selects no floating-point leaf"):
    nrs_jax.sample_perturbations(params, key, radius=0.1, mask={"w": False})
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    nrs_jax.sample_perturbations(params, jnp.ones(3), radius=0.1)


def test_perturbations_cross_jit_and_vmap():
  # treedef is static data of the pytree, not a leaf: the object can be a jit output.
  params = mlp_init(jax.random.key(0))
  draw = lambda k: nrs_jax.sample_perturbations(params, k, radius=0.1, num_neighbors=2)
  eager = draw(jax.random.key(1))
  jitted = jax.jit(draw)(jax.random.key(1))
  assert jitted.treedef == eager.treedef
  for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_array_equal(a, b)
  batched = jax.vmap(draw)(jax.random.split(jax.random.key(1), 3))
  assert batched.deltas[0].shape == (3, *eager.deltas[0].shape)
  one = jax.tree_util.tree_map(lambda x: x[1], batched)
  np.testing.assert_array_equal(
    one.as_tree(params)["layer0"]["w"],
    draw(jax.random.split(jax.random.key(1), 3)[1]).as_tree(params)["layer0"]["w"],
  )


def test_perturbations_neighbor_is_deprecated_and_still_right():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  p = nrs_jax.sample_perturbations(params, jax.random.key(0), radius=0.1, num_neighbors=3)
  with pytest.warns(DeprecationWarning, match="Perturbations.neighbor is deprecated"):
    one = p.neighbor(2)
  for a, d in zip(one, p.deltas):
    np.testing.assert_array_equal(a, d[2])


def test_per_element_mask_moves_only_the_selected_elements():
  """A bool-array mask leaf selects elements: the draw is zero elsewhere; a sphere's length
  is exactly r over the selected elements, a Gaussian keeps its scale on them."""
  params = {"w": jnp.zeros((300, 40)), "b": jnp.zeros(40)}
  sel = np.zeros((300, 40), bool)
  sel[:, :20] = True  # half the columns
  mask = {"w": sel, "b": False}
  d = _sample(params, mask=mask, radius=0.3, num_neighbors=2)
  w = np.asarray(d["w"])
  assert np.all(w[:, ~sel] == 0) and np.all(np.asarray(d["b"]) == 0)
  assert abs(w[:, sel].std() / 0.3 - 1) < 0.03
  s = _sample(params, mask=mask, radius=0.3, num_neighbors=3, noise="sphere")
  np.testing.assert_allclose(np.sqrt((np.asarray(s["w"]) ** 2).sum((1, 2))), 0.3, rtol=1e-5)
  ball = _sample(params, mask=mask, radius=0.3, num_neighbors=200, noise="ball")
  norms = np.sqrt((np.asarray(ball["w"]) ** 2).sum((1, 2)))
  # Uniform in the ball of dimension n = 6000 selected elements: P(|v| <= r t) = t^n.
  n = int(sel.sum())
  assert stats.kstest((norms / 0.3) ** n, "uniform").pvalue > 1e-3
  # A mask array broadcast from a prefix shape, and an all-True array, read like bools.
  rows = _sample(params, mask={"w": np.arange(40) < 10, "b": np.ones(40, bool)})
  assert np.all(np.asarray(rows["w"])[..., 10:] == 0) and np.all(np.asarray(rows["b"]) != 0)


def test_per_element_mask_errors_name_the_fix():
  params = {"w": jnp.zeros((3, 4))}
  with pytest.raises(ValueError, match=r"shape \(3,\) for a leaf of shape \(3, 4\)"):
    nrs_jax.sample_perturbations(params, 0, radius=0.1, mask={"w": np.ones(3, bool)})
  with pytest.raises(ValueError, match="mask must hold Python bools"):
    jax.jit(lambda m: nrs_jax.sample_perturbations(params, 0, radius=0.1, mask={"w": m}))(
      np.ones((3, 4), bool)
    )
  # The flatness toolkit's masks select whole leaves.
  with pytest.raises(ValueError, match="selects whole leaves"):
    nrs_jax.flatness.hessian_trace(
      lambda p, b: jnp.sum(p["w"] ** 2),
      params,
      jnp.zeros(2),
      jax.random.key(0),
      mask={"w": np.eye(3, 4, dtype=bool)},
    )
