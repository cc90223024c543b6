"""Shared fixtures: tiny models and data, small enough for 2 CPU cores."""

import os
import tempfile

# One XLA compilation cache for the run's processes (both xdist workers and the tests'
# subprocesses): many tests compile the same small programs. Set before JAX reads it.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nrs_jax_tests_xla")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import special  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def enable_x64(on=True):
  """``jax.enable_x64`` (jax >= 0.8), or ``jax.experimental.enable_x64`` at the jax floor."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(on)
  from jax import experimental

  return experimental.enable_x64(on)


def key_data_tree(tree):
  """Typed PRNG keys as their key data (chex at its floor cannot compare typed keys)."""
  is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def mlp_init(key, sizes=(5, 8, 3), dtype=jnp.float32, zero_bias=False):
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(keys[i], (a, b), dtype) / np.sqrt(a)
    bias = jnp.zeros((b,), dtype) if zero_bias else 0.1 * jax.random.normal(keys[i], (b,), dtype)
    params[f"layer{i}"] = {"w": w, "b": bias}
  return params


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    x = x @ layer["w"] + layer["b"]
    if i < n - 1:
      x = jnp.tanh(x)
  return x


@pytest.fixture
def tiny():
  """A 5-8-3 MLP, a batch of 16 and its logits function."""
  key = jax.random.key(0)
  params = mlp_init(key)
  x = jax.random.normal(jax.random.key(1), (16, 5))
  y = jnp.arange(16) % 3
  return params, x, y, (lambda p: mlp_apply(p, x))


def np_divergence(name, center_logits, neighbor_logits):
  """Independent float64 reference of each divergence (``[..., 1]``: Bernoulli)."""

  def probs(z):
    z = np.asarray(z, np.float64)
    if z.shape[-1] == 1:  # one binary logit: Bernoulli(sigmoid(z))
      p = special.expit(z)
      return np.concatenate([1 - p, p], -1)
    return special.softmax(z, -1)

  p, q = probs(center_logits), probs(neighbor_logits)
  kl = lambda a, b: special.rel_entr(a, b).sum(-1)
  if name == "kl":
    return kl(p, q)
  if name == "reverse_kl":
    return kl(q, p)
  if name == "symmetric_kl":
    return 0.5 * (kl(p, q) + kl(q, p))
  m = 0.5 * (p + q)
  return 0.5 * (kl(p, m) + kl(q, m))


def assert_trees_f32_close(actual, desired, rtol=1e-5, scale_tol=1e-5, err_msg=""):
  """Float32 leaves of two programs that compute the same thing (jitted and eager, one
  strategy and another). XLA:CPU compiles each for the host's instruction set (FMA or not,
  vector width, fusion), so an element near zero can differ by a few float32 ulps of the
  array's scale, not of its own value (seen on AMD EPYC: 1.2e-8 at 1.8e-4, relative 6.7e-5).
  So ``atol = scale_tol * max|desired|`` per leaf (about 84 float32 ulps of the scale at
  the default), on top of ``rtol``; a real bug (another key, radius or neighbour) is off by
  far more. Integer and key leaves are compared exactly."""
  a_leaves, d_leaves = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(desired)
  assert len(a_leaves) == len(d_leaves)
  for a, d in zip(a_leaves, d_leaves):
    a, d = np.asarray(a), np.asarray(d)
    if not np.issubdtype(d.dtype, np.floating) and d.dtype.name != "bfloat16":
      np.testing.assert_array_equal(a, d)
      continue
    a, d = a.astype(np.float64), d.astype(np.float64)
    scale = float(np.max(np.abs(d))) if d.size else 0.0
    np.testing.assert_allclose(a, d, rtol=rtol, atol=scale_tol * scale + 1e-30, err_msg=err_msg)


# make test's budget: 8 minutes on the slowest machine of our kind (2 cores; an AMD EPYC
# ran this suite in 19 minutes). These tests repeat what a default test covers, on a
# bigger model or another variant; they run in `make test-slow`. The seconds are their
# durations in one `pytest -n 2 --durations=0` run there (both workers busy).
SLOW_ON_TWO_CORES = {
  # the transformer LM: the nrs step (with its recorded-metric checks) stays
  "tests/lm_test.py::test_stdlib_lm_trains_a_few_steps[sgd]": 56,
  "tests/lm_test.py::test_stdlib_lm_trains_a_few_steps[sam]": 36,
  "tests/lm_test.py::test_stdlib_lm_trains_a_few_steps[mesa]": 27,
  "tests/lm_test.py::test_token_level_penalty_is_the_masked_mean_of_nrs_penalty": 27,
  "tests/lm_test.py::test_lm_centre_and_neighbours_share_one_dropout_mask": 19,
  "tests/lm_test.py::test_token_level_nrs_step_ignores_padding[2-loss]": 15,
  "tests/lm_test.py::test_token_level_nrs_step_ignores_padding[None-loss]": 14,
  "tests/lm_test.py::test_token_level_nrs_step_ignores_padding[None-transform]": 13,
  "tests/lm_test.py::test_every_method_trains_on_the_smoothed_masked_loss[sam]": 11,
  "tests/lm_test.py::test_every_method_trains_on_the_smoothed_masked_loss[sgd]": 7,
  # the chunked strategy's corner cases: int and bf16 leaves are in the strategy battery
  "tests/penalty_test.py::test_chunked_handles_int_leaves_bf16_and_holds_one_neighbour_in_memory": 47,
  "tests/penalty_test.py::test_chunked_without_gradient_and_nan_propagation[max]": 11,
  "tests/penalty_test.py::test_where_masks_padding_positions_against_numpy[loop]": 12,
  "tests/penalty_test.py::test_where_masks_padding_positions_against_numpy[vmap]": 7,
  "tests/penalty_test.py::test_max_picks_largest_neighbour_and_its_gradient[vmap]": 10,
  # harness variants: sgd/nrs/sam paths, the sub-batch and the running statistics stay
  "tests/train_test.py::test_randomized_two_pass_method_runs_a_plain_step_otherwise[nrs]": 39,
  "tests/train_test.py::test_compare_writes_summary_table_and_plots": 36,
  "tests/train_test.py::test_offline_configs_run[get_config-nrs-False2]": 36,
  "tests/train_test.py::test_vit_patches_shapes_pooling_and_bad_sizes": 30,
  "tests/train_test.py::test_nrs_step_running_stats_equal_the_centre_pass_alone[transform]": 10,
  "tests/train_test.py::test_centre_and_neighbours_share_one_dropout_mask[mlp]": 8,
  "tests/train_test.py::test_offline_configs_run[get_config-rwp-False]": 6,
  "tests/train_test.py::test_offline_configs_run[get_config-asam-False]": 4,
  # strategies: the battery's five cases, auto and chunks of two stay
  "tests/strategies_test.py::test_gradients_with_respect_to_closed_over_values_under_every_strategy": 37,
  "tests/strategies_test.py::test_every_strategy_equals_the_loop_on_random_pytrees[3-1]": 7,
  "tests/strategies_test.py::test_penalty_and_gradient_under_vmap_over_keys_equal_a_loop_over_keys[chunked-2]": 10,
  "tests/optax_common_test.py::test_battery[chunked-2]": 20,
  "tests/optax_common_test.py::test_dtype_state_and_gradient_accumulation[chunked-2-bfloat16]": 11,
  "tests/optax_common_test.py::test_dtype_state_and_gradient_accumulation[auto-None-float16]": 8,
  # integrations: the NNX tutorial model in train mode, Linen and Equinox steps stay
  "tests/integrations_test.py::test_nnx_tutorial_cnn_trains_in_train_mode[True]": 9,
  "tests/equinox_test.py::test_flatness_inputs_hvp_matches_the_exact_hessian": 20,
  "tests/transform_test.py::test_bfloat16_compute_is_finite_and_close_to_float32": 19,
  "tests/benchmark_test.py::test_token_level_rows_run_and_chunked_holds_less_than_the_loop": 19,
  "tests/flatness_test.py::test_per_block_eigenvalues_and_trace_match_exact_sub_blocks": 19,
  "tests/flatness_test.py::test_multi_batch_equals_concatenated_batch": 13,
  # fresh-process checks: one key implementation covers the environment variable
  "tests/random_test.py::test_jax_default_prng_impl_set_in_a_fresh_process[unsafe_rbg]": 10,
  # more variants of what a default test covers
  "tests/strategies_test.py::test_every_strategy_equals_the_loop_on_random_pytrees[3-4]": 16,
  "tests/train_test.py::test_offline_configs_run[get_config-nrs-False1]": 14,
  "tests/train_test.py::test_nrs_neighbours_on_a_sub_batch[transform]": 9,
  "tests/lm_test.py::test_lm_is_causal_with_a_tied_or_untied_head_and_rejects_long_inputs": 16,
  "tests/transform_test.py::test_gradient_accumulation_outside_multisteps_equals_large_batch": 15,
  "tests/transform_test.py::test_inside_chain_with_sgd_and_adamw[adamw]": 6,
  "tests/penalty_test.py::test_auto_on_a_dense_net_compiles_to_the_loop_on_cpu": 10,
  # (a second pass at the budget: 14 minutes after the first)
  "tests/multidevice_test.py::test_eight_devices_replicated_and_fsdp_match_one_device[True-modes0]": 69,
  "tests/integrations_test.py::test_flatness_inputs_match_a_split_by_hand": 49,
  "tests/penalty_test.py::test_chunked_without_gradient_and_nan_propagation[mean]": 31,
  "tests/lm_test.py::test_token_level_nrs_step_ignores_padding[2-transform]": 30,
  "tests/strategies_test.py::test_every_strategy_equals_the_loop_on_random_pytrees[1-2]": 26,
  "tests/lm_test.py::test_every_method_trains_on_the_smoothed_masked_loss[nrs]": 23,
  "tests/strategies_test.py::test_penalty_and_gradient_under_vmap_over_keys_equal_a_loop_over_keys[auto-None]": 21,
  "tests/lm_test.py::test_lm_dropout_follows_its_key_and_is_off_in_eval": 21,
  # (a third pass: the TFDS pipeline under mock data stays in the two-process test)
  "tests/train_test.py::test_tfds_configs_under_mock_data[get_config-overrides0]": 31,
  # (a fourth pass, for the unlabeled-data tests, on an Intel Xeon: 8:25-8:42 before it)
  # the HVP is checked through measures_test's exact-Hessian eigenvalue and trace
  "tests/flatness_test.py::test_hvp_matches_exact_hessian_product": 17,
  # one float32 random-pytree case (K = 4) stays, with the float64 one
  "tests/strategies_test.py::test_every_strategy_equals_the_loop_on_random_pytrees[0-2]": 18,
  # sub-batches: penalty_batch's strided subset and the transform's sub-batch tests stay
  "tests/penalty_test.py::test_sub_batch_penalty_is_nrs_penalty_over_the_strided_subset": 15,
  # training to accuracy: the NNX, Linen and Equinox loops stay
  "tests/transform_test.py::test_learning_reaches_baseline_accuracy_with_lower_divergence": 15,
  # the doctests run; the check that a wrong penalty fails them is a check of the check
  "tests/docs_test.py::test_a_wrong_penalty_fails_the_docstring_examples": 20,
  # zero strength: vat's stays; each method's loss is checked by hand in semi_test
  "tests/semi_test.py::test_at_zero_strength_each_consistency_method_is_sgd_on_the_labelled_rows[nrs_unlabeled-zero0]": 3,
  "tests/semi_test.py::test_at_zero_strength_each_consistency_method_is_sgd_on_the_labelled_rows[pi_model-zero2]": 3,
}


def pytest_collection_modifyitems(config, items):
  marker = pytest.mark.slow(reason="make test's budget on 2 cores (tests/conftest.py)")
  for item in items:
    if item.nodeid in SLOW_ON_TWO_CORES:
      item.add_marker(marker)
