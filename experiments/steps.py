"""The supervised training steps: sgd, nrs, sam, asam, rwp, saf, mesa (and, through
``experiments.semi_steps``, the semi-supervised ones). A step builder turns
``apply_fn(params, batch_stats, x, train, dropout_key) -> (logits, new_batch_stats)`` and an
optax ``tx`` into a pure ``step(params, batch_stats, opt_state, batch, key) -> (params,
batch_stats, opt_state, metrics)``. Every method updates BatchNorm statistics from the centre
(unperturbed) pass only and uses one dropout key for all its passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nrs_jax
from experiments import semi_steps
from experiments.losses import accuracy
from experiments.losses import cross_entropy
from experiments.losses import is_token_level
from experiments.losses import soft_kl
from experiments.losses import task_loss
from experiments.losses import valid_tokens
from experiments.optimizers import LookState
from experiments.optimizers import SAFState
from experiments.optimizers import TeacherState
from experiments.optimizers import apply_update
from experiments.optimizers import nrs_options

SEMI = semi_steps.SEMI
METHODS = ("sgd", "nrs", "sam", "asam", "rwp", "saf", "mesa", "looksam", *SEMI)


def grad_at(apply_fn, params, bs, batch, dkey, loss=cross_entropy):
  def loss_fn(p):
    logits, new_bs = apply_fn(p, bs, batch["x"], True, dkey)
    return loss(logits, batch["y"]), (logits, new_bs)

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


TWO_PASS = ("nrs", "sam", "asam", "rwp", "looksam")


def step_probability(config) -> float:
  """``config.<method>.probability``: the share of steps that run the method's own step. 1 (the
  default) runs it every step; below 1 each step draws on the host between the method's step
  and a plain SGD step (randomized SAM/NRS, as in RST). Raises a ValueError naming the key for
  a value outside [0, 1], for a one-pass method, or for the NRS transform path (its optimiser
  state needs ``logits_fn`` on every step)."""
  sub = config.get(config.method) if config.method in TWO_PASS else None
  p = 1.0 if sub is None else sub.get("probability", 1.0)
  if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
    raise ValueError(
      f"config.{config.method}.probability={p!r} must be a number in [0, 1] (the share of "
      "steps that run the method's step; 1 = every step)."
    )
  if p < 1 and config.method == "nrs" and config.nrs.get("implementation", "loss") != "loss":
    raise ValueError(
      "config.nrs.probability < 1 needs config.nrs.implementation='loss' (choices: "
      "'loss', 'transform'): the transform's state needs logits_fn on every step."
    )
  return float(p)


def refresh_every(config) -> int:
  """Every how many steps a reuse method refreshes (``config.nrs.refresh_every`` with
  ``config.nrs.reuse`` set, ``config.looksam.every``); 1 for every other method. Raises a
  ValueError naming the key for a value that is not an int >= 1, and for NRS reuse off the
  transform path or with a probability below 1."""
  if config.method == "looksam":
    key, k = "looksam.every", config.looksam.get("every", 5)
  elif config.method == "nrs" and config.nrs.get("reuse") is not None:
    key, k = "nrs.refresh_every", config.nrs.get("refresh_every", 1)
    if config.nrs.get("implementation", "loss") != "transform" or step_probability(config) < 1:
      raise ValueError(
        "config.nrs.reuse needs config.nrs.implementation='transform' and probability 1: the "
        "stored penalty gradient lives in the transform's state."
      )
  else:
    return 1
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"config.{key}={k!r} must be an int >= 1 (1: refresh on every step).")
  return k


def runs_own_step(config, step: int) -> bool:
  """Whether ``step`` runs the method's own step (:func:`make_step`), else its cheap one
  (:func:`make_cheap_step`): decided on the host, from the config, seed and step alone."""
  every = refresh_every(config)
  if every > 1:
    return nrs_jax.RefreshSchedule(every)(step)
  return takes_expensive_step(config.seed, step, step_probability(config))


def make_cheap_step(method: str, apply_fn: Callable, tx, config) -> Callable:
  """The step a method runs where it does not run its own: a reuse step (LookSAM, NRS with
  ``reuse``), else a plain SGD step (the randomized two-pass methods)."""
  if method == "looksam":
    return _looksam(apply_fn, tx, config, refresh=False)
  if method == "nrs" and config.nrs.get("reuse") is not None:
    return _nrs(apply_fn, tx, config, refresh=False)
  return make_step("sgd", apply_fn, tx, config)


def takes_expensive_step(seed: int, step: int, probability: float) -> bool:
  """Whether ``step`` runs the method's step: a host draw from (seed, step) alone.

  The same on every process and after a resume, with no device conditional.
  """
  if probability >= 1.0:
    return True
  return bool(np.random.default_rng([seed, step, 3]).random() < probability)


# The config sub-dict each method reads its hyperparameters from (``config.<section>``), and
# the options of that sub-dict it does not implement, with the only value it accepts.
CONFIG_SECTION = {
  "sgd": None,
  "nrs": "nrs",
  "sam": "sam",
  "asam": "asam",
  "rwp": "rwp",
  "saf": "saf",
  "mesa": "mesa",
  "looksam": "looksam",
  "nrs_unlabeled": "nrs",
  "vat": "vat",
  "pi_model": "pi_model",
  "vat_nrs": "nrs",  # (and VAT's own, config.vat)
}
_PENALTY_ONLY = {
  "probability": 1.0,
  "neighbor_batch_size": None,
  "reuse_center_logits": False,
  "implementation": "loss",
  "reuse": None,
}
UNSUPPORTED = {"nrs_unlabeled": _PENALTY_ONLY, "vat_nrs": _PENALTY_ONLY}


def check_options(method: str, config) -> None:
  """Raises a ValueError naming ``config.<section>.<key>`` for an option ``method`` ignores."""
  section = CONFIG_SECTION[method]
  for key, neutral in UNSUPPORTED.get(method, {}).items():
    value = config.get(section, {}).get(key, neutral)
    if value != neutral:
      raise ValueError(
        f"method={method!r} does not support config.{section}.{key}={value!r} (it would be "
        f"ignored): leave it at {neutral!r}, or use a method that implements it."
      )


def make_step(method: str, apply_fn: Callable, tx, config, steps_per_epoch: int = 1) -> Callable:
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not known: choose one of {METHODS}.")
  check_options(method, config)
  if method in ("saf", "mesa"):
    return {"saf": _saf, "mesa": _mesa}[method](apply_fn, tx, config, steps_per_epoch)
  if method in SEMI:
    return semi_steps.make_semi_step(method, apply_fn, tx, config, steps_per_epoch)
  builders = {
    "sgd": _sgd,
    "nrs": _nrs,
    "sam": _sam,
    "asam": _asam,
    "rwp": _rwp,
    "looksam": _looksam,
  }
  return builders[method](apply_fn, tx, config)


def _distilled_grad(
  apply_fn, params, bs, batch, key, teacher_logits, weight, tau, loss, where=None
):
  """Gradient of the task loss + weight * soft_kl(teacher, logits, tau), the KL's mean over
  the examples ``where`` selects (all by default).

  Returns (task, logits, bs, g); token-level labels mask the KL at padding.
  """
  y = batch["y"]
  if is_token_level(y):
    where = valid_tokens(y)

  def loss_fn(p):
    logits, new_bs = apply_fn(p, bs, batch["x"], True, key)
    task = loss(logits, y)
    return task + weight * soft_kl(teacher_logits, logits, tau, where), (task, logits, new_bs)

  (_, (task, logits, new_bs)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return task, logits, new_bs, g


def _saf(apply_fn, tx, config, steps_per_epoch):
  """SAF (Du et al., NeurIPS 2022): KL to each example's own outputs ``epochs`` epochs ago. loss =
  CE + lam * KL(softmax(z_{e - E} / tau) || softmax(z / tau)), where ``z_{e - E}`` are the
  logits the example got when it was seen E epochs earlier; the KL's mean runs over the
  batch's examples that have such logits (none before epoch E; none for an example that epoch
  ``e - E``'s drop-last batching skipped: never a stale or zero target). One forward and
  backward pass per step, plus the memory of E x N x C logits."""
  lam, tau, epochs = config.saf.lam, config.saf.tau, int(config.saf.epochs)
  loss = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    if is_token_level(batch["y"]):
      raise ValueError(
        "method='saf' stores one output per training example; token-level tasks "
        "(labels [B, T]) would need [epochs, N, T, V]. Use mesa, nrs or sam there."
      )
    mem = opt_state[0]
    epoch = mem.count // steps_per_epoch
    slot = epoch % epochs
    old = mem.outputs[slot, batch["idx"]]
    # Written at epoch e - E (stamps are the writing epoch + 1; 0 where none was written).
    fresh = (mem.stamps[slot, batch["idx"]] == epoch - epochs + 1) & (epoch >= epochs)
    task, logits, new_bs, g = _distilled_grad(
      apply_fn, params, bs, batch, key, old, lam, tau, loss, where=fresh
    )
    params, opt_state = apply_update(tx, params, opt_state, g)
    outputs = mem.outputs.at[slot, batch["idx"]].set(logits.astype(jnp.float32))
    stamps = mem.stamps.at[slot, batch["idx"]].set(epoch + 1)
    opt_state = (SAFState(mem.count + 1, outputs, stamps), *opt_state[1:])
    return params, new_bs, opt_state, {"loss": task, "accuracy": accuracy(logits, batch["y"])}

  return step


def _mesa(apply_fn, tx, config, steps_per_epoch):
  """MESA (Du et al., 2022): KL to an EMA teacher's outputs, from ``start_epoch`` on. loss = CE +
  lam * KL(softmax(f_ema(x) / tau) || softmax(f(x) / tau)); the teacher runs on the same batch,
  BatchNorm mode and dropout key as the student (its statistics are discarded) and is updated
  as ``ema = decay * ema + (1 - decay) * params`` after each step. Two forward passes and one
  backward."""
  lam, tau, decay = config.mesa.lam, config.mesa.tau, config.mesa.decay
  start = int(config.mesa.start_epoch) * steps_per_epoch
  loss = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    teacher = opt_state[0]
    t_logits, _ = apply_fn(teacher.ema, bs, batch["x"], True, key)
    active = (teacher.count >= start).astype(jnp.float32)
    task, logits, new_bs, g = _distilled_grad(
      apply_fn, params, bs, batch, key, t_logits, lam * active, tau, loss
    )
    new_params, opt_state = apply_update(tx, params, opt_state, g)
    ema = jax.tree_util.tree_map(lambda e, w: decay * e + (1 - decay) * w, teacher.ema, new_params)
    opt_state = (TeacherState(teacher.count + 1, ema), *opt_state[1:])
    return new_params, new_bs, opt_state, {"loss": task, "accuracy": accuracy(logits, batch["y"])}

  return step


def _sgd(apply_fn, tx, config):
  task = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    (loss, (logits, new_bs)), g = grad_at(apply_fn, params, bs, batch, key, task)
    params, opt_state = apply_update(tx, params, opt_state, g)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": accuracy(logits, batch["y"])}

  return step


def _nrs(apply_fn, tx, config, refresh=True):
  """NRS through make_nrs_loss (default) or the optax transform. Token-level labels ``[B, T]``:
  the penalty averages over the valid (non-PAD) positions, through ``where_fn`` / the
  transform's ``where``. ``refresh=False``: the transform's reuse step (``logits_fn=None``)."""
  opts = nrs_options(config)
  task = task_loss(config)
  if config.nrs.get("implementation", "loss") == "transform":
    m = opts.get("neighbor_batch_size")
    reuse = opts.get("reuse_center_logits", False)

    def step(params, bs, opt_state, batch, key):
      (loss, (logits, new_bs)), g = grad_at(apply_fn, params, bs, batch, key, task)
      # The library's sub-batch (make_nrs_loss's neighbor_batch_size) of the batch and logits.
      pen, centre = (batch, logits) if m is None else nrs_jax.strided_subset((batch, logits), m)
      extra: dict = {"logits_fn": lambda p: apply_fn(p, bs, pen["x"], True, key)[0]}
      if is_token_level(batch["y"]):
        extra["where"] = valid_tokens(pen["y"])
      if opts.get("stop_gradient_center", False) and (m is None or reuse):
        extra["center_logits"] = centre  # a fixed target: share the task pass
      params, opt_state = apply_update(tx, params, opt_state, g, extra if refresh else {})
      return params, new_bs, opt_state, {"loss": loss, "accuracy": accuracy(logits, batch["y"])}

    return step

  alpha = opts.pop("alpha")

  def step(params, bs, opt_state, batch, key):
    dkey, nkey = jax.random.split(key)
    token_level = is_token_level(batch["y"])
    loss_fn = nrs_jax.make_nrs_loss(
      lambda p, b: apply_fn(p, bs, b["x"], True, dkey),
      lambda logits, b: task(logits, b["y"]),
      alpha=alpha,
      has_aux=True,
      where_fn=(lambda b: valid_tokens(b["y"])) if token_level else None,
      **opts,
    )
    (_, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, nkey)
    params, opt_state = apply_update(tx, params, opt_state, g)
    metrics = {
      "loss": aux["task_loss"],
      "accuracy": accuracy(aux["logits"], batch["y"]),
      "nrs_penalty": aux["nrs_penalty"],
    }
    return params, aux["model_aux"], opt_state, metrics

  return step


def _ascent_step(apply_fn, tx, perturb, task=cross_entropy):
  """Two-pass SAM-style step: gradient at w + e(w, g), BN statistics from the centre."""

  def step(params, bs, opt_state, batch, key):
    (loss, (logits, new_bs)), g = grad_at(apply_fn, params, bs, batch, key, task)
    e = perturb(params, g)
    shifted = jax.tree_util.tree_map(lambda p, d: p + d, params, e)
    _, g2 = grad_at(apply_fn, shifted, bs, batch, key, task)
    params, opt_state = apply_update(tx, params, opt_state, g2)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": accuracy(logits, batch["y"])}

  return step


def _sam(apply_fn, tx, config):
  """SAM (Foret et al., 2021): e = rho * g / ||g||."""
  rho = config.sam.rho

  def perturb(params, g):
    n = optax.tree_utils.tree_norm(g)
    return jax.tree_util.tree_map(lambda x: rho * x / jnp.maximum(n, 1e-12), g)

  return _ascent_step(apply_fn, tx, perturb, task_loss(config))


def _asam(apply_fn, tx, config):
  """Adaptive SAM (Kwon et al., 2021): e = rho * T^2 g / ||T g||, T = |w| + eta on the weights
  (leaves of 2 or more dims), T = 1 on biases and normalisation parameters, as in the
  official code (github.com/SamsungLabs/ASAM)."""
  rho, eta = config.asam.rho, config.asam.eta

  def perturb(params, g):  # (as its official code: weights rescaled, not biases or norms)
    t = jax.tree_util.tree_map(
      lambda w: jnp.abs(w) + eta if w.ndim > 1 else jnp.ones_like(w), params
    )
    tg = jax.tree_util.tree_map(jnp.multiply, t, g)
    n = optax.tree_utils.tree_norm(tg)
    return jax.tree_util.tree_map(lambda ti, x: rho * ti * x / jnp.maximum(n, 1e-12), t, tg)

  return _ascent_step(apply_fn, tx, perturb, task_loss(config))


def _looksam(apply_fn, tx, config, refresh=True):
  """LookSAM (Liu et al., CVPR 2022): every ``every`` steps a SAM step (``rho``), storing the
  part of its gradient orthogonal to the task gradient, ``g_v = g_s - (g . g_s / |g|^2) g``;
  in between, ``g + alpha * |g| / |g_v| * g_v`` from one pass (the paper's rule and alpha)."""
  rho, alpha = config.looksam.rho, config.looksam.get("alpha", 0.7)
  task = task_loss(config)
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def step(params, bs, opt_state, batch, key):
    (loss, (logits, new_bs)), g = grad_at(apply_fn, params, bs, batch, key, task)
    gn = optax.tree_utils.tree_norm(g)
    if refresh:
      shifted = jax.tree.map(lambda p, x: p + rho * x / jnp.maximum(gn, 1e-12), params, g)
      _, gs = grad_at(apply_fn, shifted, bs, batch, key, task)
      c = dot(g, gs) / jnp.maximum(gn**2, 1e-24)
      stored = LookState(jax.tree.map(lambda a, b: a - c * b, gs, g))
    else:
      stored, gv = opt_state[0], opt_state[0].gv
      scale = alpha * gn / jnp.maximum(optax.tree_utils.tree_norm(gv), 1e-12)
      gs = jax.tree.map(lambda a, b: a + scale * b, g, gv)
    params, opt_state = apply_update(tx, params, opt_state, gs)
    opt_state = (stored, *opt_state[1:])
    return params, new_bs, opt_state, {"loss": loss, "accuracy": accuracy(logits, batch["y"])}

  return step


def _rwp(apply_fn, tx, config):
  """Random weight perturbation: g = (1 - mix) g(w) + mix g(w + delta), delta random. delta is
  drawn with nrs_jax.sample_perturbations (gaussian, the configured scale); mix = 1 is plain
  RWP (Bisla et al., 2022), mix < 1 the mixed-loss form of Li et al. (2022)."""
  opts = dict(config.rwp)
  mix = opts.pop("mix")
  opts.pop("probability", None)

  task = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    dkey, pkey = jax.random.split(key)
    (loss, (logits, new_bs)), g = grad_at(apply_fn, params, bs, batch, dkey, task)
    perts = nrs_jax.sample_perturbations(params, pkey, num_neighbors=1, **opts)
    shifted = jax.tree_util.tree_map(lambda p, d: p + d[0], params, perts.as_tree(params))
    _, g2 = grad_at(apply_fn, shifted, bs, batch, dkey, task)
    g = jax.tree_util.tree_map(lambda a, b: (1 - mix) * a + mix * b, g, g2)
    params, opt_state = apply_update(tx, params, opt_state, g)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": accuracy(logits, batch["y"])}

  return step


def method_defaults() -> dict[str, Any]:
  """Per-method hyperparameters: one sub-dict per method in every config."""
  # Each two-pass method also takes `probability` (default 1): see step_probability.
  return {
    "nrs": dict(
      alpha=1.0, radius=0.05, num_neighbors=1, noise="gaussian", scale="absolute", probability=1.0
    ),
    "sam": dict(rho=0.2, probability=1.0),
    # LookSAM: a SAM step every `every` steps, its orthogonal part reused with weight alpha.
    "looksam": dict(rho=0.2, every=5, alpha=0.7),
    "asam": dict(rho=1.0, eta=0.01, probability=1.0),
    "rwp": dict(radius=0.05, scale="filter", mix=0.5, probability=1.0),
    # SAF: KL to the outputs of `epochs` epochs earlier; MESA: to an EMA teacher from `start_epoch`.
    "saf": dict(lam=1.0, tau=1.0, epochs=3),
    "mesa": dict(lam=1.0, tau=1.0, decay=0.995, start_epoch=5),
    # The consistency methods on unlabeled data (nrs_unlabeled reads "nrs"): VAT's xi and
    # eps (Miyato et al., 2018), the Pi-model's input noise scale; each weighted by `weight`.
    # xi: the paper's 1e-6 is below float32's resolution of x + xi d (tests/semi_test.py);
    # 1e-3 gives its direction in float32 (the float64 direction is the same for both).
    "vat": dict(eps=1.0, xi=1e-3, weight=1.0),
    # The Pi-model: input noise 0.15 (Laine and Aila's), its squared-error weight ramped up
    # over the first `rampup` of training (their 80 of 300 epochs) to `weight`.
    "pi_model": dict(noise=0.15, weight=1.0, rampup=80 / 300),
  }
