"""Sampling the K neighbour perturbations ``delta_k ~ Q_r(w)``.

A perturbation is described by a noise *shape* (``gaussian``, ``ball``,
``sphere``), a *scale* that says what the radius is relative to (``absolute``,
``tensor``, ``filter``, ``elementwise``) and a *mask* that chooses the leaves
that move. All K perturbations of all leaves come from one flat draw of
standard normals, which keeps the number of traced random ops (and so compile
time) independent of the number of leaves.

The perturbations are constants: they are computed from
``jax.lax.stop_gradient(params)`` so no gradient flows through the sampling
(and none through the norms of relative scales, whose gradient at zero is
undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

NOISES = ("gaussian", "ball", "sphere")
SCALES = ("absolute", "tensor", "filter", "elementwise")

# T(w)_i = |w_i| + floor, as in ASAM (Kwon et al., 2021), so zeros still move.
ELEMENTWISE_FLOOR = 0.01

MaskLike = Union[None, Any, Callable[[tuple, jax.Array], bool]]


def _is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported: use one of {tuple(allowed)}.")


def perturbed_leaf_mask(params: Any, mask: MaskLike = None) -> list[bool]:
  """Returns, for each leaf of ``params`` in flatten order, whether it moves.

  Args:
    params: a pytree of arrays.
    mask: ``None`` (every floating-point leaf), a pytree of bools with the
      structure of ``params``, or a predicate ``(path, leaf) -> bool`` where
      ``path`` is the tuple of keys from ``jax.tree_util.tree_flatten_with_path``.

  Raises:
    ValueError: if ``params`` has no floating-point leaf, if the mask's structure
      differs from that of ``params``, or if the mask selects no floating leaf.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [leaf for _, leaf in path_leaves]
  floats = [_is_float(leaf) for leaf in leaves]
  if not any(floats):
    raise ValueError(
      "params has no floating-point leaves to perturb; NRS needs the model's "
      "trainable float parameters (got leaf dtypes "
      f"{sorted({str(getattr(leaf, 'dtype', type(leaf))) for leaf in leaves})})."
    )
  if mask is None:
    selected = floats
  elif callable(mask):
    selected = [bool(mask(path, leaf)) and f for (path, leaf), f in zip(path_leaves, floats)]
  else:
    mask_leaves, mask_def = jax.tree_util.tree_flatten(mask)
    if mask_def != treedef:
      raise ValueError(
        "mask must have the same tree structure as params (a pytree of bools) or "
        f"be a predicate (path, leaf) -> bool; got mask structure {mask_def}, "
        f"params structure {treedef}."
      )
    selected = [bool(m) and f for m, f in zip(mask_leaves, floats)]
  if not any(selected):
    raise ValueError(
      "mask selects no floating-point leaf of params: nothing would be perturbed. "
      "Select at least one float leaf, or use mask=None for all of them."
    )
  return selected


def _filter_norms(w: jax.Array) -> jax.Array:
  """Norm of each output unit (the last axis), broadcast to w's shape."""
  if w.ndim <= 1:
    return jnp.broadcast_to(jnp.linalg.norm(w), w.shape)
  axes = tuple(range(w.ndim - 1))
  return jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True)), w.shape)


def _scale_factor(w: jax.Array, scale: str, noise: str) -> Union[float, jax.Array]:
  """Per-element multiplier s(w) of the unit-radius noise (float32)."""
  if scale == "absolute":
    return 1.0
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  if scale == "tensor":
    s = jnp.linalg.norm(w)
    return s / math.sqrt(max(w.size, 1)) if noise == "gaussian" else s
  if scale == "filter":
    s = _filter_norms(w)
    if noise == "gaussian":
      fan = w.size if w.ndim <= 1 else w.size // w.shape[-1]
      s = s / math.sqrt(max(fan, 1))
    return s
  if scale == "elementwise":
    return jnp.abs(w) + ELEMENTWISE_FLOOR
  raise ValueError(f"scale={scale!r} is not supported: use one of {SCALES}.")


class Perturbations(NamedTuple):
  """K sampled perturbations, aligned with the flattened params.

  Attributes:
    deltas: one entry per leaf of ``params`` in flatten order: an array of shape
      ``(K, *leaf.shape)`` in the leaf's dtype, or ``None`` for a leaf that is
      not perturbed.
    treedef: the tree structure of ``params``.
  """

  deltas: list
  treedef: Any

  def neighbor(self, i: int) -> list:
    """The deltas of neighbour ``i`` (no K axis), for :func:`apply_perturbation`."""
    return neighbor_deltas(self.deltas, i)

  def as_tree(self, params: Any) -> Any:
    """The perturbations as a pytree like ``params`` (zeros where not perturbed)."""
    leaves = jax.tree_util.tree_leaves(params)
    k = next(d.shape[0] for d in self.deltas if d is not None)
    out = [
      d if d is not None else jnp.zeros((k, *jnp.shape(x)), jnp.result_type(x))
      for d, x in zip(self.deltas, leaves)
    ]
    return jax.tree_util.tree_unflatten(self.treedef, out)


