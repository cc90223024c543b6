"""Sampling the K neighbour perturbations ``delta_k ~ Q_r(w)``.

Each neighbour's perturbations of all leaves come from one flat normal draw, so
the number of random ops does not grow with the number of leaves. They are
constants, computed from ``stop_gradient(params)`` (the norms of relative
scales have no gradient at zero).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax._options import NOISES
from nrs_jax._options import SCALES
from nrs_jax._options import broadcast_prefix
from nrs_jax._options import check_choice
from nrs_jax._options import check_mask_leaves
from nrs_jax._options import check_positive_int
from nrs_jax._options import is_function
from nrs_jax._options import is_static_zero

# T(w)_i = |w_i| + floor, as in ASAM (Kwon et al., 2021), so zeros still move.
ELEMENTWISE_FLOOR = 0.01
_KEY_WORDS = {2: "threefry2x32", 4: "rbg"}  # raw key data size -> built-in implementation

MaskLike = Union[None, Any, Callable[[Any], Any]]


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def as_key(key: Any) -> jax.Array:
  """A typed PRNG key from a typed key, raw ``uint32`` key data, or an integer seed.

  Raw key data takes the default implementation when its size matches, else
  the built-in one of its size (2 words: threefry2x32, 4: rbg), so a key made
  under one ``JAX_DEFAULT_PRNG_IMPL`` keeps working under another.
  """
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


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_normal_cpu(kd: jax.Array, n: int) -> jax.Array:
  """``jax.random.normal`` of threefry key data ``kd [rows, 2]``, bit for bit, unrolled.

  jax lowers threefry for the CPU as a rolled loop, and XLA:CPU copies a fused draw
  into every consumer. This is the same Threefry-2x32 (20 rounds) and bits-to-normal
  map written out straight, padded to whole vectors (a multiple of 256), inside a
  conditional that is always true but unknown to the compiler, so the draw is
  materialised once (measurements: docs, method).
  """
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


def standard_normal(keys: jax.Array, n: int, fused: bool = True) -> jax.Array:
  """Row ``i`` is ``jax.random.normal(keys[i], (n,), float32)``, bit for bit.

  On the CPU, threefry keys in jax's partitionable layout take the kernel above,
  chosen by ``platform_dependent``: a program exported for GPU/TPU holds only
  ``jax.random``.
  """
  generic = lambda keys: jax.vmap(lambda k: jax.random.normal(k, (n,), jnp.float32))(keys)
  impl = jax.random.key_impl(keys)
  threefry = "threefry" in str(getattr(impl, "name", impl))
  if not (fused and threefry) or n >= 2**31 or not jax.config.jax_threefry_partitionable:  # type: ignore[attr-defined]
    return generic(keys)
  kd = jax.random.key_data(keys)
  return jax.lax.platform_dependent(
    kd,
    cpu=lambda kd: _threefry_normal_cpu(kd, n),
    default=lambda kd: generic(jax.random.wrap_key_data(kd, impl="threefry2x32")),
  )


def key_impl(key: Any) -> Any:
  """The implementation of a key, as ``jax.random.wrap_key_data`` takes it (any jax version)."""
  return jax.random.key_impl(as_key(key))


def _takes_two_args(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return sum(p.kind in kinds and p.default is p.empty for p in params) == 2


def resolve_mask(params: Any, mask: MaskLike) -> list:
  """optax's mask convention, as bools per leaf of ``params`` (flatten order)."""
  if mask is None:
    return [True] * len(jax.tree_util.tree_leaves(params))
  what, tree = "mask", mask
  if is_function(mask):
    if _takes_two_args(mask):
      raise ValueError(
        "mask is a callable of two arguments; mask follows optax's convention: a "
        "pytree of bools like params, or a callable params -> such a pytree. For a "
        "(path, leaf) predicate write mask=lambda p: jax.tree_util.tree_map_with_path("
        "predicate, p)."
      )
    what, tree = "the pytree returned by the callable mask", mask(params)
  full = broadcast_prefix(tree, params, what)
  check_mask_leaves(full, what)
  return [bool(m) for m in full]


def perturbed_leaf_mask(params: Any, mask: MaskLike = None) -> list[bool]:
  """For each leaf of ``params`` in flatten order, whether NRS acts on it (see ``mask``).

  Raises:
    ValueError: if ``params`` has no float leaf, the mask does not fit
      ``params``, or it selects no float leaf.
  """
  leaves = jax.tree_util.tree_leaves(params)
  floats = [is_float(leaf) for leaf in leaves]
  if not any(floats):
    raise ValueError(
      "params has no floating-point leaves to perturb; NRS needs the model's "
      "trainable float parameters (got leaf dtypes "
      f"{sorted({str(getattr(leaf, 'dtype', type(leaf))) for leaf in leaves})})."
    )
  selected = [m and f for m, f in zip(resolve_mask(params, mask), floats)]
  if not any(selected):
    raise ValueError(
      "mask selects no floating-point leaf of params: nothing would be perturbed. "
      "Select at least one float leaf, or use mask=None for all of them."
    )
  return selected


