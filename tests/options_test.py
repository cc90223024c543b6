"""NRSOptions: the one place the static options are validated and normalised."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nrs_jax
from nrs_jax._options import NRSOptions


@pytest.mark.parametrize(
  "kw,strategy,chunk",
  [
    ({}, "auto", None),
    ({"strategy": "loop"}, "loop", None),
    ({"strategy": "chunked", "num_neighbors": 4}, "chunked", 1),
    ({"num_neighbors": 4, "neighbor_chunk_size": 2}, "chunked", 2),
    ({"num_neighbors": 4, "neighbor_chunk_size": np.int64(4)}, "chunked", 4),
    ({"num_neighbors": np.int32(2), "strategy": "vmap"}, "vmap", None),
  ],
)
def test_normalised_strategy_and_chunk(kw, strategy, chunk):
  o = NRSOptions(**kw)
  assert (o.strategy, o.neighbor_chunk_size) == (strategy, chunk)
  assert type(o.num_neighbors) is int and (chunk is None or type(o.neighbor_chunk_size) is int)
  with pytest.raises(dataclasses.FrozenInstanceError):
    o.strategy = "vmap"


@pytest.mark.parametrize(
  "kw,match",
  [
    ({"num_neighbors": True}, "num_neighbors=True"),
    ({"num_neighbors": jnp.ones(2)}, "num_neighbors="),
    ({"strategy": "accumulate_all"}, "strategy='accumulate_all'"),
    ({"num_neighbors": 4, "neighbor_chunk_size": 3}, "divides num_neighbors=4"),
    ({"num_neighbors": 4, "neighbor_chunk_size": 2.0}, "neighbor_chunk_size=2.0"),
    ({"num_neighbors": 4, "neighbor_chunk_size": 2, "strategy": "loop"}, "strategy='loop'"),
    ({"mask": {"w": 1}}, "mask must hold Python bools"),
    ({"divergence": 3}, "divergence=3"),
  ],
)
def test_bad_options_name_the_argument(kw, match):
  with pytest.raises(ValueError, match=match):
    NRSOptions(**kw)


def test_every_entry_point_checks_at_construction():
  # The same object validates all three: an error before any params or batch exist.
  bad = {"radius": 0.1, "num_neighbors": 4, "neighbor_chunk_size": 3}
  with pytest.raises(ValueError, match="neighbor_chunk_size=3"):
    nrs_jax.add_nrs_gradient(1.0, **bad)
  with pytest.raises(ValueError, match="neighbor_chunk_size=3"):
    nrs_jax.make_nrs_loss(lambda p, b: b, lambda z, b: z.sum(), alpha=1.0, **bad)
  with pytest.raises(ValueError, match="neighbor_chunk_size=3"):
    nrs_jax.nrs_penalty(lambda p: p["w"], {"w": jnp.ones((2, 3))}, jax.random.key(0), **bad)


def test_traced_chunk_size_under_inject_hyperparams_names_static_args():
  tx = optax.inject_hyperparams(nrs_jax.add_nrs_gradient, static_args=("num_neighbors",))(
    alpha=1.0, radius=0.1, num_neighbors=4, neighbor_chunk_size=2
  )
  params = {"w": jnp.ones((2, 3))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="static_args=\\('neighbor_chunk_size',\\)"):
    jax.jit(lambda s: tx.update(params, s, params, logits_fn=lambda p: p["w"]))(state)