def sample_perturbations(
  params: Any,
  key: jax.Array,
  *,
  radius: Union[float, jax.Array],
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  mask: MaskLike = None,
) -> Perturbations:
  """Samples K independent perturbations ``delta_k ~ Q_r(w)`` of ``params``.

  Noise shapes (``v`` is the unit-scale sample, ``N`` the number of perturbed
  elements over all perturbed leaves together):

  - ``gaussian``: ``v_i ~ N(0, radius^2)`` independently.
  - ``ball``: ``v`` uniform in the L2 ball of radius ``radius`` in R^N.
  - ``sphere``: ``v`` uniform on the sphere of radius ``radius`` in R^N.

  The perturbation is ``delta = s(w) * v`` elementwise, where the scale is

  - ``absolute``: ``s = 1``;
  - ``tensor``: ``s = ||w_leaf||`` (divided by ``sqrt(leaf size)`` for gaussian,
    so each leaf moves by about ``radius * ||w_leaf||``);
  - ``filter``: ``s`` = the norm of the output unit (last axis) the element
    belongs to (divided by ``sqrt(fan-in)`` for gaussian); 0-d and 1-d leaves
    use the leaf norm;
  - ``elementwise``: ``s = |w_i| + 0.01`` (the floor lets zeros move).

  Args:
    params: pytree of arrays (the centre ``w``).
    key: a PRNG key (typed or raw).
    radius: the radius ``r`` (a float or a traced scalar).
    num_neighbors: K, a static Python int.
    noise: ``"gaussian"``, ``"ball"`` or ``"sphere"``.
    scale: ``"absolute"``, ``"tensor"``, ``"filter"`` or ``"elementwise"``.
    mask: which leaves move, see :func:`perturbed_leaf_mask`.

  Returns:
    A :class:`Perturbations`; ``.as_tree(params)`` gives a pytree with a leading
    K axis on every leaf.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> p = nrs_jax.sample_perturbations(
    ...     params, jax.random.key(0), radius=0.1, num_neighbors=4, noise="sphere")
    >>> tree = p.as_tree(params)
    >>> tree["w"].shape
    (4, 3, 2)
    >>> norms = jnp.sqrt(tree["w"].reshape(4, -1).__pow__(2).sum(1)
    ...                  + tree["b"].__pow__(2).sum(1))
    >>> bool(jnp.allclose(norms, 0.1))
    True
  """
  k = _static_num_neighbors(num_neighbors)
  sampler = make_sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)
  return Perturbations(sampler(jax.random.split(_as_key(key), k)), sampler.treedef)


class _Sampler:
  """Draws the perturbations of given neighbour keys; see sample_perturbations."""

  def __init__(self, params, *, radius, noise, scale, mask):
    check_choice("noise", noise, NOISES)
    check_choice("scale", scale, SCALES)
    self.leaves, self.treedef = jax.tree_util.tree_flatten(params)
    selected = perturbed_leaf_mask(params, mask)
    self.sizes = [int(x.size) if s else 0 for x, s in zip(self.leaves, selected)]
    self.total = sum(self.sizes)
    self.radius, self.noise, self.scale = radius, noise, scale

  def _flat(self, keys):
    """Unit-scale samples, one row per key, flat over all perturbed leaves (float32)."""
    key_dir, key_len = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    v = standard_normal(key_dir, self.total)
    radius = jnp.asarray(self.radius, jnp.float32)
    if self.noise == "gaussian":
      return radius * v
    length = radius
    if self.noise == "ball":
      u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key_len)
      length = radius * jnp.exp(jnp.log(u) / self.total)[:, None]
    return v * (length / jnp.sqrt(jnp.sum(jnp.square(v), axis=1, keepdims=True)))

  def __call__(self, keys: jax.Array) -> list:
    """Deltas (one entry per leaf; None if not perturbed) with a leading len(keys) axis."""
    flat = self._flat(keys)
    n = keys.shape[0]
    deltas: list = []
    offset = 0
    for x, size in zip(self.leaves, self.sizes):
      if size == 0:
        deltas.append(None)
        continue
      v = flat[:, offset : offset + size].reshape((n, *x.shape))
      offset += size
      s = _scale_factor(jax.lax.stop_gradient(x), self.scale, self.noise)
      deltas.append(jax.lax.stop_gradient(v * s).astype(x.dtype))
    return deltas


