"""How the K neighbours are evaluated: ``loop``, ``vmap``, ``chunked``, and ``auto``'s rule.

Every strategy computes the same ``A_k d_k`` (mean or max over the K
neighbours' divergences) and its gradient; they differ in what XLA runs and in
what stays alive for the backward pass:

- ``loop``: the K neighbours unrolled in the program; K neighbours'
  activations are kept for the backward pass.
- ``vmap``: one batched evaluation of the K neighbours; the same memory.
- ``chunked``: chunks of ``c`` neighbours, each drawn when needed and
  differentiated in the forward pass (a custom VJP), so one chunk's
  perturbations and activations are alive at a time and nothing is recomputed.
  Chunks of one run unrolled; larger chunks are vmapped under ``lax.scan``.
  Reverse mode only.

``auto`` (:func:`choose`) decides from what the model computes, not from the
shapes of its parameters, so that an attention ``DenseGeneral`` kernel (3-d)
is not mistaken for a convolution:

- one neighbour: ``loop``;
- a model that runs a convolution: ``loop`` for K < 8, ``chunked`` (chunks of
  one) for K >= 8. vmap over K conv kernels becomes a grouped convolution,
  which the backends measured run slower than K separate convolutions;
- any other model: ``loop`` on CPU for K <= 8, ``vmap`` otherwise. The CPU/other
  choice is a ``jax.lax.platform_dependent``, so a program exported for a GPU
  or TPU contains what that platform runs.

The measurements behind the rule are in the README's benchmark section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nrs_jax import _neighbors

CONV_LOOP_BELOW = 8  # conv nets: loop for K below this, chunks of one from it on
CPU_DENSE_LOOP_UP_TO = 8  # dense nets on CPU: loop up to this K, vmap above

# A divergence function of one chunk: (params, centre logits, deltas with a leading
# chunk axis) -> the chunk's divergences [c].
DivsOf = Callable[[Any, jax.Array, list], jax.Array]
# The perturbations of keys ks: (params, ks [c]) -> deltas with a leading c axis.
DeltasOf = Callable[[Any, jax.Array], list]


def _jaxprs_in(value: Any):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs_in(v)


def _has_primitive(jaxpr: Any, name: str) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    for param in eqn.params.values():
      if any(_has_primitive(sub, name) for sub in _jaxprs_in(param)):
        return True
  return False


def runs_convolution(logits_fn: Callable[[Any], Any], params: Any, selected: list[bool]) -> bool:
  """Whether ``logits_fn`` runs a convolution (``lax.conv_general_dilated``).

  Only a model with a perturbed leaf of 3 or more dims can have a perturbed
  conv kernel; for the others nothing is traced. Otherwise ``logits_fn`` is
  traced once more (``jax.make_jaxpr``, no computation) and searched,
  nested jaxprs included.
  """
  leaves = jax.tree_util.tree_leaves(params)
  if not any(s and jnp.ndim(x) >= 3 for x, s in zip(leaves, selected)):
    return False
  jaxpr = jax.make_jaxpr(logits_fn)(params)
  return _has_primitive(jaxpr.jaxpr, "conv_general_dilated")


def choose(k: int, has_conv: bool) -> str:
  """``auto``'s choice: ``loop``, ``chunked`` or ``dense`` (loop on CPU up to 8, else vmap)."""
  if k == 1:
    return "loop"
  if has_conv:
    return "loop" if k < CONV_LOOP_BELOW else "chunked"
  return "dense" if k <= CPU_DENSE_LOOP_UP_TO else "vmap"