def _scale_factor(w: jax.Array, scale: str, noise: str) -> Union[float, jax.Array]:
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
  return s / math.sqrt(max(fan, 1)) if noise == "gaussian" else s


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["deltas"], meta_fields=["treedef"]
)
@dataclasses.dataclass(frozen=True)
class Perturbations:
  """K sampled perturbations, aligned with the flattened params; a pytree.

  Attributes:
    deltas: per leaf of ``params`` in flatten order, ``(K, *leaf.shape)`` in the
      leaf's dtype, or ``None`` for a leaf that is not perturbed.
    treedef: the tree structure of ``params`` (static data).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> p = jax.jit(lambda k: nrs_jax.sample_perturbations(
    ...     params, k, radius=0.1, num_neighbors=4, mask={"w": True, "b": False}))(
    ...     jax.random.key(0))
    >>> [None if d is None else d.shape for d in p.deltas]  # flatten order: b, w
    [None, (4, 3, 2)]
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
  mask: MaskLike = None,
) -> Perturbations:
  """Samples K independent perturbations ``delta_k ~ Q_r(w)`` of ``params``.

  ``radius``, ``noise``, ``scale`` and ``mask`` are those of
  :func:`nrs_jax.nrs_penalty`, which defines them; ``key`` is a PRNG key (typed
  or raw) and ``num_neighbors`` K. Returns a :class:`Perturbations`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> p = nrs_jax.sample_perturbations(
    ...     params, jax.random.key(0), radius=0.1, num_neighbors=4, noise="sphere")
    >>> tree = p.as_tree(params)  # a leading K axis on every leaf
    >>> norms = jnp.sqrt((tree["w"] ** 2).sum((1, 2)) + (tree["b"] ** 2).sum(1))
    >>> bool(jnp.allclose(norms, 0.1))
    True
  """
  k = check_positive_int("num_neighbors", num_neighbors)
  sampler = Sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)
  return Perturbations(sampler.draw(params, jax.random.split(as_key(key), k)), sampler.treedef)


class Sampler:
  """The leaves NRS acts on, and the draw of their perturbations from given keys.

  ``selected[i]``: leaf ``i`` is a float leaf that the mask selects (it gets
  the penalty gradient); ``moving[i]``: it is also perturbed (its radius is not
  a static 0, unless every radius is).
  """

  def __init__(self, params, *, radius, noise, scale, mask):
    check_choice("noise", noise, NOISES)
    check_choice("scale", scale, SCALES)
    self.treedef = jax.tree_util.tree_structure(params)
    self.selected = perturbed_leaf_mask(params, mask)
    self.radii = broadcast_prefix(radius, params, "radius", "scalars")
    self.scalar_radius = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(radius))
    self.moving = [s and not is_static_zero(r) for s, r in zip(self.selected, self.radii)]
    if not any(self.moving):  # radius 0 everywhere: zero deltas, drawn as for any radius
      self.moving = self.selected
    leaves = jax.tree_util.tree_leaves(params)
    self.sizes = [int(x.size) if m else 0 for x, m in zip(leaves, self.moving)]
    self.noise, self.scale = noise, scale

  def draw(self, params: Any, keys: jax.Array, fused: bool = True) -> list:
    """Deltas with a leading ``len(keys)`` axis, one entry per leaf (None: not perturbed).

    Neighbour ``i`` is drawn from ``keys[i]``; relative scales come from ``params``.
    """
    n, total = keys.shape[0], sum(self.sizes)
    key_dir, key_len = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    v = standard_normal(key_dir, total, fused)
    length: Any = 1.0
    if self.noise != "gaussian":
      norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=1, keepdims=True))
    if self.noise == "ball":
      u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key_len)
      length = jnp.exp(jnp.log(u) / total)[:, None]

    def scaled(v, r):  # radius r times the unit-radius sample
      r = jnp.asarray(r, jnp.float32)
      return r * v if self.noise == "gaussian" else v * ((r * length) / norm)

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


def apply_perturbation(params: Any, deltas: Sequence[Optional[jax.Array]]) -> Any:
  """``params + delta`` for one neighbour (deltas without the K axis)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [x if d is None else x + d for x, d in zip(leaves, deltas)]
  return jax.tree_util.tree_unflatten(treedef, out)
