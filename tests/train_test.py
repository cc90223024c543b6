"""The experiments harness: every config for a step or two, resume after SIGKILL, BN and dropout."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import input_pipeline
from experiments import optimizers
from experiments import steps
from experiments import train
from experiments.configs import cifar10_resnet18
from experiments.configs import cifar10_vit
from experiments.configs import cifar100_wrn28_10
from experiments.configs import default
from experiments.configs import digits
from experiments.configs import imagenet_resnet50
from experiments.configs import imagenet_vit_s16
from experiments.configs import mnist1d_cnn
from experiments.configs import mnist1d_vit
from tests.harness_util import final_state
from tests.harness_util import recomputed_test_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shrink(config, steps=2, hessian=False, **overrides):
  """A 2-step run; the harness's Hessian metrics only where a test reads them (``hessian``):
  its Lanczos and Hutchinson programs are most of a tiny run's compilation."""
  with config.unlocked():
    config.num_steps = steps
    config.batch_size = min(config.batch_size, 8)
    config.eval_every_epochs = 10_000
    config.progress = False
    iters = 3 if hessian else 0
    config.hessian = dict(
      num_examples=16, batch_size=8, num_iters=iters, num_samples=2, every_evals=0
    )
    for k, v in overrides.items():
      setattr(config, k, v)
  return config


@pytest.mark.parametrize(
  "get_config,method,hessian",
  [
    (default.get_config, "sgd", False),
    (default.get_config, "nrs", True),  # the harness's Hessian path, on the MLP
    (default.get_config, "sam", False),
    (default.get_config, "asam", False),
    (default.get_config, "rwp", False),
    (default.get_config, "saf", False),
    (default.get_config, "mesa", False),
    (mnist1d_cnn.get_config, "nrs", False),
    (digits.get_config, "nrs", False),
    (mnist1d_vit.get_config, "nrs", False),
    # make test-slow: the Hessian on every model (13 s of compilation on the CNN alone)
    pytest.param(mnist1d_cnn.get_config, "nrs", True, marks=pytest.mark.slow),
    pytest.param(digits.get_config, "nrs", True, marks=pytest.mark.slow),
    pytest.param(mnist1d_vit.get_config, "nrs", True, marks=pytest.mark.slow),
    pytest.param(mnist1d_vit.get_config, "sam", False, marks=pytest.mark.slow),
  ],
)
@pytest.mark.slow_cases(
  "get_config-nrs-False2", "get_config-rwp-False", "get_config-asam-False", "get_config-nrs-False1"
)
def test_offline_configs_run(get_config, method, hessian, tmp_path):
  small = {}  # the ViT with one block, as the TFDS ViT configs below run
  if get_config is mnist1d_cnn.get_config:  # the same layers, narrower (compiles faster)
    small = {"model_kwargs": dict(channels=(4, 4))}
  if get_config is mnist1d_vit.get_config:
    kw = dict(patch=(4,), dim=32, depth=1, heads=2, mlp_dim=64, dropout=0.1, pool="mean")
    small = {"model_kwargs": kw}
  config = _shrink(get_config(), hessian=hessian, method=method, **small)  # (per model, not method)
  rec = train.train_and_evaluate(config, str(tmp_path))
  assert rec["step"] == 2
  np.testing.assert_allclose(
    rec["test_accuracy"], recomputed_test_accuracy(config, str(tmp_path)), atol=1e-6
  )
  if hessian:
    assert np.isfinite(rec["hessian/lambda_max"]) and np.isfinite(rec["hessian/trace"])
  else:
    assert "hessian/lambda_max" not in rec
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 2
  if method == "nrs":
    assert rec["train/nrs_penalty"] > 0


def test_nrs_transform_path_and_linen_path(tmp_path):
  """The transform path with alpha 0 is SGD's step bit for bit, and with alpha 1 it moves
  the weights by a small, nonzero NRS gradient. The bugs: a transform path that changes the
  task step (another loss, a dropped dropout key, the transform after the optimiser would
  still pass a "2 steps ran" check) or that never applies the penalty (logits_fn unused)."""
  runs = {}
  for name, method, alpha in (("sgd", "sgd", None), ("alpha0", "nrs", 0.0), ("alpha1", "nrs", 1.0)):
    config = _shrink(default.get_config(), method=method)
    if alpha is not None:
      with config.unlocked():
        config.nrs.implementation, config.nrs.alpha = "transform", alpha
    rec = train.train_and_evaluate(config, str(tmp_path / name))
    assert rec["step"] == 2
    runs[name] = final_state(config, str(tmp_path / name))[0]["params"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, runs["alpha0"], runs["sgd"])
  moved = [
    float(np.max(np.abs(a - b)))
    for a, b in zip(
      jax.tree_util.tree_leaves(runs["alpha1"]), jax.tree_util.tree_leaves(runs["alpha0"])
    )
  ]
  assert max(moved) > 0 and max(moved) < 0.05, moved
  config = _shrink(default.get_config(), method="nrs", model="linen_mlp")
  with config.unlocked():
    config.nrs.implementation = "transform"
  rec = train.train_and_evaluate(config, str(tmp_path / "linen"))
  assert rec["step"] == 2
  np.testing.assert_allclose(
    rec["test_accuracy"], recomputed_test_accuracy(config, str(tmp_path / "linen")), atol=1e-6
  )


