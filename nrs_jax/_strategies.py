"""How the K neighbours run (``loop``, ``vmap``, ``chunked``, ``auto``'s rule): the same
``A_k d_k`` and derivatives, different programs and memory (docs: method, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nrs_jax._neighbors import is_float

CONV_LOOP_BELOW = 8  # conv nets: loop for K below this, chunks of one from it on
CPU_DENSE_LOOP_UP_TO = 8  # dense nets on CPU: loop up to this K, vmap above


def _subjaxprs(value: Any):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _subjaxprs(v)


def _has_primitive(jaxpr: Any, name: str) -> bool:
  return any(
    eqn.primitive.name == name
    or any(_has_primitive(sub, name) for p in eqn.params.values() for sub in _subjaxprs(p))
    for eqn in jaxpr.eqns
  )


def runs_convolution(logits_fn: Callable[[Any], Any], params: Any, selected: list[bool]) -> bool:
  """Whether ``logits_fn`` runs a convolution (traced once more only if a perturbed leaf has
  3 or more dims)."""
  leaves = jax.tree_util.tree_leaves(params)
  if not any(s and jnp.ndim(x) >= 3 for x, s in zip(leaves, selected)):
    return False
  return _has_primitive(jax.make_jaxpr(logits_fn)(params).jaxpr, "conv_general_dilated")


def choose(k: int, has_conv: bool) -> tuple[str, str]:
  """``auto``'s choice, ``(on the CPU, elsewhere)``, each one of ``STRATEGIES``: conv nets
  the loop below 8 neighbours and chunks of one from 8 on; dense nets the loop on the CPU up
  to 8 and ``vmap`` above it or on an accelerator (docs: benchmarks)."""
  if k == 1:
    return ("loop", "loop")
  if has_conv:
    s = "loop" if k < CONV_LOOP_BELOW else "chunked"
    return (s, s)
  return ("loop" if k <= CPU_DENSE_LOOP_UP_TO else "vmap", "vmap")


def aggregate(divs: jax.Array, aggregation: str, axis_name: str | None) -> jax.Array:
  """``A_k d_k``: the mean or the max of the K divergences (global over ``axis_name``)."""
  divs = divs if axis_name is None else jax.lax.pmean(divs, axis_name)
  return jnp.mean(divs) if aggregation == "mean" else jnp.max(divs)


def evaluate(
  strategy, divs_of: Callable, deltas_of: Callable, params, center, keys, options, axis_name
):
  """``A_k d_k`` over the neighbours drawn from ``keys`` (``deltas_of(params, keys)``; then
  ``divs_of(params, center, deltas) -> [n]``). ``strategy``: a name, or ``(on the CPU,
  elsewhere)`` from :func:`choose`, which becomes a ``platform_dependent`` when they differ."""
  if isinstance(strategy, tuple):
    cpu, other = strategy
    if cpu == other:
      strategy = cpu
    else:
      run = lambda s: (
        lambda: evaluate(s, divs_of, deltas_of, params, center, keys, options, axis_name)
      )
      return jax.lax.platform_dependent(cpu=run(cpu), default=run(other))
  aggregation = options.aggregation

  def loop():
    deltas = deltas_of(params, keys)
    divs = [
      divs_of(params, center, [d if d is None else d[i : i + 1] for d in deltas])
      for i in range(keys.shape[0])
    ]
    return aggregate(jnp.concatenate(divs), aggregation, axis_name)

  def vmapped():
    return aggregate(divs_of(params, center, deltas_of(params, keys)), aggregation, axis_name)

  if strategy == "chunked":
    groups = keys.reshape((-1, options.neighbor_chunk_size or 1))  # auto's choice: chunks of 1
    return _chunked(divs_of, deltas_of, params, center, groups, aggregation, axis_name)
  return {"loop": loop, "vmap": vmapped}[strategy]()


def _order_tie(grads: list, dtype) -> jax.Array:
  """A zero that depends on ``grads``, added to the next chunk's perturbations.

  Unrolled chunks (of one) are independent programs as far as XLA can see: nothing in chunk
  ``i + 1``'s forward pass needs chunk ``i``'s backward pass, so XLA:CPU's scheduler may
  start every chunk's forward pass first and keep all K sets of activations alive at once,
  which is the memory ``chunked`` exists to save. A value computed from the running gradient
  sum (``0 * sum``, finite-guarded so a NaN gradient cannot leak into it) makes each chunk's
  draw depend on the previous chunk's gradient, which orders them one after another. It is
  exactly zero, so values and derivatives are unchanged. It is a measure for XLA:CPU's
  scheduler; elsewhere (a ``platform_dependent``) it is a constant zero, which keeps it out
  of exported GPU/TPU programs.
  """

  def tie():
    t = sum(g.reshape(-1)[0].astype(dtype) for g in grads if g.size)
    return jnp.where(jnp.isfinite(t), t, 0.0) * 0.0

  return jax.lax.platform_dependent(cpu=tie, default=lambda: jnp.zeros((), dtype))


def _chunked(divs_of, deltas_of, params, center, groups, aggregation, axis_name):
  """``A_k d_k`` as a ``custom_jvp`` whose rule takes each chunk's (a row of ``groups``)
  gradient by ``jax.vjp`` in the forward pass, one chunk alive at a time; its tangent is
  that gradient dotted with the input tangents (linear: reverse mode transposes it)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  n_groups, group = groups.shape
  k, n = n_groups * group, len(leaves)
  unrolled = group == 1

  def group_divs(all_leaves, c, ds):
    return divs_of(jax.tree_util.tree_unflatten(treedef, all_leaves), c, ds)

  example_ds = jax.eval_shape(deltas_of, params, groups[0])
  converted, consts = jax.closure_convert(group_divs, leaves, center, example_ds)
  inputs = [*leaves, center, *consts]
  diff = [is_float(x) for x in inputs]

  def draw(xs, ks):  # (under lax.scan: jax.random itself, no platform choice in the body)
    return deltas_of(jax.tree_util.tree_unflatten(treedef, xs[:n]), ks, fused=unrolled)

  def value_and_grads(xs):
    d_in = [x for x, f in zip(xs, diff) if f]

    def divs_at(d, ds):
      it = iter(d)
      ys = [next(it) if f else x for x, f in zip(xs, diff)]
      return converted(ys[:n], ys[n], ds, *ys[n + 1 :])

    acc = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))

    def visit(carry, ks):
      value, grads, tie = carry
      ds = draw(xs, ks)
      if unrolled:  # a zero that orders this chunk after the last one's backward pass
        ds = [None if x is None else x + tie.astype(x.dtype) for x in ds]
      divs, vjp = jax.vjp(lambda d: divs_at(d, ds), d_in)
      divs_g = divs if axis_name is None else jax.lax.pmean(divs, axis_name)
      if aggregation == "mean":
        (g,) = vjp(jnp.full(divs.shape, 1.0 / k, divs.dtype))
        value = value + jnp.sum(divs_g) / k
        grads = [a + acc(b) for a, b in zip(grads, g)]
      else:  # max: the globally worst neighbour decides; a NaN wins
        j = jnp.argmax(divs_g)
        (g,) = vjp(jax.nn.one_hot(j, group, dtype=divs.dtype))
        take = (divs_g[j] > value) | jnp.isnan(divs_g[j])
        value = jnp.where(take, divs_g[j], value)
        grads = [jnp.where(take, acc(b), a) for a, b in zip(grads, g)]
      if unrolled:
        tie = _order_tie(grads, tie.dtype)
      return (value, grads, tie), None

    dtype = jnp.promote_types(center.dtype, jnp.float32)
    start = jnp.zeros((), dtype) if aggregation == "mean" else jnp.full((), -jnp.inf, dtype)
    grads = [jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for x in d_in]
    carry = (start, grads, jnp.zeros((), dtype))
    if unrolled:
      for ks in groups:
        carry, _ = visit(carry, ks)
    else:
      carry, _ = jax.lax.scan(visit, carry, groups)
    return carry[0], carry[1]

  @jax.custom_jvp
  def run(xs):
    one = lambda ks: converted(xs[:n], xs[n], draw(xs, ks), *xs[n + 1 :])
    divs = (
      jax.lax.map(one, groups).reshape(k)
      if not unrolled
      else jnp.concatenate([one(ks) for ks in groups])
    )
    return aggregate(divs, aggregation, axis_name)

  @run.defjvp
  def run_jvp(primals, tangents):
    (xs,), (ts,) = primals, tangents
    value, grads = value_and_grads(xs)
    ts = [t for t, f in zip(ts, diff) if f]  # (integer inputs have float0 tangents)
    dot = sum(jnp.vdot(g, t.astype(g.dtype)).astype(value.dtype) for g, t in zip(grads, ts))
    return value, dot

  return run(inputs)
