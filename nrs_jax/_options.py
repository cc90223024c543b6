"""The options shared by every entry point, and every check on them.

``nrs_penalty``, ``make_nrs_loss`` and ``add_nrs_gradient`` each build one
:class:`NRSOptions` from their keyword arguments and pass it down, so each
option is validated once, here, with one error message. Values that may be
traced (``alpha``, ``radius`` under ``optax.inject_hyperparams``) are not
fields: they are checked by :func:`check_nonnegative` when concrete and passed
through when traced.
"""

from __future__ import annotations

import dataclasses
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

from nrs_jax import _divergence

NOISES = ("gaussian", "ball", "sphere")
SCALES = ("absolute", "tensor", "filter", "elementwise")
AGGREGATIONS = ("mean", "max")
STRATEGIES = ("auto", "vmap", "loop", "chunked")
# Deprecated names, accepted for one release with a warning: name -> (strategy, chunk size).
DEPRECATED_STRATEGIES = {"accumulate": ("chunked", 1)}


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported: use one of {tuple(allowed)}.")


def is_static_number(x: Any) -> bool:
  """True for a concrete real scalar (a Python number or a 0-d array, not a tracer)."""
  if isinstance(x, jax.core.Tracer):
    return False
  try:
    float(x)
  except (TypeError, ValueError):
    return False
  return jnp.ndim(x) == 0


def is_static_zero(x: Any) -> bool:
  return is_static_number(x) and float(x) == 0.0


def check_nonnegative(name: str, value: Any, *, allow_schedule: bool = False) -> None:
  """Raises if a static scalar is negative or not finite; traced values pass."""
  if callable(value):
    if allow_schedule:
      return
    raise ValueError(f"{name} must be a finite scalar >= 0, not a callable.")
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}={value!r} must be a finite scalar >= 0.") from None
  if not math.isfinite(v) or v < 0:
    raise ValueError(f"{name}={value!r} must be a finite scalar >= 0.")


def check_positive_int(name: str, value: Any) -> int:
  """A static int >= 1 (not a bool, not traced), or a ValueError naming ``name``."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} must be a static Python int, got a traced value. With "
      f"optax.inject_hyperparams pass static_args=('{name}',)."
    )
  try:
    integer = jnp.issubdtype(jnp.result_type(value), jnp.integer) and jnp.ndim(value) == 0
  except TypeError:
    integer = False
  if isinstance(value, bool) or not integer or int(value) < 1:
    raise ValueError(f"{name}={value!r} must be an int >= 1.")
  return int(value)


def static_num_neighbors(num_neighbors: Any) -> int:
  return check_positive_int("num_neighbors", num_neighbors)


def check_mask_leaves(tree: Any, what: str = "mask") -> None:
  """Raises a ValueError unless every leaf of ``tree`` is a static bool."""
  for m in jax.tree_util.tree_leaves(tree):
    if isinstance(m, jax.core.Tracer) or not (
      isinstance(m, (bool, np.bool_)) or getattr(m, "dtype", None) == np.bool_
    ):
      raise ValueError(f"{what} must hold Python bools (static), got a leaf {m!r}.")


@dataclasses.dataclass(frozen=True)
class NRSOptions:
  """The static options of NRS, validated once at construction.

  Field meanings are those of :func:`nrs_jax.nrs_penalty`. After construction
  ``strategy`` is one of ``auto``, ``vmap``, ``loop``, ``chunked`` and
  ``neighbor_chunk_size`` is set exactly when ``strategy == "chunked"``
  (``chunked`` without a size means chunks of one; ``auto`` with a size means
  ``chunked``; the deprecated ``accumulate`` means ``chunked`` with chunks of
  one, with a ``DeprecationWarning``).
  """

  num_neighbors: int = 1
  noise: str = "gaussian"
  scale: str = "absolute"
  divergence: Union[str, Callable] = "kl"
  aggregation: str = "mean"
  mask: Any = None
  stop_gradient_center: bool = False
  strategy: str = "auto"
  neighbor_chunk_size: Optional[int] = None

  def __post_init__(self):
    k = static_num_neighbors(self.num_neighbors)
    check_choice("noise", self.noise, NOISES)
    check_choice("scale", self.scale, SCALES)
    _divergence.get_divergence(self.divergence)
    check_choice("aggregation", self.aggregation, AGGREGATIONS)
    if not isinstance(self.stop_gradient_center, (bool, np.bool_)):
      raise ValueError(f"stop_gradient_center={self.stop_gradient_center!r} must be a Python bool.")
    if self.mask is not None and not callable(self.mask):
      # The structure is checked against params later; non-bool leaves are an error now.
      check_mask_leaves(self.mask)
    strategy, chunk = self.strategy, self.neighbor_chunk_size
    if isinstance(strategy, str) and strategy in DEPRECATED_STRATEGIES:
      new, new_chunk = DEPRECATED_STRATEGIES[strategy]
      warnings.warn(
        f"strategy={strategy!r} is deprecated and will be removed in the next release: "
        f"use strategy='{new}' (neighbor_chunk_size={new_chunk} is its default).",
        DeprecationWarning,
        stacklevel=4,
      )
      if chunk not in (None, new_chunk):
        raise ValueError(
          f"strategy={strategy!r} takes no neighbor_chunk_size (got {chunk!r}); "
          f"use strategy='{new}', neighbor_chunk_size={chunk!r}."
        )
      strategy, chunk = new, new_chunk
    check_choice("strategy", strategy, STRATEGIES)
    if chunk is not None:
      c = check_positive_int("neighbor_chunk_size", chunk)
      if k % c:
        raise ValueError(
          f"neighbor_chunk_size={chunk!r} must be a positive int that divides "
          f"num_neighbors={k}, or None."
        )
      if strategy in ("vmap", "loop"):
        raise ValueError(
          f"neighbor_chunk_size={c} asks for chunked evaluation but strategy={strategy!r}; "
          "use strategy='chunked' (or 'auto') with a chunk size, or drop the chunk size."
        )
      strategy = "chunked"
    elif strategy == "chunked":
      chunk = 1
    object.__setattr__(self, "num_neighbors", k)
    object.__setattr__(self, "strategy", strategy)
    object.__setattr__(self, "neighbor_chunk_size", chunk if chunk is None else int(chunk))

  @property
  def divergence_fn(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return _divergence.get_divergence(self.divergence)