def test_randomized_schedule_draws_from_seed_and_step():
  draws = [steps.takes_expensive_step(3, t, 0.25) for t in range(2000)]
  assert draws == [steps.takes_expensive_step(3, t, 0.25) for t in range(2000)]
  assert abs(np.mean(draws) - 0.25) < 0.03
  assert draws != [steps.takes_expensive_step(4, t, 0.25) for t in range(2000)]
  assert all(steps.takes_expensive_step(0, t, 1.0) for t in range(10))
  assert not any(steps.takes_expensive_step(0, t, 0.0) for t in range(10))


@pytest.mark.parametrize(
  "method",
  ["nrs", pytest.param("sam", marks=pytest.mark.slow)],  # one schedule, shared
)
@pytest.mark.slow_cases("nrs")
def test_randomized_two_pass_method_runs_a_plain_step_otherwise(method, tmp_path):
  def run(name, method, probability=None, steps=4):
    config = _shrink(default.get_config(), steps=steps, method=method)
    if probability is not None:
      with config.unlocked():
        config[method].probability = probability
    train.train_and_evaluate(config, str(tmp_path / name))
    return np.load(tmp_path / name / "final_state.npz")

  sgd, full = run("sgd", "sgd"), run("full", method)
  never, always = run("never", method, 0.0), run("always", method, 1.0)
  half = run("half", method, 0.5)
  for k in sgd.files:  # probability 0 is SGD, 1 is the method, bit for bit
    np.testing.assert_array_equal(never[k], sgd[k])
    np.testing.assert_array_equal(always[k], full[k])
  differs = lambda a, b: any(not np.array_equal(a[k], b[k]) for k in a.files)
  assert differs(half, sgd) and differs(half, full)


@pytest.mark.parametrize("value", [-0.1, 1.5, 2])
def test_bad_probability_is_a_config_error(value, tmp_path):
  config = _shrink(default.get_config(), method="nrs")
  with config.unlocked():
    config.nrs.probability = value
  with pytest.raises(ValueError, match=r"config.nrs.probability=.* must be a number in \[0, 1\]"):
    train.train_and_evaluate(config, str(tmp_path))
  config = _shrink(default.get_config(), method="nrs")
  with config.unlocked():
    config.nrs.probability = 0.5
    config.nrs.implementation = "transform"
  with pytest.raises(ValueError, match="choices: 'loss', 'transform'"):
    train.train_and_evaluate(config, str(tmp_path / "t"))


@pytest.mark.parametrize("implementation", ["loss", "transform"])
@pytest.mark.slow_cases("transform")
def test_nrs_neighbours_on_a_sub_batch(implementation, tmp_path):
  config = _shrink(default.get_config(), method="nrs")
  with config.unlocked():
    config.nrs.implementation = implementation
    config.nrs.neighbor_batch_size = 2  # of the batch of 8
    config.nrs.stop_gradient_center = True
    config.nrs.reuse_center_logits = True
  rec = train.train_and_evaluate(config, str(tmp_path))
  assert rec["step"] == 2 and np.isfinite(rec["train_loss"])
  if implementation == "loss":
    assert rec["train/nrs_penalty"] > 0


