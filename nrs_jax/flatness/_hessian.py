"""Hessian diagnostics from Hessian-vector products: eigenvalues, trace, density.

All functions take ``loss_fn(params, batch) -> scalar`` and ``data``: one batch,
or a ``list`` of batches whose HVPs are averaged with weights proportional to
batch size (so a list of batches of a mean loss gives the Hessian of the loss on
their concatenation). The Krylov recurrences run on the host in float64; the
HVPs run jitted on the device in the parameters' dtype.

.. note::
  BatchNorm models: evaluate ``loss_fn`` with explicit state (eval mode, or
  fixed batch statistics); in train mode the Hessian includes the batch
  statistics' dependence on the weights. Every estimate depends on the data it
  was computed on: compare methods on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax.flatness import _data


def hvp(loss_fn: Callable[[Any, Any], jax.Array], params: Any, v: Any, batch: Any) -> Any:
  """Hessian-vector product ``H v`` by forward-over-reverse differentiation.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: the point, any pytree.
    v: a pytree like ``params``.
    batch: passed to ``loss_fn``.

  Returns:
    A pytree like ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p["w"] ** 2)
    >>> flatness.hvp(loss, {"w": jnp.ones(3)}, {"w": jnp.ones(3)}, jnp.arange(3.0))
    {'w': Array([0., 1., 2.], dtype=float32)}
  """
  return jax.jvp(jax.grad(lambda p: loss_fn(p, batch)), (params,), (v,))[1]


class EigenResult(NamedTuple):
  """Result of :func:`top_hessian_eigenvalues`.

  Attributes:
    eigenvalues: ``[k]``, in descending order.
    eigenvectors: pytree like params with a leading ``k`` axis (unit norm over
      the selected leaves, zeros on the others).
    residual_norms: ``[k]``, ``||H v - lambda v||`` measured with one more HVP each.
    num_iters: Lanczos iterations run.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> r = flatness.top_hessian_eigenvalues(loss, jnp.zeros(3), jnp.array([1.0, 3.0, 2.0]),
    ...                                      jax.random.key(0), k=1)
    >>> round(float(r.eigenvalues[0]), 4), r.eigenvectors.shape
    (3.0, (1, 3))
  """

  eigenvalues: jax.Array
  eigenvectors: Any
  residual_norms: jax.Array
  num_iters: int


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}.")
  return int(value)


def _lanczos(matvec, n, v0, num_iters, *, k=None, tol=0.0, which="LA"):
  """Lanczos with full reorthogonalisation. Returns (alphas, betas, V)."""
  V = np.zeros((num_iters + 1, n))
  alphas, betas = [], []
  V[0] = v0 / np.linalg.norm(v0)
  for j in range(num_iters):
    w = matvec(V[j])
    a = float(w @ V[j])
    alphas.append(a)
    w = w - a * V[j] - (betas[-1] * V[j - 1] if j else 0.0)
    for _ in range(2):  # full reorthogonalisation, twice is enough
      w = w - V[: j + 1].T @ (V[: j + 1] @ w)
    b = float(np.linalg.norm(w))
    if k is not None and j + 1 >= k:
      theta, y = np.linalg.eigh(_tridiag(alphas, betas))
      order = _order(theta, which)[:k]
      est = np.abs(b * y[-1, order])
      if np.all(est <= tol * np.maximum(np.abs(theta[order]), 1e-12)):
        break
    if b <= 1e-10 * max(1.0, abs(a)):  # invariant subspace found: exact
      break
    betas.append(b)
    V[j + 1] = w / b
  m = len(alphas)
  return np.array(alphas), np.array(betas[: m - 1]), V[:m]


def _tridiag(alphas, betas):
  m = len(alphas)
  T = np.diag(np.asarray(alphas, np.float64))
  if m > 1:
    off = np.asarray(betas[: m - 1], np.float64)
    T += np.diag(off, 1) + np.diag(off, -1)
  return T


def _order(theta, which):
  return np.argsort(-theta) if which == "LA" else np.argsort(-np.abs(theta))


def top_hessian_eigenvalues(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  k: int = 1,
  num_iters: int = 100,
  tol: float = 1e-5,
  which: str = "LA",
  mask: Any = None,
) -> EigenResult:
  """The k largest Hessian eigenvalues and eigenvectors, by Lanczos.

  Lanczos with full reorthogonalisation from a random start; stops when the
  Ritz residual estimates of the top k fall below ``tol * |lambda|`` or after
  ``num_iters`` iterations (or at an invariant subspace, where it is exact).

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: pytree.
    data: one batch or a list of batches (HVPs averaged by batch size).
    key: PRNG key for the start vector.
    k: number of eigenpairs.
    num_iters: maximum Lanczos iterations (>= k).
    tol: relative tolerance of the Ritz residual estimates.
    which: ``"LA"`` largest algebraic (default) or ``"LM"`` largest magnitude.
    mask: restrict to a subset of parameters (optax's convention: a pytree of
      bools like ``params``, or a callable ``params ->`` such a pytree): the
      eigenvalues of that diagonal block.

  Returns:
    An :class:`EigenResult`.

  Raises:
    ValueError: for ``which`` not ``'LA'``/``'LM'``, ``k`` < 1 or larger than the number of
      parameters, or ``num_iters`` < ``k``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> r = flatness.top_hessian_eigenvalues(
    ...     loss, jnp.zeros(4), jnp.array([1.0, 4.0, 2.0, 3.0]), jax.random.key(0), k=2)
    >>> [round(float(x), 4) for x in r.eigenvalues]
    [4.0, 3.0]
  """
  k = _check_int("k", k, 1)
  num_iters = _check_int("num_iters", num_iters, 1)
  if which not in ("LA", "LM"):
    raise ValueError(f"which={which!r} is not supported: use 'LA' or 'LM'.")
  view = _data.FlatView(params, mask)
  if k > view.size:
    raise ValueError(f"k={k} is larger than the number of parameters ({view.size}).")
  if num_iters < k:
    raise ValueError(f"num_iters={num_iters} must be >= k={k}.")
  matvec = _data.hvp_operator(loss_fn, view, data)
  v0 = np.asarray(jax.random.normal(key, (view.size,)), np.float64)
  alphas, betas, V = _lanczos(
    matvec, view.size, v0, min(num_iters, view.size), k=k, tol=tol, which=which
  )
  theta, y = np.linalg.eigh(_tridiag(alphas, betas))
  order = _order(theta, which)[: min(k, len(theta))]
  vecs = y[:, order].T @ V  # [k, n]
  vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
  residuals = np.array([np.linalg.norm(matvec(v) - t * v) for v, t in zip(vecs, theta[order])])
  trees = [view.to_tree(v) for v in vecs]
  eigenvectors = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
  return EigenResult(
    eigenvalues=jnp.asarray(theta[order]),
    eigenvectors=eigenvectors,
    residual_norms=jnp.asarray(residuals),
    num_iters=len(alphas),
  )


class TraceResult(NamedTuple):
  """Hutchinson estimate of tr(H): ``trace`` and its standard error ``stderr``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)  # a diagonal Hessian: exact
    >>> r = flatness.hessian_trace(loss, jnp.zeros(3), jnp.array([1.0, 3.0, 2.0]),
    ...                            jax.random.key(0), num_samples=4)
    >>> round(float(r.trace), 4), float(r.stderr)
    (6.0, 0.0)
  """

  trace: jax.Array
  stderr: jax.Array


def hessian_trace(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  num_samples: int = 100,
  mask: Any = None,
) -> TraceResult:
  """Hutchinson's estimator of the Hessian trace with Rademacher probes.

  ``tr(H) ~ mean_i z_i^T H z_i``, ``z_i`` with independent +-1 entries; the
  standard error is the sample standard deviation over sqrt(num_samples).

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: pytree.
    data: one batch or a list of batches.
    key: PRNG key for the probes.
    num_samples: number of probes (>= 2).
    mask: restrict to a subset of parameters (the trace of that block).

  Returns:
    A :class:`TraceResult`.

  Raises:
    ValueError: for ``num_samples`` < 2.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> r = flatness.hessian_trace(loss, jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]),
    ...                            jax.random.key(0), num_samples=4)
    >>> float(r.trace), float(r.stderr)  # exact for a diagonal Hessian
    (6.0, 0.0)
  """
  num_samples = _check_int("num_samples", num_samples, 2)
  view = _data.FlatView(params, mask)
  matvec = _data.hvp_operator(loss_fn, view, data)
  z = np.asarray(jax.random.rademacher(key, (num_samples, view.size), jnp.float32), np.float64)
  samples = np.array([zi @ matvec(zi) for zi in z])
  return TraceResult(
    trace=jnp.asarray(samples.mean()),
    stderr=jnp.asarray(samples.std(ddof=1) / np.sqrt(num_samples)),
  )


def hessian_spectral_density(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  num_iters: int = 50,
  num_runs: int = 1,
  grid_size: int = 1000,
  sigma: Optional[float] = None,
  mask: Any = None,
) -> dict[str, jax.Array]:
  """Eigenvalue density of the Hessian by stochastic Lanczos quadrature.

  Ghorbani, Krishnan and Xiao (2019): each run starts Lanczos from a random unit
  vector; the Ritz values ``theta_i`` with weights ``tau_i`` (squared first
  components of the Ritz vectors) form a quadrature of the spectral measure,
  exact for polynomials of degree < 2 * num_iters. The density is that measure
  averaged over runs and broadened by Gaussians of width ``sigma``.

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: pytree.
    data: one batch or a list of batches.
    key: PRNG key.
    num_iters: Lanczos steps per run.
    num_runs: independent runs averaged.
    grid_size: number of grid points.
    sigma: Gaussian width; default 1% of the spectrum's span.
    mask: restrict to a subset of parameters.

  Returns:
    ``{"grid", "density", "nodes", "weights"}``: the density (integrating to 1
    over the grid) and the quadrature nodes and weights (``[runs, m]``; each run's
    weights sum to 1).

  Raises:
    ValueError: for ``num_iters`` or ``num_runs`` < 1, ``grid_size`` < 2 or ``sigma`` <= 0.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)  # eigenvalues 1, 2, 3, 4
    >>> d = flatness.hessian_spectral_density(loss, jnp.zeros(4), jnp.arange(1.0, 5.0),
    ...                                       jax.random.key(0), num_iters=4)
    >>> sorted(round(float(x), 3) for x in d["nodes"][0])
    [1.0, 2.0, 3.0, 4.0]
    >>> round(float(jnp.sum(d["weights"])), 4)
    1.0
  """
  num_iters = _check_int("num_iters", num_iters, 1)
  num_runs = _check_int("num_runs", num_runs, 1)
  grid_size = _check_int("grid_size", grid_size, 2)
  view = _data.FlatView(params, mask)
  matvec = _data.hvp_operator(loss_fn, view, data)
  m = min(num_iters, view.size)
  nodes = np.full((num_runs, m), np.nan)
  weights = np.zeros((num_runs, m))
  for r, rkey in enumerate(jax.random.split(key, num_runs)):
    v0 = np.asarray(jax.random.normal(rkey, (view.size,)), np.float64)
    alphas, betas, _ = _lanczos(matvec, view.size, v0, m)
    theta, y = np.linalg.eigh(_tridiag(alphas, betas))
    nodes[r, : len(theta)] = theta
    weights[r, : len(theta)] = y[0] ** 2
  valid = ~np.isnan(nodes)
  lo, hi = np.min(nodes[valid]), np.max(nodes[valid])
  span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
  s = 0.01 * span if sigma is None else float(sigma)
  if not s > 0:
    raise ValueError(f"sigma={sigma!r} must be > 0.")
  grid = np.linspace(lo - 6 * s, hi + 6 * s, grid_size)
  th = np.where(valid, nodes, 0.0)[..., None]
  gauss = np.exp(-0.5 * ((grid - th) / s) ** 2) / (s * np.sqrt(2 * np.pi))
  density = (weights[..., None] * gauss).sum((0, 1)) / num_runs
  return {
    "grid": jnp.asarray(grid),
    "density": jnp.asarray(density),
    "nodes": jnp.asarray(np.where(valid, nodes, 0.0)),
    "weights": jnp.asarray(weights),
  }


def _path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def layerwise_hessian(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  group: str = "leaf",
  num_iters: int = 50,
  num_samples: int = 50,
) -> dict[str, jax.Array]:
  """Top eigenvalue and trace of each diagonal block of the Hessian.

  Args:
    loss_fn, params, data, key: as in :func:`top_hessian_eigenvalues`.
    group: ``"leaf"`` (one block per float leaf) or ``"module"`` (leaves that
      share a path prefix, e.g. a layer's kernel and bias; for a Flax NNX
      ``State`` the variables of one module).
    num_iters: Lanczos iterations per block.
    num_samples: Hutchinson probes per block.

  Returns:
    A flat dict ``{"hessian/<name>/lambda_max": ..., "hessian/<name>/trace": ...}``.

  Raises:
    ValueError: for a ``group`` other than ``'leaf'`` or ``'module'``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> loss = lambda p, s: jnp.sum(s * p["a"] ** 2) + 5.0 * jnp.sum(p["b"] ** 2)
    >>> m = flatness.layerwise_hessian(loss, params, jnp.array([1.0, 2.0]),
    ...                                jax.random.key(0), num_iters=2, num_samples=2)
    >>> {k: round(float(v), 3) for k, v in sorted(m.items())}
    {'hessian/a/lambda_max': 4.0, 'hessian/a/trace': 6.0, 'hessian/b/lambda_max': 10.0, 'hessian/b/trace': 20.0}
  """
  if group not in ("leaf", "module"):
    raise ValueError(f"group={group!r} is not supported: use 'leaf' or 'module'.")
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  names: list[Optional[str]] = []
  for path, leaf in path_leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      names.append(None)
      continue
    if path and getattr(path[-1], "name", None) == "value":
      path = path[:-1]  # a Flax NNX Variable's own attribute: the leaf is the variable
    p = path if group == "leaf" or len(path) <= 1 else path[:-1]
    names.append(_path_name(p))
  out = {}
  for i, name in enumerate(dict.fromkeys(n for n in names if n is not None)):
    flags = [n == name for n in names]
    mask = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)
    m = hessian_metrics(
      loss_fn,
      params,
      data,
      jax.random.fold_in(key, i),
      num_iters=num_iters,
      num_samples=num_samples,
      mask=mask,
    )
    out[f"hessian/{name}/lambda_max"] = m["hessian/lambda_max"]
    out[f"hessian/{name}/trace"] = m["hessian/trace"]
  return out


def hessian_metrics(
  loss_fn: Callable[[Any, Any], jax.Array],
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  k: int = 1,
  num_iters: int = 100,
  num_samples: int = 100,
  mask: Any = None,
) -> dict[str, jax.Array]:
  """Top-k eigenvalues and trace as a flat dict for a metrics writer.

  Args:
    loss_fn, params, data, key, mask: as in :func:`top_hessian_eigenvalues`.
    k: how many top eigenvalues.
    num_iters: Lanczos iterations.
    num_samples: Hutchinson probes for the trace.

  Returns:
    ``{"hessian/lambda_max", "hessian/lambda_<i>" (i < k), "hessian/trace",
    "hessian/trace_stderr", "hessian/residual_max"}``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from nrs_jax import flatness
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> m = flatness.hessian_metrics(loss, jnp.zeros(3), jnp.array([1.0, 3.0, 2.0]),
    ...                              jax.random.key(0), num_iters=3, num_samples=2)
    >>> round(float(m["hessian/lambda_max"]), 4), round(float(m["hessian/trace"]), 4)
    (3.0, 6.0)
  """
  k1, k2 = jax.random.split(key)
  eig = top_hessian_eigenvalues(loss_fn, params, data, k1, k=k, num_iters=num_iters, mask=mask)
  tr = hessian_trace(loss_fn, params, data, k2, num_samples=num_samples, mask=mask)
  out = {"hessian/lambda_max": eig.eigenvalues[0]}
  for i in range(1, k):
    out[f"hessian/lambda_{i}"] = eig.eigenvalues[i]
  out["hessian/trace"] = tr.trace
  out["hessian/trace_stderr"] = tr.stderr
  out["hessian/residual_max"] = jnp.max(eig.residual_norms)
  return out
