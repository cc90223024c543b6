"""The perturbation draw on every key implementation and backend (exported programs)."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nrs_jax
from nrs_jax import _neighbors
from tests.conftest import mlp_apply
from tests.conftest import mlp_init


@pytest.mark.parametrize("n", [1, 7, 256, 257, 78_857, 78_858])
def test_standard_normal_is_jax_random_normal_bit_for_bit(n):
  keys = jax.random.split(jax.random.key(3), 3)
  got = jax.jit(lambda k: _neighbors.standard_normal(k, n))(keys)
  want = jax.vmap(lambda k: jax.random.normal(k, (n,), jnp.float32))(keys)
  np.testing.assert_array_equal(got, want)
  # Under vmap (a batched cond) and for rbg keys (jax.random.normal itself).
  grid = keys.reshape(1, 3)
  np.testing.assert_array_equal(jax.vmap(lambda k: _neighbors.standard_normal(k, n))(grid)[0], want)
  for impl in ("rbg", "unsafe_rbg"):
    other = jax.random.split(jax.random.key(0, impl=impl), 2)
    np.testing.assert_array_equal(
      _neighbors.standard_normal(other, n), jax.vmap(lambda k: jax.random.normal(k, (n,)))(other)
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fused kernel is CPU-only")
def test_standard_normal_kernel_length_is_padded():
  """The fused draw ran 6x slower on XLA:CPU's two threads at an odd length, so it is drawn
  at the next multiple of 256 and cut afterwards (outside the kernel). The bug: a kernel at
  the odd length itself, or padded to less (78,857 pads to 79,104)."""
  n = 78_857
  keys = jax.random.split(jax.random.key(3), 3)
  hlo = jax.jit(lambda k: _neighbors.standard_normal(k, n)).lower(keys).compile().as_text()
  lengths = [
    int(m)
    for line in hlo.splitlines()
    if "erf" in line.lower()
    for m in re.findall(r"f32\[3,(\d+)\]", line)
  ]
  assert lengths, "no erf_inv kernel found in the compiled draw"
  assert set(lengths) == {-(-n // 256) * 256} == {79_104}, lengths


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_every_key_implementation_typed_and_raw_is_deterministic(tiny, impl):
  params, _, _, logits_fn = tiny
  key = jax.random.key(7, impl=impl)
  raw = jax.random.key_data(key)
  pen = jax.jit(lambda k: nrs_jax.nrs_penalty(logits_fn, params, k, radius=0.3, num_neighbors=2))
  a, b = pen(key), pen(key)
  assert float(a) > 0 and float(a) == float(b)
  if impl != "unsafe_rbg":  # raw 4-word data is taken as rbg unless that is the default
    np.testing.assert_array_equal(pen(raw), a)
  assert float(pen(jax.random.key(8, impl=impl))) != float(a)


@pytest.mark.parametrize("default", ["rbg", "unsafe_rbg"])
@pytest.mark.slow_cases("unsafe_rbg")
def test_jax_default_prng_impl_set_in_a_fresh_process(default):
  # The import must not fix the implementation (it used to compare against the
  # threefry impl built at import time and sent rbg keys down the threefry kernel).
  code = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax, nrs_jax
    assert str(jax.config.jax_default_prng_impl) == "DEFAULT"
    x = jnp.ones((8, 3)); params = {"w": jnp.full((3, 4), 0.1), "b": jnp.zeros(4)}
    lf = lambda p: x @ p["w"] + p["b"]
    pen = lambda k: nrs_jax.nrs_penalty(lf, params, k, radius=0.3, num_neighbors=2)
    a = jax.jit(pen)(jax.random.key(0)); b = jax.jit(pen)(jax.random.key(0))
    assert float(a) > 0 and float(a) == float(b), (a, b)
    jax.jit(pen)(jax.random.PRNGKey(0))  # raw key data of the default implementation
    jax.jit(pen)(jnp.array([0, 1], jnp.uint32))  # raw threefry data still works
    tx = optax.chain(nrs_jax.add_nrs_gradient(1.0, 0.1, key=3), optax.sgd(0.1))
    st = tx.init(params)
    _, st = jax.jit(lambda s: tx.update(params, s, params, logits_fn=lf))(st)
    assert float(st[0].penalty) > 0
    print("ok")
    """
  ).replace("DEFAULT", default)
  env = {**os.environ, "JAX_DEFAULT_PRNG_IMPL": default, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def _dynamic_conditionals(module_text: str) -> list[str]:
  """``stablehlo.case``/``if`` ops whose index or predicate is not a compile-time constant.

  ``lax.platform_dependent`` exported for one platform leaves a ``case`` on a
  constant index (and a one-branch ``case`` on its result); XLA folds both.
  SSA names are scoped per function and per region (a name defined inside a
  branch may shadow an outer one), so definitions are looked up from the
  innermost enclosing region outwards, as of the line that uses them.
  """
  bad = []
  for func in module_text.split("func.func")[1:]:
    scopes = [{}]

    def static(name, scopes=scopes):
      d = next((s[name] for s in reversed(scopes) if name in s), "")
      if d.startswith("stablehlo.constant"):
        return True
      m = re.match(r'"stablehlo\.case"\((%[\w#]+)\)', d)
      return bool(m) and static(m.group(1))

    for line in func.splitlines():
      m = re.search(r'"?stablehlo\.(case|if)"?\((%[\w#]+)', line)
      if m and not static(m.group(2)):
        bad.append(line.strip())
      d = re.match(r"\s*(%[\w#]+)(?::\d+)? = (.*)", line)
      if d:
        scopes[-1][d.group(1)] = d.group(2)
      depth = line.count("{") - line.count("}")
      for _ in range(max(depth, 0)):
        scopes.append({})
      for _ in range(max(-depth, 0)):
        if len(scopes) > 1:
          scopes.pop()
  return bad


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
  "strategy,k,chunk",
  [
    ("loop", 1, None),
    ("auto", 4, None),
    ("vmap", 4, None),
    ("chunked", 4, None),
    ("chunked", 4, 2),
  ],
)
def test_exported_gradient_has_no_device_conditional(platform, strategy, k, chunk):
  params = mlp_init(jax.random.key(0))
  x = jnp.ones((4, 5))
  y = jnp.arange(4) % 3

  def loss(p, key):
    task = -jnp.mean(jax.nn.log_softmax(mlp_apply(p, x))[jnp.arange(4), y])
    pen = nrs_jax.nrs_penalty(
      lambda q: mlp_apply(q, x),
      p,
      key,
      radius=0.1,
      num_neighbors=k,
      strategy=strategy,
      neighbor_chunk_size=chunk,
    )
    return task + pen

  grad = jax.jit(jax.grad(loss))
  text = jax.export.export(grad, platforms=[platform])(params, jax.random.key(0)).mlir_module()
  assert _dynamic_conditionals(text) == []
  # The same program for CPU holds the fused kernel behind its always-true cond,
  # which the helper must see (otherwise it could not fail). Chunks under lax.scan draw
  # with jax.random itself on every platform: no cond, and no platform choice in the body.
  cpu = jax.export.export(grad, platforms=["cpu"])(params, jax.random.key(0)).mlir_module()
  assert bool(_dynamic_conditionals(cpu)) is (chunk is None)


def test_importing_the_library_starts_no_backend():
  code = textwrap.dedent(
    """
    import jax._src.xla_bridge as xb
    import nrs_jax, nrs_jax.flatness
    import nrs_jax.integrations.nnx, nrs_jax.integrations.linen
    assert not xb._backends, list(xb._backends)
    print("ok")
    """
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