@pytest.mark.parametrize(
  "get_config,overrides",
  [
    # make test: the TFDS path (mock data) with a small CNN; make test-slow: each config's model.
    (cifar100_wrn28_10.get_config, {"model": "cnn", "model_kwargs": dict(channels=(4,), kernel=3)}),
    pytest.param(cifar10_resnet18.get_config, {}, marks=pytest.mark.slow),
    pytest.param(
      cifar100_wrn28_10.get_config,
      {"model_kwargs": dict(depth=10, widen=1, dropout=0.3)},
      marks=pytest.mark.slow,
    ),
    pytest.param(
      imagenet_resnet50.get_config, {"model_kwargs": dict(width=8)}, marks=pytest.mark.slow
    ),
    pytest.param(
      cifar10_vit.get_config,
      {"model_kwargs": dict(patch=(8, 8), dim=16, depth=1, heads=2, mlp_dim=32)},
      marks=pytest.mark.slow,
    ),
    pytest.param(
      imagenet_vit_s16.get_config,
      {"model_kwargs": dict(patch=(16, 16), dim=16, depth=1, heads=2, mlp_dim=32, pool="mean")},
      marks=pytest.mark.slow,
    ),
  ],
)
@pytest.mark.slow_cases("get_config-overrides0")
def test_tfds_configs_under_mock_data(get_config, overrides, tmp_path):
  import tensorflow_datasets as tfds

  config = _shrink(get_config(), steps=1, data_dir=str(tmp_path / "nodata"), **overrides)
  with config.unlocked():
    config.batch_size = 4
    config.hessian.num_iters = 0
  with tfds.testing.mock_data(num_examples=8):
    rec = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert rec["step"] == 1 and np.isfinite(rec["train_loss"])


def test_missing_tfds_data_is_one_clear_error(tmp_path):
  config = _shrink(cifar10_resnet18.get_config(), data_dir=str(tmp_path / "empty"))
  with pytest.raises(input_pipeline.DataNotFoundError, match="tfds build cifar10"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("method", "adam", r"method='adam' is not known: choose one of \('sgd', 'nrs'"),
    ("model", "transformer", r"model='transformer' is not known: choose one of \['bn_mlp'"),
    ("dataset", "mnist", r"dataset='mnist' is not known: choose one of \['cifar10'"),
    ("optimizer", "adam", r"optimizer='adam' is not known: choose one of \('sgd', 'adamw'\)"),
  ],
)
def test_unknown_names_list_the_choices(field, value, match, tmp_path):
  config = _shrink(default.get_config(), **{field: value})
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_compare_writes_summary_table_and_plots(tmp_path, capsys):
  config = _shrink(default.get_config(), hessian=True)
  summary = train.compare(config, str(tmp_path))
  data = json.loads((tmp_path / "summary.json").read_text())
  assert set(data) == {"sgd", "sam", "nrs"} == set(summary)
  for row in data.values():
    assert set(row) >= {
      "test_accuracy",
      "train_loss",
      "hessian_top_eigenvalue",
      "hessian_trace",
    }
    # No wall-clock column: one noisy timing of a shared machine, compilation included.
    assert "wall_seconds" not in row
    assert all(isinstance(v, float) for v in row.values())
  assert (tmp_path / "accuracy.png").stat().st_size > 1000
  assert (tmp_path / "hessian.png").stat().st_size > 1000
  out = capsys.readouterr().out
  assert "| nrs | " in out and "wall_seconds" not in out
  assert "One seed (seed 0)" in out and "experiments/RESULTS_STUDY.md" in out
  assert f"Wrote {tmp_path / 'summary.json'}, {tmp_path / 'accuracy.png'}" in out
  assert f"nrs: test accuracy {summary['nrs']['test_accuracy']:.4f} (trained in" in out
  # A rerun reads the finished runs back, and says so.
  assert train.compare(config, str(tmp_path)) == summary
  assert f"(resumed from {tmp_path / 'sgd'} at step" in capsys.readouterr().out


def _bn_setup(dropout=0.0, model="bn_mlp"):
  config = default.get_config()
  with config.unlocked():
    config.model = model
    config.model_kwargs = {
      "bn_mlp": dict(hidden=(16, 16)),
      "mlp": dict(hidden=(32,), dropout=dropout),
      "vit": dict(patch=(4,), dim=16, depth=1, heads=2, mlp_dim=32, dropout=dropout),
    }[model]
    config.nrs = dict(alpha=1.0, radius=0.3, num_neighbors=3, noise="gaussian", scale="absolute")
  ds = input_pipeline.load("digits", seed=0)
  model_ = train.Model(config, ds)
  batch = {"x": jnp.asarray(ds.train.x[:32]), "y": jnp.asarray(ds.train.y[:32])}
  return config, model_, batch


