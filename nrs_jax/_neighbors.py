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

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Optional
from typing import Union

import jax
import jax.numpy as jnp

from nrs_jax import _random
from nrs_jax._options import NOISES
from nrs_jax._options import SCALES
from nrs_jax._options import check_choice
from nrs_jax._options import check_mask_leaves
from nrs_jax._options import static_num_neighbors

# T(w)_i = |w_i| + floor, as in ASAM (Kwon et al., 2021), so zeros still move.
ELEMENTWISE_FLOOR = 0.01

MaskLike = Union[None, Any, Callable[[Any], Any]]


def is_float(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _takes_two_args(fn: Callable) -> bool:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  required = [
    p
    for p in sig.parameters.values()
    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
  ]
  return len(required) == 2


def resolve_mask(params: Any, mask: MaskLike) -> Any:
  """optax's mask convention: ``None``, a pytree of bools, or ``params -> pytree of bools``.

  The pytree may also be a prefix of ``params`` (one bool for a whole
  sub-tree), as in ``optax.masked``. Returns a pytree of bools with the
  structure of ``params``.

  Raises:
    ValueError: if the mask (or what the callable returns) does not match the
      structure of ``params``, or is an old-style ``(path, leaf)`` predicate.
  """
  if mask is None:
    return jax.tree_util.tree_map(lambda _: True, params)
  if callable(mask) and not isinstance(mask, (bool, jnp.bool_)):
    if _takes_two_args(mask):
      raise ValueError(
        "mask is a callable of two arguments; mask follows optax's convention: a "
        "pytree of bools like params, or a callable params -> such a pytree. For a "
        "(path, leaf) predicate write mask=lambda p: jax.tree_util.tree_map_with_path("
        "predicate, p)."
      )
    what, tree = "the pytree returned by the callable mask", mask(params)
  else:
    what, tree = "mask", mask
  treedef: Any = jax.tree_util.tree_structure(params)
  try:
    full = jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), tree, params
    )
  except (ValueError, TypeError):
    full = None
  if full is None or jax.tree_util.tree_structure(full) != treedef:
    raise ValueError(
      f"{what} must be a pytree of bools with the structure of params (or a prefix "
      f"of it), as in optax.masked; got structure {jax.tree_util.tree_structure(tree)}, "
      f"params structure {treedef}."
    )
  check_mask_leaves(full, what)
  return full


def perturbed_leaf_mask(params: Any, mask: MaskLike = None) -> list[bool]:
  """Returns, for each leaf of ``params`` in flatten order, whether it moves.

  Args:
    params: a pytree of arrays.
    mask: ``None`` (every floating-point leaf), a pytree of bools with the
      structure of ``params`` (or a prefix of it), or a callable ``params ->``
      such a pytree (optax's convention, as in ``optax.masked``). Select by
      path with ``lambda p: jax.tree_util.tree_map_with_path(pred, p)``.

  Raises:
    ValueError: if ``params`` has no floating-point leaf, if the mask's structure
      differs from that of ``params``, or if the mask selects no floating leaf.
  """
  leaves = jax.tree_util.tree_leaves(params)
  floats = [is_float(leaf) for leaf in leaves]
  if not any(floats):
    raise ValueError(
      "params has no floating-point leaves to perturb; NRS needs the model's "
      "trainable float parameters (got leaf dtypes "
      f"{sorted({str(getattr(leaf, 'dtype', type(leaf))) for leaf in leaves})})."
    )
  mask_leaves = jax.tree_util.tree_leaves(resolve_mask(params, mask))
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


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["deltas"], meta_fields=["treedef"]
)
@dataclasses.dataclass(frozen=True)
class Perturbations:
  """K sampled perturbations, aligned with the flattened params.

  A pytree whose children are the deltas and whose static data is the tree
  structure, so it can be returned from ``jax.jit`` and mapped by ``jax.vmap``.

  Attributes:
    deltas: one entry per leaf of ``params`` in flatten order: an array of shape
      ``(K, *leaf.shape)`` in the leaf's dtype, or ``None`` for a leaf that is
      not perturbed.
    treedef: the tree structure of ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import nrs_jax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> p = jax.jit(lambda k: nrs_jax.sample_perturbations(
    ...     params, k, radius=0.1, num_neighbors=4, mask={"w": True, "b": False}))(
    ...     jax.random.key(0))
    >>> [None if d is None else d.shape for d in p.deltas]  # flatten order: b, w
    [None, (4, 3, 2)]
    >>> p.as_tree(params)["b"].shape
    (4, 2)
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
  k = static_num_neighbors(num_neighbors)
  sampler = make_sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)
  return Perturbations(sampler(jax.random.split(_random.as_key(key), k)), sampler.treedef)


class _Sampler:
  """Draws the perturbations of given neighbour keys; see sample_perturbations."""

  def __init__(self, params, *, radius, noise, scale, mask):
    check_choice("noise", noise, NOISES)
    check_choice("scale", scale, SCALES)
    self.leaves, self.treedef = jax.tree_util.tree_flatten(params)
    self.selected = perturbed_leaf_mask(params, mask)  # per leaf, in flatten order
    self.sizes = [int(x.size) if s else 0 for x, s in zip(self.leaves, self.selected)]
    self.total = sum(self.sizes)
    self.radius, self.noise, self.scale = radius, noise, scale

  def _flat(self, keys):
    """Unit-scale samples, one row per key, flat over all perturbed leaves (float32)."""
    key_dir, key_len = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    v = _random.standard_normal(key_dir, self.total)
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
    return self.draw(self.leaves, keys)

  def draw(self, params: Any, keys: jax.Array) -> list:
    """As ``__call__``, with relative scales taken from ``params`` (same structure)."""
    leaves = jax.tree_util.tree_leaves(params)
    flat = self._flat(keys)
    n = keys.shape[0]
    deltas: list = []
    offset = 0
    for x, size in zip(leaves, self.sizes):
      if size == 0:
        deltas.append(None)
        continue
      v = flat[:, offset : offset + size].reshape((n, *x.shape))
      offset += size
      s = _scale_factor(jax.lax.stop_gradient(x), self.scale, self.noise)
      deltas.append(jax.lax.stop_gradient(v * s).astype(x.dtype))
    return deltas


def make_sampler(params: Any, *, radius, noise="gaussian", scale="absolute", mask=None) -> _Sampler:
  """A function ``keys [n] -> deltas`` drawing neighbour ``i`` from ``keys[i]``."""
  return _Sampler(params, radius=radius, noise=noise, scale=scale, mask=mask)


def neighbor_deltas(deltas: Sequence[Optional[jax.Array]], i: int) -> list:
  """Neighbour ``i``'s entry of per-leaf deltas with a leading K axis (None stays None)."""
  return [None if d is None else d[i] for d in deltas]


def apply_perturbation(params: Any, deltas: Sequence[Optional[jax.Array]]) -> Any:
  """``params + delta`` for one neighbour (deltas without the K axis)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = [x if d is None else x + d for x, d in zip(leaves, deltas)]
  return jax.tree_util.tree_unflatten(treedef, out)