_THREEFRY = jax.random.key_impl(jax.random.key(0))
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PAD = 256  # the fused draw's length is a multiple of this (whole vectors per thread)


def _padded(n: int) -> int:
  """The length of the kernel that draws ``n`` normals: see standard_normal."""
  return -(-n // _PAD) * _PAD


def _threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 block function (20 rounds), unrolled, as jax defines it."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def standard_normal(keys: jax.Array, n: int) -> jax.Array:
  """Row ``i`` is ``jax.random.normal(keys[i], (n,), float32)``, bit for bit.

  On CPU jax lowers threefry as a ``while`` loop over its 5 groups of rounds (a
  compile-time saving), so each group writes its state to memory; that made the
  draw a third of a small MLP's NRS step. This is the same computation (the
  block function over the counters of jax's default partitionable layout, then
  jax's uniform-to-normal transform) in straight-line ops that XLA fuses into
  one kernel. It runs inside a ``lax.cond`` whose predicate is always true but
  not known to the compiler: the draw is then materialised once, where XLA
  would otherwise copy the whole fused kernel into every consumer (a perturbed
  weight feeds both the forward and the backward pass). The kernel's length is
  ``n`` rounded up to a multiple of ``_PAD`` and the tail is cut off outside the
  cond (counter ``i`` gives element ``i``, so the numbers are the same): XLA:CPU
  splits the kernel over its threads, and at an odd length the split kernel ran
  6x slower than the single-threaded loop (2 threads). Keys of another
  implementation (``rbg``), draws that reach 2^32 once padded, and the
  non-partitionable threefry layout use ``jax.random.normal`` itself.
  """
  padded = _padded(n)
  if (
    jax.random.key_impl(keys) != _THREEFRY
    or padded >= 2**32
    or not jax.config.jax_threefry_partitionable
  ):
    return jax.vmap(lambda k: jax.random.normal(k, (n,), jnp.float32))(keys)
  kd = jax.random.key_data(keys)  # [rows, 2]

  def draw(kd):
    hi, lo = _threefry2x32(
      kd[:, :1],
      kd[:, 1:],
      jnp.zeros((1, padded), jnp.uint32),
      jax.lax.iota(jnp.uint32, padded)[None],
    )
    bits = hi ^ lo
    one = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(low, (one - np.float32(1.0)) * (np.float32(1.0) - low) + low)
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)

  always = jnp.all((kd[:, 0] | np.uint32(1)) != np.uint32(0))
  # The cut is outside the cond: inside, XLA would fuse it into the kernel.
  z = jax.lax.cond(always, draw, lambda kd: jnp.zeros((kd.shape[0], padded), jnp.float32), kd)
  return z[:, :n]


def make_sampler(params: Any, *, radius, noise="gaussian", scale="absolute", mask=None) -> _Sampler:
  """A function ``keys [n] -> deltas`` drawing neighbour ``i`` from ``keys[i]``."""
  return _Sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)


def _static_num_neighbors(num_neighbors: Any) -> int:
  if isinstance(num_neighbors, jax.core.Tracer):
    raise ValueError(
      "num_neighbors must be a static Python int, got a traced value. With "
      "optax.inject_hyperparams pass static_args=('num_neighbors',)."
    )
  if isinstance(num_neighbors, bool):
    raise ValueError(f"num_neighbors={num_neighbors!r} must be an int >= 1.")
  try:
    k = int(num_neighbors)
  except (TypeError, ValueError):
    raise ValueError(f"num_neighbors={num_neighbors!r} must be an int >= 1.") from None
  if k != num_neighbors or k < 1:
    raise ValueError(f"num_neighbors={num_neighbors!r} must be an int >= 1.")
  return k


def _as_key(key: Any) -> jax.Array:
  """Accepts a typed key, a raw uint32 key, or an integer seed."""
  if isinstance(key, int) and not isinstance(key, bool):
    return jax.random.key(key)
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.ndim >= 1:
    return jax.random.wrap_key_data(key)
  if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key(key)
  raise ValueError(
    f"key must be a PRNG key (jax.random.key(seed)) or an int seed; got an array "
    f"of dtype {key.dtype} and shape {key.shape}."
  )


def neighbor_deltas(deltas: Sequence[Optional[jax.Array]], i: int) -> list:
  """Neighbour ``i``'s entry of per-leaf deltas with a leading K axis (None stays None)."""
  return [None if d is None else d[i] for d in deltas]


def apply_perturbation(params: Any, deltas: Sequence[Optional[jax.Array]]) -> Any:
  """``params + delta`` for one neighbour (deltas without the K axis)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [x if d is None else x + d for x, d in zip(leaves, deltas)]
  return jax.tree_util.tree_unflatten(treedef, out)
