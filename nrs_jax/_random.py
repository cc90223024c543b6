"""The perturbation draw: keys of any implementation, and a fused CPU kernel.

``standard_normal(keys, n)`` is ``jax.random.normal`` row by row. On XLA:CPU,
for threefry keys, it runs a hand-written kernel (bit for bit the same numbers)
that XLA fuses into one loop; every other backend and key implementation uses
``jax.random.normal`` itself. The choice between the two is made with
``jax.lax.platform_dependent``, so a program exported for GPU or TPU contains
only the ``jax.random`` path and no device conditional.

Nothing here touches a JAX backend at import time (pods call
``jax.distributed.initialize`` after their imports).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Key data shape of each built-in implementation (jax.random.key_data(...).shape[-1:]).
_KEY_WORDS = {"threefry2x32": 2, "rbg": 4, "unsafe_rbg": 4}
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
PAD = 256  # the fused draw's length is a multiple of this (whole vectors per thread)


def impl_name(key: jax.Array) -> str:
  """The name of a typed key's implementation (``'threefry2x32'``, ``'rbg'``, ...)."""
  impl = jax.random.key_impl(key)
  return str(getattr(impl, "name", impl))


def default_impl_name() -> str:
  """The implementation ``jax.random.key`` uses now (``JAX_DEFAULT_PRNG_IMPL``)."""
  return str(jax.config.jax_default_prng_impl)  # type: ignore[attr-defined]


def as_key(key: Any) -> jax.Array:
  """A typed PRNG key from a typed key, raw key data, or an integer seed.

  Raw ``uint32`` key data is wrapped with the default implementation when its
  trailing size matches that implementation's, else with the built-in
  implementation of that size (2 words: threefry2x32, 4 words: rbg), so a key
  made by ``jax.random.PRNGKey`` under one ``JAX_DEFAULT_PRNG_IMPL`` keeps
  working under another.

  Raises:
    ValueError: for anything else, naming what was received.
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32 and key.ndim >= 1:
    words = key.shape[-1]
    default = default_impl_name()
    if _KEY_WORDS.get(default) == words:
      return jax.random.wrap_key_data(key)
    if words == 2:
      return jax.random.wrap_key_data(key, impl="threefry2x32")
    if words == 4:
      return jax.random.wrap_key_data(key, impl="rbg")
  if jnp.issubdtype(key.dtype, jnp.integer) and key.ndim == 0:
    return jax.random.key(key)
  raise ValueError(
    f"key must be a PRNG key (jax.random.key(seed)), raw key data "
    f"(jax.random.PRNGKey(seed)) or an int seed; got an array of dtype {key.dtype} "
    f"and shape {key.shape}."
  )


def padded(n: int, pad: int = PAD) -> int:
  """The length of the CPU kernel that draws ``n`` normals: ``n`` rounded up to ``pad``."""
  return -(-n // pad) * pad


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


def _cpu_threefry_normal(kd: jax.Array, n: int, pad: int) -> jax.Array:
  """``jax.random.normal`` of threefry key data ``kd [rows, 2]``, as one fused CPU kernel."""
  length = padded(n, pad)

  def draw(kd):
    hi, lo = _threefry2x32(
      kd[:, :1],
      kd[:, 1:],
      jnp.zeros((1, length), jnp.uint32),
      jax.lax.iota(jnp.uint32, length)[None],
    )
    bits = hi ^ lo
    one = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(low, (one - np.float32(1.0)) * (np.float32(1.0) - low) + low)
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)

  # A predicate that is always true but unknown to the compiler: XLA:CPU then
  # materialises the draw once instead of copying the fused kernel into every
  # consumer. (This branch is lowered for CPU only; see standard_normal.)
  always = jnp.all((kd[:, 0] | np.uint32(1)) != np.uint32(0))
  z = jax.lax.cond(always, draw, lambda kd: jnp.zeros((kd.shape[0], length), jnp.float32), kd)
  return z[:, :n]  # the cut is outside the cond: inside, XLA would fuse it into the kernel


def standard_normal(keys: jax.Array, n: int, *, pad: int = PAD) -> jax.Array:
  """Row ``i`` is ``jax.random.normal(keys[i], (n,), float32)``, bit for bit.

  On CPU, jax lowers threefry as a ``while`` loop over its groups of rounds and
  XLA copies a fused draw into every consumer (a perturbed weight feeds the
  forward and the backward pass). For threefry keys in jax's partitionable
  layout this function runs the same computation written out in straight-line
  ops, inside a conditional that is always true, padded to a multiple of
  ``pad`` elements (XLA:CPU splits the kernel over its threads, and odd
  lengths split badly), with the tail cut off. The numbers are unchanged:
  counter ``i`` gives element ``i``.

  That kernel is selected with ``jax.lax.platform_dependent`` for the CPU
  only: on GPU and TPU (and for ``rbg``/``unsafe_rbg`` keys, the legacy
  threefry layout, or draws of 2^32 elements or more) the function is
  ``jax.random.normal`` itself, with no conditional in the program.

  Args:
    keys: typed PRNG keys of shape ``[rows]``.
    n: numbers per row.
    pad: the CPU kernel's length is a multiple of this (benchmarks vary it).

  Returns:
    A ``float32`` array ``[rows, n]``.
  """
  keys = as_key(keys)

  def generic(keys):
    return jax.vmap(lambda k: jax.random.normal(k, (n,), jnp.float32))(keys)

  if (
    impl_name(keys) != "threefry2x32"
    or padded(n, pad) >= 2**32
    or not jax.config.jax_threefry_partitionable  # type: ignore[attr-defined]
  ):
    return generic(keys)
  kd = jax.random.key_data(keys)
  return jax.lax.platform_dependent(
    kd,
    cpu=lambda kd: _cpu_threefry_normal(kd, n, pad),
    default=lambda kd: generic(jax.random.wrap_key_data(kd, impl="threefry2x32")),
  )
