"""Token-level training: the decoder LM, the stdlib corpus, masked losses, NRS over [B, T, V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from experiments import input_pipeline
from experiments import losses
from experiments import models
from experiments import optimizers
from experiments import steps
from experiments import train
from experiments.configs import cifar10_vit
from experiments.configs import imagenet_vit_s16
from experiments.configs import stdlib_lm
from tests.conftest import assert_trees_f32_close
from tests.harness_util import recomputed_loss
from tests.harness_util import recomputed_test_accuracy

PAD = input_pipeline.PAD


def _lm(**kw):
  kw = {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, **kw}
  return models.create_model("lm", (16,), 50, 0, **kw)


@pytest.mark.slow
def test_lm_is_causal_with_a_tied_or_untied_head_and_rejects_long_inputs():
  m = _lm()
  x = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
  y = m(x)
  assert y.shape == (2, 16, 50)
  y2 = m(x.at[:, 9].set((x[:, 9] + 1) % 50))
  np.testing.assert_allclose(y[:, :9], y2[:, :9], atol=1e-6)  # the past does not see it
  assert not np.allclose(y[:, 9:], y2[:, 9:])
  # Tied: logits are the final features times the embedding; untied adds a head.
  n = lambda mod: sum(v.size for v in jax.tree_util.tree_leaves(nnx.state(mod, nnx.Param)))
  assert n(_lm(tied=False)) - n(m) == 16 * 50
  with pytest.raises(ValueError, match="max_len=16"):
    m(jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="block_size=32 is larger than the model's max_len=16"):
    models.create_model("lm", (32,), 50, 0, max_len=16, dim=16, depth=1, heads=2)


@pytest.mark.slow
def test_lm_dropout_follows_its_key_and_is_off_in_eval():
  m = _lm(dropout=0.5)
  x = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
  a = m(x, train=True, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(a, m(x, train=True, dropout_key=jax.random.key(1)))
  assert not np.allclose(a, m(x, train=True, dropout_key=jax.random.key(2)))
  np.testing.assert_array_equal(m(x), m(x, train=False, dropout_key=jax.random.key(2)))


def test_tokenize_files_never_crosses_a_file_and_pads_with_pad():
  files = [b"abcdefghij", b"xyz", b"", b"q"]
  s = input_pipeline.tokenize_files(files, 4)
  c = lambda t: [ord(ch) for ch in t]
  np.testing.assert_array_equal(s.x, [c("abcd"), c("efgh"), c("i") + [0] * 3, c("xy") + [0] * 2])
  np.testing.assert_array_equal(
    s.y, [c("bcde"), c("fghi"), c("j") + [PAD] * 3, c("yz") + [PAD] * 2]
  )
  # Brute force: the valid (input, target) pairs are exactly each file's bigrams.
  pairs = sorted(zip(s.x[s.y >= 0].tolist(), s.y[s.y >= 0].tolist()))
  expected = sorted((f[i], f[i + 1]) for f in files for i in range(len(f) - 1))
  assert pairs == expected


def test_stdlib_corpus_is_split_by_file_and_reproducible():
  sources = input_pipeline.stdlib_sources()
  paths = [p for p, _ in sources]
  assert paths == sorted(
    paths,
    key=lambda p: (input_pipeline.STDLIB_PACKAGES.index(p.split("/")[0].removesuffix(".py")), p),
  )
  assert not any({"test", "tests"} & set(p.split("/")[:-1]) for p in paths)
  splits = [input_pipeline.stdlib_split_of(p) for p in paths]
  assert 0.6 < splits.count("train") / len(splits) < 0.95
  assert splits.count("validation") and splits.count("test")
  ds = input_pipeline.load("stdlib", block_size=32)
  assert ds.num_classes == 256 and ds.input_shape == (32,)
  # Every character after a file's first is a target exactly once, in its file's split.
  for split in ("train", "validation", "test"):
    want = sum(max(len(d) - 1, 0) for p, d in sources if input_pipeline.stdlib_split_of(p) == split)
    assert int((getattr(ds, split).y >= 0).sum()) == want
  again = input_pipeline.load("stdlib", block_size=32, max_examples=100)
  np.testing.assert_array_equal(again.train.x, ds.train.x[:100])
  with pytest.raises(ValueError, match="block_size"):
    input_pipeline.load("stdlib", block_size=0)
  with pytest.raises(ValueError, match="label_noise"):
    input_pipeline.load("stdlib", label_noise=0.1)


def _np_ce(logits, labels, smoothing=0.0):
  logp = special.log_softmax(np.asarray(logits, np.float64), -1)
  v = logits.shape[-1]
  target = np.eye(v)[np.maximum(labels, 0)] * (1 - smoothing) + smoothing / v
  return -(target * logp).sum(-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_cross_entropy_and_accuracy_mask_padding_against_numpy(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5)).astype(np.int32)
  labels[0, 3:] = PAD
  labels[2, 1:] = PAD
  valid = labels >= 0
  ce = _np_ce(logits, labels, smoothing)
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  np.testing.assert_allclose(got, ce[valid].mean(), rtol=1e-5)
  acc = (logits.argmax(-1) == labels)[valid].mean()
  np.testing.assert_allclose(losses.accuracy(jnp.asarray(logits), jnp.asarray(labels)), acc)
  # One label per example: the plain batch mean, as before.
  flat = losses.cross_entropy(jnp.asarray(logits[:, 0]), jnp.asarray(np.abs(labels[:, 0])))
  np.testing.assert_allclose(flat, _np_ce(logits[:, 0], np.abs(labels[:, 0])).mean(), rtol=1e-5)


def test_label_smoothing_is_checked_and_set_in_the_vit_recipes():
  config = stdlib_lm.get_config()
  with config.unlocked():
    config.label_smoothing = 1.5
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.task_loss(config)
  assert cifar10_vit.get_config().label_smoothing == 0.1
  assert imagenet_vit_s16.get_config().label_smoothing == 0.1


def test_eval_step_counts_valid_tokens_of_real_rows():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
  y = rng.integers(0, 6, (3, 4)).astype(np.int32)
  y[1, 2:] = PAD
  w = np.array([1.0, 1.0, 0.0], np.float32)  # the last row pads the batch
  step = train.make_eval_step(lambda p, bs, x, tr, k: (jnp.asarray(logits), bs))
  loss, correct, count = step({}, {}, jnp.zeros(3), jnp.asarray(y), jnp.asarray(w))
  keep = (y >= 0) & (w[:, None] > 0)
  np.testing.assert_allclose(loss, _np_ce(logits, y)[keep].sum(), rtol=1e-5)
  assert int(correct) == int((logits.argmax(-1) == y)[keep].sum())
  assert int(count) == int(keep.sum())


def _token_setup(**nrs):
  config = stdlib_lm.get_config()
  with config.unlocked():
    config.model_kwargs = dict(dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.1)
    config.nrs.update(radius=0.05, **nrs)
    # Plain SGD from step 0, so the update is the gradient (AdamW's first step is its sign).
    config.optimizer, config.warmup_steps, config.learning_rate, config.weight_decay = (
      "sgd",
      0,
      1.0,
      0.0,
    )
  ds = input_pipeline.Dataset("tokens", None, None, None, num_classes=40, input_shape=(12,))
  model = train.Model(config, ds)
  rng = np.random.default_rng(2)
  x = rng.integers(1, 40, (4, 12)).astype(np.int32)
  y = rng.integers(0, 40, (4, 12)).astype(np.int32)
  y[0, 7:], y[3, 2:] = PAD, PAD  # padding at the ends, as tokenize_files leaves it
  return config, model, {"x": x, "y": y}


@pytest.mark.parametrize("implementation", ["loss", "transform"])
@pytest.mark.parametrize("sub", [None, 2])
@pytest.mark.slow_cases("2-loss", "None-loss", "None-transform", "2-transform")
def test_token_level_nrs_step_ignores_padding(implementation, sub):
  config, model, batch = _token_setup(implementation=implementation)
  if sub:
    with config.unlocked():
      config.nrs.neighbor_batch_size = sub
  tx = optimizers.make_optimizer(config, 10)
  step = jax.jit(steps.make_step("nrs", model.apply, tx, config))
  state = (model.params, model.batch_stats, tx.init(model.params))
  run = lambda b: step(*state, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(5))
  p1, _, _, m1 = run(batch)
  # Causal model: inputs at padded positions reach only padded outputs, so nothing moves.
  x = batch["x"].copy()
  x[0, 8:], x[3, 3:] = 39, 38
  p2, _, _, m2 = run({**batch, "x": x})
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    assert_trees_f32_close(a, b, rtol=1e-5)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  # Not vacuous: the same change at a valid position does move the parameters.
  x = batch["x"].copy()
  x[0, 3] = 39
  p3, _, _, _ = run({**batch, "x": x})
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p3))
  )


@pytest.mark.slow
def test_token_level_penalty_is_the_masked_mean_of_nrs_penalty():
  config, model, batch = _token_setup()
  tx = optimizers.make_optimizer(config, 10)
  step = steps.make_step("nrs", model.apply, tx, config)
  key = jax.random.key(4)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  _, _, _, m = jax.jit(step)(model.params, model.batch_stats, tx.init(model.params), b, key)
  dkey, nkey = jax.random.split(key)
  logits_fn = lambda p: model.apply(p, model.batch_stats, b["x"], True, dkey)[0]
  import nrs_jax

  kw = dict(radius=0.05, num_neighbors=1)
  masked = nrs_jax.nrs_penalty(logits_fn, model.params, nkey, where=b["y"] >= 0, **kw)
  unmasked = nrs_jax.nrs_penalty(logits_fn, model.params, nkey, **kw)
  np.testing.assert_allclose(m["nrs_penalty"], masked, rtol=1e-5)
  assert not np.isclose(float(masked), float(unmasked), rtol=1e-3)


def _shrunk_lm(method):
  config = stdlib_lm.get_config()
  with config.unlocked():
    config.method = method
    config.num_steps = 2
    config.batch_size = 8
    config.block_size = 16
    config.max_examples = 64
    config.model_kwargs = dict(dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.1)
    config.eval_every_epochs = 10_000
    config.progress = False
    config.train_eval_examples = 32
  return config


@pytest.fixture
def small_corpus(monkeypatch):
  """The stdlib corpus cut to the first 12 files of each split (the split is a file's own,
  by its path): the same pipeline and metrics, without tokenizing the whole library three
  times per run (training, and the two recomputations)."""
  whole = input_pipeline.stdlib_sources()
  split = input_pipeline.stdlib_split_of
  keep = []
  for s in ("train", "validation", "test"):
    keep += [f for f in whole if split(f[0]) == s][:12]
  monkeypatch.setattr(input_pipeline, "stdlib_sources", lambda *a, **k: keep)


@pytest.mark.parametrize("method", ["sgd", "sam", "nrs", "mesa"])
@pytest.mark.slow_cases("sgd", "sam", "mesa")
def test_stdlib_lm_trains_a_few_steps(method, tmp_path, small_corpus):
  config = _shrunk_lm(method)
  if method == "nrs":
    with config.unlocked():
      config.nrs.neighbor_batch_size = 4
  rec = train.train_and_evaluate(config, str(tmp_path))
  assert rec["step"] == 2
  assert np.isfinite(rec["val_loss"]) and np.isfinite(rec["test_loss"])
  if method == "nrs":  # the recorded accuracy is the final state's, over valid tokens
    np.testing.assert_allclose(
      rec["test_accuracy"], recomputed_test_accuracy(config, str(tmp_path)), atol=1e-6
    )
  # The recorded validation loss is the final state's mean cross-entropy per valid character
  # (the bugs: padding counted, a mean over examples' means, the initial weights, bits).
  np.testing.assert_allclose(
    rec["val_loss"], recomputed_loss(config, str(tmp_path), "validation"), rtol=1e-5
  )
  if method == "nrs":
    assert rec["train/nrs_penalty"] > 0


def test_stdlib_lm_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="saf"):
    train.train_and_evaluate(_shrunk_lm("saf"), str(tmp_path / "saf"))
  config = _shrunk_lm("sgd")
  with config.unlocked():
    config.model_kwargs.max_len = 8
  with pytest.raises(ValueError, match="max_len=8"):
    train.train_and_evaluate(config, str(tmp_path / "long"))


@pytest.mark.parametrize("method", ["sgd", "sam", "nrs"])
@pytest.mark.slow_cases("sam", "sgd", "nrs")
def test_every_method_trains_on_the_smoothed_masked_loss(method):
  config, model, batch = _token_setup()
  with config.unlocked():
    config.label_smoothing = 0.1
  tx = optimizers.make_optimizer(config, 10)
  step = jax.jit(steps.make_step(method, model.apply, tx, config))
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(6)
  _, _, _, m = step(model.params, model.batch_stats, tx.init(model.params), b, key)
  dkey = jax.random.split(key)[0] if method == "nrs" else key
  logits, _ = model.apply(model.params, model.batch_stats, b["x"], True, dkey)
  y = batch["y"]
  want = _np_ce(np.asarray(logits), y, 0.1)[y >= 0].mean()
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)


@pytest.mark.slow
def test_lm_centre_and_neighbours_share_one_dropout_mask():
  config, model, batch = _token_setup()
  with config.unlocked():
    config.model_kwargs.dropout = 0.5
    config.nrs.update(radius=1e-4, num_neighbors=2)
  model = train.Model(config, input_pipeline.Dataset("t", None, None, None, 40, (12,)))
  tx = optimizers.make_optimizer(config, 10)
  step = jax.jit(steps.make_step("nrs", model.apply, tx, config))
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  _, _, _, m = step(model.params, model.batch_stats, tx.init(model.params), b, jax.random.key(0))
  z1, _ = model.apply(model.params, {}, b["x"], True, jax.random.key(1))
  z2, _ = model.apply(model.params, {}, b["x"], True, jax.random.key(2))
  import nrs_jax

  different_masks = float(nrs_jax.output_divergence(z1, z2))
  assert different_masks > 1e-3
  assert 0 < float(m["nrs_penalty"]) < 1e-3 * different_masks


def test_train_eval_examples_takes_the_head_of_the_train_split():
  ds = input_pipeline.load("stdlib", block_size=16, max_examples=100)
  view = train.train_eval_view(ds, 32)
  np.testing.assert_array_equal(view.train.x, ds.train.x[:32])
  assert view.validation is ds.validation and ds.num_train == 100
  assert train.train_eval_view(ds, 0) is ds and train.train_eval_view(ds, 500) is ds