@pytest.mark.parametrize("implementation", ["loss", "transform"])
@pytest.mark.slow_cases("transform")
def test_nrs_step_running_stats_equal_the_centre_pass_alone(implementation):
  config, model, batch = _bn_setup()
  with config.unlocked():
    config.nrs.implementation = implementation
  tx = optimizers.make_optimizer(config, 10)
  step = steps.make_step("nrs", model.apply, tx, config)
  key = jax.random.key(3)
  _, new_bs, _, metrics = jax.jit(step)(
    model.params, model.batch_stats, tx.init(model.params), batch, key
  )
  assert float(metrics["nrs_penalty" if implementation == "loss" else "loss"]) > 0
  dkey = jax.random.split(key)[0] if implementation == "loss" else key
  _, centre_bs = jax.jit(model.apply, static_argnums=3)(
    model.params, model.batch_stats, batch["x"], True, dkey
  )
  for a, b in zip(jax.tree_util.tree_leaves(new_bs), jax.tree_util.tree_leaves(centre_bs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # A neighbour's pass would give clearly different statistics.
  shifted = jax.tree_util.tree_map(lambda p: p + 0.3, model.params)
  _, neighbour_bs = model.apply(shifted, model.batch_stats, batch["x"], True, dkey)
  gaps = [
    np.max(np.abs(np.asarray(a) - np.asarray(b)))
    for a, b in zip(jax.tree_util.tree_leaves(neighbour_bs), jax.tree_util.tree_leaves(centre_bs))
  ]
  assert max(gaps) > 1e-3
  # And the statistics did move (train mode), so the check is not vacuous.
  moved = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(new_bs), jax.tree_util.tree_leaves(model.batch_stats))
  ]
  assert any(moved)


@pytest.mark.parametrize(
  "model_name",
  ["mlp", pytest.param("vit", marks=pytest.mark.slow)],  # (the LM tests it too)
)
@pytest.mark.slow_cases("mlp")
def test_centre_and_neighbours_share_one_dropout_mask(model_name):
  config, model, batch = _bn_setup(dropout=0.5, model=model_name)
  with config.unlocked():
    config.nrs = dict(alpha=1.0, radius=1e-4, num_neighbors=2, noise="gaussian", scale="absolute")
  tx = optimizers.make_optimizer(config, 10)
  step = jax.jit(steps.make_step("nrs", model.apply, tx, config))
  _, _, _, m = step(
    model.params, model.batch_stats, tx.init(model.params), batch, jax.random.key(0)
  )
  # Shared mask: the divergence is second order in the tiny radius. Different
  # masks would give an O(1) divergence, as this direct check shows.
  z1, _ = model.apply(model.params, model.batch_stats, batch["x"], True, jax.random.key(1))
  z2, _ = model.apply(model.params, model.batch_stats, batch["x"], True, jax.random.key(2))
  import nrs_jax

  different_masks = float(nrs_jax.output_divergence(z1, z2))
  assert different_masks > 1e-3
  assert float(m["nrs_penalty"]) < 1e-3 * different_masks  # 4 orders of magnitude below


def _run_main(workdir, extra=(), wait=True):
  cmd = [
    sys.executable,
    "-m",
    "experiments.main",
    "--config",
    "experiments/configs/digits.py",
    "--workdir",
    str(workdir),
    "--config.num_steps=400",
    "--config.checkpoint_every_steps=40",
    "--config.eval_every_epochs=100",
    "--config.progress=False",
    "--config.hessian.num_iters=0",
    *extra,
  ]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  if wait:
    out = p.communicate(timeout=600)[0].decode()
    assert p.returncode == 0, out
  return p


def test_resume_with_a_changed_config_fails_and_names_the_keys(tmp_path):
  # It used to resume the NRS checkpoint and report the NRS run's numbers again.
  config = _shrink(default.get_config(), method="nrs")
  rec = train.train_and_evaluate(config, str(tmp_path))
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["method"] == "nrs" and recorded["nrs"]["radius"] == 0.05
  changed = _shrink(default.get_config(), method="sgd", learning_rate=0.5)
  with pytest.raises(ValueError, match="learning_rate: 0.2 -> 0.5, method: 'nrs' -> 'sgd'") as e:
    train.train_and_evaluate(changed, str(tmp_path))
  assert "delete" in str(e.value) and "--workdir" in str(e.value)
  # Launch keys may change; the run resumes (at its end) and returns its own record.
  same = _shrink(default.get_config(), method="nrs", progress=True, data_dir="/elsewhere")
  with same.unlocked():
    same.compare_methods = ("nrs",)
  again = train.train_and_evaluate(same, str(tmp_path))
  assert again["test_accuracy"] == rec["test_accuracy"]
  # The resumed run returns the CPU seconds its checkpoint holds (the study adds them).
  assert rec["cpu_seconds_before_resume"] == 0 < again["cpu_seconds_before_resume"]
  # A nested key counts too.
  nested = _shrink(default.get_config(), method="nrs")
  with nested.unlocked():
    nested.nrs.radius = 0.1
  with pytest.raises(ValueError, match=r"nrs\.radius: 0.05 -> 0.1"):
    train.train_and_evaluate(nested, str(tmp_path))


