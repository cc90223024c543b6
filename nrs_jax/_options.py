"""The options shared by every entry point, and every check on them (one message each).

Values that may be traced (``alpha``, ``radius``) are not :class:`NRSOptions` fields:
:func:`check_nonnegative` checks them when they are concrete.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _divergence

NOISES = ("gaussian", "ball", "sphere", "rademacher")
SCALES = ("absolute", "tensor", "filter", "elementwise")
AGGREGATIONS = ("mean", "max")
STRATEGIES = ("auto", "vmap", "loop", "chunked")
REUSE_RULES = ("plain", "orthogonal")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name}={value!r} is not supported: use one of {tuple(allowed)}.")


def is_function(tree: Any) -> bool:
  """optax's rule for a mask function: every leaf is callable (an Equinox Module of bools is not)."""
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(callable, tree))
  return bool(leaves) and all(leaves)


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
  """True for a static scalar 0, or a pytree whose leaves are all static zeros."""
  leaves = jax.tree_util.tree_leaves(x)
  return bool(leaves) and all(is_static_number(v) and float(v) == 0.0 for v in leaves)


def check_nonnegative(name: str, value: Any, *, tree: bool = False, schedule: bool = False) -> None:
  """Raises unless ``value`` (each leaf with ``tree``; a schedule's value at 0 with
  ``schedule``) is a finite scalar >= 0; a traced one passes."""
  if schedule and is_function(value):
    check_nonnegative(f"{name}(0)", value(0))
    return
  if is_function(value):
    raise ValueError(
      f"{name} must be a finite scalar >= 0, not a callable"
      + (" (a schedule of the step count is for add_nrs_gradient)." if tree else ".")
    )
  leaves = jax.tree_util.tree_leaves(value) if tree else [value]
  for v in [v for v in leaves if not isinstance(v, jax.core.Tracer)]:  # (traced: unchecked)
    kind = np.dtype(v.dtype).kind if getattr(v, "dtype", None) is not None else ""
    text = isinstance(v, (str, bytes)) or kind in ("S", "U", "O")
    try:  # (float("0.05") would accept a string)
      ok = not text and jnp.ndim(v) == 0 and math.isfinite(float(v)) and float(v) >= 0
    except (TypeError, ValueError):
      ok = False
    if not ok:
      what = f"{name}={value!r}" if v is value else f"{name} has a leaf {v!r}, but each"
      hint = f" (a number such as {name}=0.05, not a string)" if text else ""
      raise ValueError(f"{what} must be a finite scalar >= 0{hint}.")


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


def check_mask_leaves(tree: Any, what: str = "mask") -> None:
  """Raises a ValueError unless every leaf of ``tree`` is a static bool."""
  for m in jax.tree_util.tree_leaves(tree):
    if isinstance(m, jax.core.Tracer) or not (
      isinstance(m, (bool, np.bool_)) or getattr(m, "dtype", None) == np.bool_
    ):
      raise ValueError(f"{what} must hold Python bools (static), got a leaf {m!r}.")


def broadcast_prefix(tree: Any, params: Any, what: str, kind: str = "bools") -> list:
  """The leaves of ``tree``, a prefix of ``params``, repeated over each sub-tree (flatten order)."""
  treedef: Any = jax.tree_util.tree_structure(params)
  try:
    full = jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), tree, params
    )
    ok = jax.tree_util.tree_structure(full) == treedef
  except (ValueError, TypeError):
    ok = False
  if not ok:
    raise ValueError(
      f"{what} must be a pytree of {kind} with the structure of params (or a prefix of "
      f"it), as a mask in optax.masked; got structure {jax.tree_util.tree_structure(tree)}, "
      f"params structure {treedef}."
    )
  return jax.tree_util.tree_leaves(full)


@dataclasses.dataclass(frozen=True)
class NRSOptions:
  """The static options of :func:`nrs_jax.nrs_penalty`, validated at construction;
  ``neighbor_chunk_size`` is then set exactly when ``strategy == "chunked"``."""

  num_neighbors: int = 1
  noise: str = "gaussian"
  scale: str = "absolute"
  divergence: str | Callable = "kl"
  aggregation: str = "mean"
  mask: Any = None
  stop_gradient_center: bool = False
  multilabel: bool = False
  strategy: str = "auto"
  neighbor_chunk_size: int | None = None

  def __post_init__(self):
    k = check_positive_int("num_neighbors", self.num_neighbors)
    check_choice("noise", self.noise, NOISES)
    check_choice("scale", self.scale, SCALES)
    _divergence.get_divergence(self.divergence)
    check_choice("aggregation", self.aggregation, AGGREGATIONS)
    for flag in ("stop_gradient_center", "multilabel"):
      if not isinstance(getattr(self, flag), (bool, np.bool_)):
        raise ValueError(f"{flag}={getattr(self, flag)!r} must be a Python bool.")
    if self.mask is not None and not is_function(self.mask):
      check_mask_leaves(self.mask)  # the structure is checked against params later
    strategy, chunk = self.strategy, self.neighbor_chunk_size
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

  @classmethod
  def of(cls, arguments: dict) -> NRSOptions:
    """The options among an entry point's ``locals()``."""
    return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})