def global_divs(divs: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """Each neighbour's divergence averaged over the mapped axis (global batch), if any."""
  return divs if axis_name is None else jax.lax.pmean(divs, axis_name)


def aggregate(divs: jax.Array, aggregation: str, axis_name: Optional[str]) -> jax.Array:
  """``A_k d_k``: the mean or the max of the K (global) divergences."""
  divs = global_divs(divs, axis_name)
  return jnp.mean(divs) if aggregation == "mean" else jnp.max(divs)


def evaluate(
  strategy: str,
  divs_of: DivsOf,
  deltas_of: DeltasOf,
  params: Any,
  center: jax.Array,
  keys: jax.Array,
  *,
  chunk_size: Optional[int],
  aggregation: str,
  axis_name: Optional[str],
  fixed_center: bool,
) -> jax.Array:
  """``A_k d_k`` over the neighbours drawn from ``keys`` (one per neighbour).

  ``strategy`` is ``loop``, ``vmap``, ``chunked`` (with ``chunk_size``) or
  ``dense`` (``loop`` on CPU, ``vmap`` elsewhere, per platform).
  """
  k = keys.shape[0]

  def loop():
    deltas = deltas_of(params, keys)
    one = lambda i: divs_of(params, center, [None if d is None else d[i : i + 1] for d in deltas])
    return aggregate(jnp.concatenate([one(i) for i in range(k)]), aggregation, axis_name)

  def vmapped():
    return aggregate(divs_of(params, center, deltas_of(params, keys)), aggregation, axis_name)

  if strategy == "loop":
    return loop()
  if strategy == "vmap":
    return vmapped()
  if strategy == "dense":
    return jax.lax.platform_dependent(cpu=loop, default=vmapped)
  if strategy != "chunked":
    raise ValueError(f"unknown strategy {strategy!r}")
  return _chunked(
    divs_of,
    deltas_of,
    params,
    center,
    keys.reshape((k // (chunk_size or 1), chunk_size or 1)),
    aggregation=aggregation,
    axis_name=axis_name,
    fixed_center=fixed_center,
  )


def _order_tie(grads: list, dtype) -> jax.Array:
  """A zero that depends on ``grads``: on XLA:CPU it orders unrolled chunks (see _chunked)."""

  def tie():
    t = sum(g.reshape(-1)[0].astype(dtype) for g in grads if g.size)
    return jnp.where(jnp.isfinite(t), t, 0.0) * 0.0

  return jax.lax.platform_dependent(cpu=tie, default=lambda: jnp.zeros((), dtype))


def _chunked(
  divs_of, deltas_of, params, center, key_groups, *, aggregation, axis_name, fixed_center
):
  """``A_k d_k`` whose gradient is taken chunk by chunk in the forward pass.

  A custom VJP. The forward pass visits the chunks (a row of ``key_groups``
  each): it draws the chunk's perturbations, runs ``jax.vjp`` of its
  divergences and applies the chunk's share of the cotangent at once (1/K
  each for ``mean``; one-hot on the chunk's largest for ``max``), keeping only
  the running value and gradient. The backward pass scales the kept gradient
  by the incoming cotangent. Same value and gradient as differentiating the
  whole; exact ties under ``max`` take the first neighbour instead of
  splitting, and a NaN divergence propagates.

  Values that ``divs_of`` closes over and that are being differentiated (an
  input, for adversarial use) are made explicit inputs with
  ``jax.closure_convert``, so their gradients are exact too. Reverse mode
  only: ``jax.jvp`` raises a ValueError that names the strategies to use.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  n_groups, group = key_groups.shape
  k = n_groups * group
  unrolled = group == 1

  def group_divs(all_leaves, c, ds):
    return divs_of(jax.tree_util.tree_unflatten(treedef, all_leaves), c, ds)

  # The perturbations are constants (drawn under stop_gradient): they enter as inputs.
  example_ds = jax.eval_shape(deltas_of, params, key_groups[0])
  converted, consts = jax.closure_convert(group_divs, leaves, center, example_ds)
  inputs = [*leaves, center, *consts]
  diff = [_neighbors.is_float(x) for x in inputs]
  n = len(leaves)

  def split(all_inputs):
    return all_inputs[:n], all_inputs[n], all_inputs[n + 1 :]

  def draw(all_inputs, ks):
    return deltas_of(jax.tree_util.tree_unflatten(treedef, all_inputs[:n]), ks)

  @jax.custom_vjp
  def run(all_inputs):
    ls, c, cs = split(all_inputs)
    one = lambda ks: converted(ls, c, draw(all_inputs, ks), *cs)
    if unrolled:
      divs = jnp.concatenate([one(ks) for ks in key_groups])
    else:
      divs = jax.lax.map(one, key_groups).reshape(k)
    return aggregate(divs, aggregation, axis_name)

  def fwd(all_inputs):
    d_in = [x for x, f in zip(all_inputs, diff) if f]

    def divs_at(d, ds):
      it = iter(d)
      ls, c, cs = split([next(it) if f else x for x, f in zip(all_inputs, diff)])
      return converted(ls, c, ds, *cs)

    acc = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))

    def visit(carry, ks):
      value, grads, tie = carry
      ds = draw(all_inputs, ks)
      if unrolled:
        # A zero that depends on the previous chunk's gradients, added to this chunk's
        # perturbations (fused into w + delta): XLA:CPU must finish that backward pass
        # before this forward pass, so one chunk is alive at a time. (An
        # optimization_barrier does not order XLA:CPU's schedule; lax.scan orders itself.)
        ds = [None if x is None else x + tie.astype(x.dtype) for x in ds]
      divs, vjp = jax.vjp(lambda d: divs_at(d, ds), d_in)
      divs_g = global_divs(divs, axis_name)  # under max, the global divergence decides
      if aggregation == "mean":
        (g,) = vjp(jnp.full(divs.shape, 1.0 / k, divs.dtype))
        value = value + jnp.sum(divs_g) / k
        grads = [a + acc(b) for a, b in zip(grads, g)]
      else:
        j = jnp.argmax(divs_g)
        (g,) = vjp(jax.nn.one_hot(j, group, dtype=divs.dtype))
        d = divs_g[j]
        take = (d > value) | jnp.isnan(d)
        value = jnp.where(take, d, value)
        grads = [jnp.where(take, acc(b), a) for a, b in zip(grads, g)]
      if unrolled:
        tie = _order_tie(grads, tie.dtype)
      return (value, grads, tie), None

    dtype = jnp.promote_types(center.dtype, jnp.float32)
    start = jnp.zeros((), dtype) if aggregation == "mean" else jnp.full((), -jnp.inf, dtype)
    grads = [jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for x in d_in]
    carry = (start, grads, jnp.zeros((), dtype))
    if unrolled:
      for ks in key_groups:
        carry, _ = visit(carry, ks)
    else:
      carry, _ = jax.lax.scan(visit, carry, key_groups)
    value, grads, _ = carry
    return value, grads

  def bwd(grads, ct):
    it = iter(grads)
    out = []
    for i, (x, f) in enumerate(zip(inputs, diff)):
      if not f:
        out.append(np.zeros(jnp.shape(x), jax.dtypes.float0))
        continue
      g = next(it)
      if fixed_center and i == n:
        out.append(jnp.zeros(jnp.shape(x), x.dtype))
      else:
        out.append((ct * g).astype(x.dtype))
    return (out,)

  run.defvjp(fwd, bwd)
  try:
    return run(inputs)
  except TypeError as e:
    if "forward-mode" not in str(e):
      raise
    raise ValueError(
      "strategy='chunked' (also what 'auto' picks for conv nets from 8 neighbours, and "
      "the deprecated 'accumulate') computes its gradient in the forward pass and has no "
      "forward mode: for jax.jvp / jax.jacfwd / jax.linearize of the penalty use "
      "strategy='loop' or strategy='vmap'. (jax.grad and jax.hessian work.)"
    ) from None