def test_a_run_killed_before_its_first_checkpoint_starts_afresh_under_a_new_config(tmp_path):
  """Nothing of such a run is continued, so its old config is no reason to refuse. The bug:
  a study run killed at its start under an older harness (its config.json lacked keys added
  since) failed its rerun with "holds a run with a different config", and so every rerun."""
  config = _shrink(default.get_config(), method="nrs")
  ref = train.train_and_evaluate(config, str(tmp_path / "ref"))
  old = json.loads((tmp_path / "ref" / "config.json").read_text())
  stale = tmp_path / "stale"
  (stale / "checkpoints").mkdir(parents=True)
  old.pop("nrs"), old.update(learning_rate=9.0)
  (stale / "config.json").write_text(json.dumps(old))
  (stale / "metrics.jsonl").write_text(json.dumps({"step": 2, "test_accuracy": -1.0}) + "\n")
  rec = train.train_and_evaluate(config, str(stale))
  assert rec["test_accuracy"] == ref["test_accuracy"]
  assert json.loads((stale / "config.json").read_text())["learning_rate"] == config.learning_rate
  assert [json.loads(x)["test_accuracy"] for x in (stale / "metrics.jsonl").open()] == [
    rec["test_accuracy"]
  ]


def test_restoring_into_another_optimiser_chain_is_a_clear_error(tmp_path):
  config = _shrink(default.get_config(), method="nrs")
  with config.unlocked():
    config.checkpoint_every_steps = 1
  train.train_and_evaluate(config, str(tmp_path))
  (tmp_path / "config.json").unlink()  # past the config check: the checkpoint itself
  (tmp_path / "metrics.jsonl").unlink()
  other = _shrink(default.get_config(), method="nrs")
  with other.unlocked():
    other.nrs.implementation = "transform"  # an NRSState in the optimiser chain
  with pytest.raises(ValueError, match="does not fit this run's state"):
    train.train_and_evaluate(other, str(tmp_path))


@pytest.mark.slow
def test_sigkill_then_restart_is_bit_identical_to_uninterrupted(tmp_path):
  ref = tmp_path / "ref"
  _run_main(ref)
  run = tmp_path / "killed"
  p = _run_main(run, wait=False)
  ckpt = run / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    if ckpt.exists() and any(d.name.isdigit() for d in ckpt.iterdir()):
      break
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not (run / "final_state.npz").exists(), "the run ended before it could be killed"
  saved = sorted(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
  assert saved and saved[-1] < 400
  _run_main(run)
  a, b = np.load(ref / "final_state.npz"), np.load(run / "final_state.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.slow
def test_vit_patches_shapes_pooling_and_bad_sizes():
  from experiments import models

  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  vit = models.create_model("vit", (32, 32, 3), 10, 0, patch=(8, 8), dim=16, depth=1, heads=2)
  p = vit.patches(x)
  assert p.shape == (2, 16, 8 * 8 * 3)
  # Patch (i, j) is the image block [8i:8i+8, 8j:8j+8] flattened row-major.
  np.testing.assert_array_equal(p[1, 1 * 4 + 2], x[1, 8:16, 16:24].reshape(-1))
  assert vit(x).shape == (2, 10) and vit.pos.shape == (1, 17, 16)  # class token + 16
  sig = models.create_model("vit", (40,), 10, 0, patch=(4,), dim=16, depth=1, heads=2, pool="mean")
  assert sig.patches(jnp.ones((3, 40))).shape == (3, 10, 4) and sig(jnp.ones((3, 40))).shape == (
    3,
    10,
  )
  assert models.create_model("vit", (32, 32, 3), 10, 0, patch=(16, 16), size="Ti").pos.shape == (
    1,
    5,
    192,
  )
  with pytest.raises(ValueError, match="patch=\\(3,\\) must have one size per spatial dim"):
    models.create_model("vit", (40,), 10, 0, patch=(3,))
  with pytest.raises(ValueError, match="size='L' is not a ViT size"):
    models.create_model("vit", (40,), 10, 0, patch=(4,), size="L")
  # No convolution anywhere: auto treats it as a dense model despite 3-d attention kernels.
  from flax import nnx

  from nrs_jax import _strategies

  params = nnx.state(sig, nnx.Param)
  graphdef, rest = nnx.split(sig, nnx.Param, ...)[0::2]
  fn = lambda q: nnx.merge(graphdef, q, rest, copy=True)(jnp.ones((3, 40)))
  leaves = jax.tree_util.tree_leaves(params)
  assert any(a.ndim >= 3 for a in leaves)
  assert not _strategies.runs_convolution(fn, params, [True] * len(leaves))
