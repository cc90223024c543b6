"""Sampling the K neighbour perturbations ``delta_k ~ Q_r(w)``: one flat normal draw per
neighbour for all leaves, constants computed from ``stop_gradient(params)``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _options

ELEMENTWISE_FLOOR = 0.01  # T(w)_i = |w_i| + floor, as in ASAM (Kwon et al., 2021)
_KEY_WORDS = {2: "threefry2x32", 4: "rbg"}  # raw key data size -> built-in implementation


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def as_key(key: Any) -> jax.Array:
  """A typed key from a typed key, an int seed, or raw ``uint32`` key data (the default
  implementation if its size fits, else the built-in one of its size)."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] in _KEY_WORDS:
    default = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape[-1]
    impl = None if default == key.shape[-1] else _KEY_WORDS[key.shape[-1]]
    return jax.random.wrap_key_data(key, impl=impl)
  if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key(key)
  raise ValueError(
    f"key must be a PRNG key (jax.random.key(seed)), raw key data "
    f"(jax.random.PRNGKey(seed)) or an int seed; got an array of dtype {key.dtype} "
    f"and shape {key.shape}."
  )


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's


def _threefry_normal_cpu(kd: jax.Array, n: int) -> jax.Array:
  """``jax.random.normal`` of threefry key data ``kd [rows, 2]``, bit for bit: Threefry-2x32
  unrolled, under an always-true ``cond`` so that it is materialised once (docs: method)."""
  length = -(-n // 256) * 256

  def draw(kd):
    k1, k2 = kd[:, :1], kd[:, 1:]
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1 = jnp.zeros((1, length), jnp.uint32) + ks[0]
    x2 = jax.lax.iota(jnp.uint32, length)[None] + ks[1]
    for i in range(5):
      for r in _ROTATIONS[i % 2]:
        x1 = x1 + x2
        x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
      x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    bits = ((x1 ^ x2) >> np.uint32(9)) | np.uint32(0x3F800000)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = (jax.lax.bitcast_convert_type(bits, jnp.float32) - 1.0) * (1.0 - low) + low
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(jnp.maximum(low, u))

  always = jnp.all((kd[:, 0] | np.uint32(1)) != np.uint32(0))
  zeros = lambda kd: jnp.zeros((kd.shape[0], length), jnp.float32)
  return jax.lax.cond(always, draw, zeros, kd)[:, :n]  # (cut outside: not fused in)


def standard_normal(keys: jax.Array, n: int, fused: bool = True, dtype: Any = jnp.float32):
  """Row ``i`` is ``jax.random.normal(keys[i], (n,), dtype)``; on the CPU (a
  ``platform_dependent``) partitionable threefry keys take the kernel above (float32 only)."""
  generic = lambda keys: jax.vmap(lambda k: jax.random.normal(k, (n,), dtype))(keys)
  impl = jax.random.key_impl(keys)
  threefry = "threefry" in str(getattr(impl, "name", impl))
  partitionable = jax.config.jax_threefry_partitionable  # type: ignore[attr-defined]
  if not (fused and threefry) or n >= 2**31 or not partitionable or dtype != jnp.float32:
    return generic(keys)
  kd = jax.random.key_data(keys)
  return jax.lax.platform_dependent(
    kd,
    cpu=lambda kd: _threefry_normal_cpu(kd, n),
    default=lambda kd: generic(jax.random.wrap_key_data(kd, impl="threefry2x32")),
  )


def standard_rademacher(keys: jax.Array, n: int, dtype: Any = jnp.float32) -> jax.Array:
  """Row ``i``: ``n`` independent signs +-1 from ``keys[i]``, 32 per drawn ``uint32`` word (a
  word's bit ``j`` is the sign of its element ``j``): 1/32 of a normal draw's hashing."""
  words = jax.vmap(lambda k: jax.random.bits(k, (-(-n // 32),), jnp.uint32))(keys)
  bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & np.uint32(1)
  return (1 - 2 * bits.reshape(keys.shape[0], -1)[:, :n].astype(dtype)).astype(dtype)


def _takes_two_args(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return sum(p.kind in kinds and p.default is p.empty for p in params) == 2


def resolve_mask(params: Any, mask: Any) -> list:
  """optax's mask convention, per leaf of ``params`` (flatten order): a bool, or a numpy
  bool array of the leaf's shape where a mask leaf selects some of its elements only."""
  if mask is None:
    return [True] * len(jax.tree_util.tree_leaves(params))
  what, tree = "mask", mask
  if _options.is_function(mask):
    if _takes_two_args(mask):
      raise ValueError(
        "mask is a callable of two arguments; mask follows optax's convention: a "
        "pytree of bools like params, or a callable params -> such a pytree. For a "
        "(path, leaf) predicate write mask=lambda p: jax.tree_util.tree_map_with_path("
        "predicate, p)."
      )
    what, tree = "the pytree returned by the callable mask", mask(params)
  full = _options.broadcast_prefix(tree, params, what)
  _options.check_mask_leaves(full, what)
  return [_leaf_mask(m, x, what) for m, x in zip(full, jax.tree_util.tree_leaves(params))]


def _leaf_mask(m: Any, x: Any, what: str) -> bool | np.ndarray:
  """A mask leaf as a bool, or (some elements selected) a bool array of ``x``'s shape."""
  if not jnp.ndim(m):
    return bool(m)
  try:
    m = np.broadcast_to(np.asarray(m), jnp.shape(x))
  except ValueError:
    raise ValueError(
      f"{what} has a bool array of shape {np.shape(m)} for a leaf of shape {jnp.shape(x)}: "
      "a per-element mask must broadcast to its leaf's shape."
    ) from None
  return bool(m.all()) if m.all() or not m.any() else m


def perturbed_leaf_mask(params: Any, mask: Any = None) -> list[bool]:
  """Per leaf of ``params`` (flatten order), whether NRS acts on (some elements of) it: a float
  leaf ``mask`` selects; a ValueError if there is none or the mask does not fit."""
  leaves = jax.tree_util.tree_leaves(params)
  floats = [is_float(leaf) for leaf in leaves]
  if not any(floats):
    raise ValueError(
      "params has no floating-point leaves to perturb; NRS needs the model's "
      "trainable float parameters (got leaf dtypes "
      f"{sorted({str(getattr(leaf, 'dtype', type(leaf))) for leaf in leaves})})."
    )
  selected = [m is not False and f for m, f in zip(resolve_mask(params, mask), floats)]
  if not any(selected):
    raise ValueError(
      "mask selects no floating-point leaf of params: nothing would be perturbed. "
      "Select at least one float leaf, or use mask=None for all of them."
    )
  return selected


def _scale_factor(w: jax.Array, scale: str, noise: str) -> float | jax.Array:
  """Per-element multiplier s(w) of the unit-radius noise (float32)."""
  if scale == "absolute":
    return 1.0
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  if scale == "elementwise":
    return jnp.abs(w) + ELEMENTWISE_FLOOR
  if scale == "tensor" or w.ndim <= 1:
    s, fan = jnp.linalg.norm(w), w.size
  else:  # filter: the norm of each output unit (the last axis)
    axes = tuple(range(w.ndim - 1))
    s = jnp.broadcast_to(jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True)), w.shape)
    fan = w.size // w.shape[-1]
  return s if noise in ("ball", "sphere") else s / math.sqrt(max(fan, 1))


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["deltas"], meta_fields=["treedef"]
)
@dataclasses.dataclass(frozen=True)
class Perturbations:
  """K sampled perturbations, a pytree: ``deltas`` per leaf of ``params`` in flatten order,
  ``(K, *leaf.shape)`` or ``None`` (not perturbed), and ``treedef`` (static).

  >>> p = sample_perturbations({"w": jnp.ones(3), "b": jnp.ones(2)}, 0, radius=0.1,
  ...                          mask={"w": True, "b": False})
  >>> [None if d is None else d.shape for d in p.deltas]  # flatten order: b, w
  [None, (1, 3)]
  >>> bool(jnp.all(p.deltas[1] != 0))  # w moves; b, masked out, has no delta at all
  True
  """

  deltas: list
  treedef: Any

  def neighbor(self, i: int) -> list:
    """Deprecated: ``[None if d is None else d[i] for d in p.deltas]``."""
    warnings.warn(
      "Perturbations.neighbor is deprecated and will be removed in the next release: "
      "use [None if d is None else d[i] for d in p.deltas], or p.as_tree(params).",
      DeprecationWarning,
      stacklevel=2,
    )
    return [None if d is None else d[i] for d in self.deltas]

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
  radius: Any,
  num_neighbors: int = 1,
  noise: str = "gaussian",
  scale: str = "absolute",
  mask: Any = None,
) -> Perturbations:
  """K independent perturbations ``delta_k ~ Q_r(w)`` of ``params`` (options: :func:`nrs_penalty`).

  Raises:
    ValueError: for an invalid ``num_neighbors``, ``noise`` or ``scale``, a ``radius`` or
      ``mask`` that does not fit ``params``, or ``params`` without a float leaf.

  Examples:
    >>> import jax, jax.numpy as jnp, nrs_jax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> p = nrs_jax.sample_perturbations(
    ...     params, jax.random.key(0), radius=0.1, num_neighbors=4, noise="sphere")
    >>> tree = p.as_tree(params)  # a leading K axis on every leaf
    >>> norms = jnp.sqrt((tree["w"] ** 2).sum((1, 2)) + (tree["b"] ** 2).sum(1))
    >>> [round(float(n), 4) for n in norms]  # on the sphere: length exactly r
    [0.1, 0.1, 0.1, 0.1]
  """
  k = _options.check_positive_int("num_neighbors", num_neighbors)
  sampler = Sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)
  return Perturbations(sampler.draw(params, jax.random.split(as_key(key), k)), sampler.treedef)


class Sampler:
  """The leaves NRS acts on and the draw of their perturbations. ``selected[i]``: leaf ``i``
  gets the penalty gradient; ``moving[i]``: it is perturbed (radius not a static 0)."""

  def __init__(self, params, *, radius, noise, scale, mask):
    _options.check_choice("noise", noise, _options.NOISES)
    _options.check_choice("scale", scale, _options.SCALES)
    self.treedef = jax.tree_util.tree_structure(params)
    resolved = resolve_mask(params, mask)  # (a callable mask is called once)
    tree = jax.tree_util.tree_unflatten(self.treedef, resolved)
    self.selected = perturbed_leaf_mask(params, tree)
    self.elements = [m if isinstance(m, np.ndarray) else None for m in resolved]
    self.radii = _options.broadcast_prefix(radius, params, "radius", "scalars")
    self.scalar_radius = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(radius))
    self.moving = [s and not _options.is_static_zero(r) for s, r in zip(self.selected, self.radii)]
    if not any(self.moving):  # radius 0 everywhere: zero deltas, drawn as for any radius
      self.moving = self.selected
    leaves = jax.tree_util.tree_leaves(params)
    self.sizes = [int(x.size) if m else 0 for x, m in zip(leaves, self.moving)]
    # Per-element masks: the draw is zero off the selected elements (before a ball's norm).
    self.keep = None
    if any(e is not None for e, m in zip(self.elements, self.moving) if m):
      parts = [
        np.ones(n, bool) if e is None else e.ravel() for e, n in zip(self.elements, self.sizes)
      ]
      self.keep = np.concatenate([p for p, n in zip(parts, self.sizes) if n])
    # The draw's dtype: float64 where a perturbed leaf is (x64; float32 rounding otherwise).
    wide = [x.dtype for x, m in zip(leaves, self.moving) if m and x.dtype == jnp.float64]
    self.dtype = jnp.float64 if wide else jnp.float32
    self.noise, self.scale = noise, scale

  def draw(self, params: Any, keys: jax.Array, fused: bool = True) -> list:
    """Per leaf, deltas ``[len(keys), ...]`` (neighbour ``i`` from ``keys[i]``) or None."""
    n, total, dtype = keys.shape[0], sum(self.sizes), self.dtype
    key_dir, key_len = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    if self.noise == "rademacher":
      v = standard_rademacher(key_dir, total, dtype)
    else:
      v = standard_normal(key_dir, total, fused, dtype)
    if self.keep is not None:
      v, total = v * self.keep.astype(dtype), int(self.keep.sum())
    length: Any = 1.0
    if self.noise in ("ball", "sphere"):
      norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=1, keepdims=True))
    if self.noise == "ball":
      u = jax.vmap(lambda k: jax.random.uniform(k, (), dtype))(key_len)
      length = jnp.exp(jnp.log(u) / total)[:, None]

    def scaled(v, r):  # radius r times the unit-radius sample
      r = jnp.asarray(r, dtype)
      return v * ((r * length) / norm) if self.noise in ("ball", "sphere") else r * v

    if self.scalar_radius:
      v = scaled(v, self.radii[0])
    parts = jnp.split(v, np.cumsum(self.sizes)[:-1].tolist(), axis=1)
    deltas: list = []
    for x, size, r, part in zip(jax.tree_util.tree_leaves(params), self.sizes, self.radii, parts):
      if size == 0:
        deltas.append(None)
        continue
      part = part if self.scalar_radius else scaled(part, r)
      s = _scale_factor(jax.lax.stop_gradient(x), self.scale, self.noise)
      deltas.append(jax.lax.stop_gradient(part.reshape((n, *x.shape)) * s).astype(x.dtype))
    return deltas


def apply_perturbation(params: Any, deltas: list) -> Any:
  """``params + delta`` for one neighbour (deltas without the K axis)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [x if d is None else x + d for x, d in zip(leaves, deltas)]
  return jax.tree_util.tree_unflatten(treedef, out)
