"""Training methods as step builders: sgd, nrs, sam, asam, rwp, saf, mesa, and with unlabeled
data nrs_unlabeled, vat, pi_model (``SEMI``). A step builder turns
``apply_fn(params, batch_stats, x, train, dropout_key) -> (logits, new_batch_stats)`` and an
optax ``tx`` into a pure ``step(params, batch_stats, opt_state, batch, key) -> (params,
batch_stats, opt_state, metrics)``. Every method updates BatchNorm statistics from the centre
(unperturbed) pass only and uses one dropout key for all its passes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nrs_jax

# Consistency methods that also read an unlabeled batch, batch["u"] (config.labeled_fraction).
SEMI = ("nrs_unlabeled", "vat", "pi_model")
METHODS = ("sgd", "nrs", "sam", "asam", "rwp", "saf", "mesa", *SEMI)


def is_token_level(labels) -> bool:
  """Labels ``[B, T]`` (a sequence model's next tokens) rather than one per example."""
  return labels.ndim > 1


def valid_tokens(labels):
  """Where a token-level label is real: padding carries a negative label (``PAD``)."""
  return labels >= 0


def cross_entropy(logits, labels, smoothing=0.0):
  """Mean cross-entropy: over examples, or over the valid tokens of ``[B, T]`` labels.
  ``smoothing`` > 0 mixes the one-hot target with the uniform distribution (label smoothing,
  ``optax.smooth_labels``). Token-level labels below 0 are padding and are left out of the
  mean."""
  safe = jnp.maximum(labels, 0)
  if smoothing:
    target = optax.smooth_labels(jax.nn.one_hot(safe, logits.shape[-1]), smoothing)
    ce = optax.softmax_cross_entropy(logits, target)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  if not is_token_level(labels):
    return ce.mean()
  valid = valid_tokens(labels)
  return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def task_loss(config) -> Callable:
  """``(logits, labels) -> loss`` with the config's ``label_smoothing`` (default 0)."""
  smoothing = float(config.get("label_smoothing", 0.0))
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"config.label_smoothing={smoothing} must be in [0, 1).")
  return partial(cross_entropy, smoothing=smoothing)


def _accuracy(logits, labels):
  hit = jnp.argmax(logits, -1) == labels
  if not is_token_level(labels):
    return jnp.mean(hit)
  valid = valid_tokens(labels)
  return jnp.sum(hit & valid) / jnp.maximum(jnp.sum(valid), 1)


def _grad_at(apply_fn, params, bs, batch, dkey, loss=cross_entropy):
  def loss_fn(p):
    logits, new_bs = apply_fn(p, bs, batch["x"], True, dkey)
    return loss(logits, batch["y"]), (logits, new_bs)

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _finish(tx, params, opt_state, grads, update_kwargs=None):
  updates, opt_state = tx.update(grads, opt_state, params, **(update_kwargs or {}))
  return optax.apply_updates(params, updates), opt_state


OPTIMIZERS = ("sgd", "adamw")


def base_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """The base optimiser with a (warmup +) cosine schedule; every method composes with it.
  ``config.optimizer``: ``"sgd"`` (momentum ``config.momentum``, coupled weight decay, as in
  the CNN recipes) or ``"adamw"`` (``config.adam_b1``, ``adam_b2``, decoupled weight decay
  ``config.weight_decay``, as in ViT recipes)."""
  name = config.get("optimizer", "sgd")
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r} is not known: choose one of {OPTIMIZERS}.")
  warmup = min(int(config.get("warmup_steps", 0)), max(total_steps - 1, 0))
  if warmup:
    lr = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total_steps)
  else:
    lr = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  if name == "adamw":
    return optax.adamw(
      lr,
      b1=config.get("adam_b1", 0.9),
      b2=config.get("adam_b2", 0.999),
      weight_decay=config.weight_decay,
    )
  return optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(lr, momentum=config.momentum or None, nesterov=config.get("nesterov", False)),
  )


class SAFState(NamedTuple):
  """SAF's memory: ``count`` steps taken; ``outputs [epochs, num_train, num_classes]`` (float32),
  slot ``e % epochs`` holding epoch ``e``'s logits until epoch ``e + epochs`` replaces them."""

  count: jax.Array
  outputs: jax.Array


class TeacherState(NamedTuple):
  """MESA's teacher: ``count`` steps taken; ``ema`` = ``decay * ema + (1 - decay) * params``."""

  count: jax.Array
  ema: Any


def _holder(init_fn) -> optax.GradientTransformation:
  """A chain member that only carries state; the method's step updates it."""
  return optax.GradientTransformation(init_fn, lambda updates, state, params=None: (updates, state))


def make_optimizer(
  config, total_steps: int, num_train: int = 0, num_classes: int = 0
) -> optax.GradientTransformation:
  base = base_optimizer(config, total_steps)
  if config.method == "saf":
    if num_train <= 0 or num_classes <= 0:
      raise ValueError("saf stores each training example's outputs: pass num_train, num_classes.")
    e, c = int(config.saf.epochs), num_classes

    def saf_init(params):
      del params
      return SAFState(jnp.zeros([], jnp.int32), jnp.zeros((e, num_train, c), jnp.float32))

    return optax.chain(_holder(saf_init), base)
  if config.method == "mesa":
    teacher = lambda params: TeacherState(
      jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.asarray, params)
    )
    return optax.chain(_holder(teacher), base)
  if config.method == "nrs" and config.nrs.get("implementation", "loss") == "transform":
    opts = _nrs_options(config)
    for name in _LOSS_ONLY:
      opts.pop(name, None)
    return optax.chain(nrs_jax.add_nrs_gradient(key=config.seed, **opts), base)
  return base


# make_nrs_loss options that the transform path implements in the step instead.
_LOSS_ONLY = ("neighbor_batch_size", "reuse_center_logits")


def _nrs_options(config) -> dict:
  opts = dict(config.nrs)
  opts.pop("implementation", None)
  opts.pop("probability", None)
  return opts


TWO_PASS = ("nrs", "sam", "asam", "rwp")


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


def takes_expensive_step(seed: int, step: int, probability: float) -> bool:
  """Whether ``step`` runs the method's step: a host draw from (seed, step) alone.

  The same on every process and after a resume, with no device conditional.
  """
  if probability >= 1.0:
    return True
  return bool(np.random.default_rng([seed, step, 3]).random() < probability)


def make_step(method: str, apply_fn: Callable, tx, config, steps_per_epoch: int = 1) -> Callable:
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not known: choose one of {METHODS}.")
  if method in ("saf", "mesa"):
    return {"saf": _saf, "mesa": _mesa}[method](apply_fn, tx, config, steps_per_epoch)
  if method in SEMI:
    cons = {"nrs_unlabeled": _nrs_unlabeled, "vat": _vat, "pi_model": _pi_model}[method]
    return _semi(apply_fn, tx, config, cons(apply_fn, config))
  return {"sgd": _sgd, "nrs": _nrs, "sam": _sam, "asam": _asam, "rwp": _rwp}[method](
    apply_fn, tx, config
  )


def with_unlabeled(batch) -> jax.Array:
  """The labelled inputs, then the unlabeled: ``concat(batch["x"], batch["u"])``. A missing
  ``u``, or one of another shape per example, is an error naming it (at trace time)."""
  x, u = batch["x"], batch.get("u")
  if u is None:
    raise ValueError(
      "this method reads an unlabeled batch, batch['u']: set config.labeled_fraction < 1 and "
      "config.unlabeled_batch_size > 0."
    )
  if jnp.shape(u)[1:] != jnp.shape(x)[1:]:
    raise ValueError(
      f"the unlabeled batch batch['u'] has shape {jnp.shape(u)} but the labelled batch['x'] "
      f"{jnp.shape(x)}: the model takes [N, *{tuple(jnp.shape(x)[1:])}] (any N)."
    )
  return jnp.concatenate([x, jnp.asarray(u, x.dtype)])


def _semi(apply_fn, tx, config, consistency):
  """loss = the task loss on the labelled rows + ``consistency(params, bs, inputs, key) ->
  (logits, new_bs, value)`` over the labelled and unlabeled inputs together (one batch, so
  BatchNorm statistics are the whole batch's). The labels of ``u`` do not exist here."""
  task = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    xs, b = with_unlabeled(batch), jnp.shape(batch["x"])[0]

    def loss_fn(p):
      logits, new_bs, value = consistency(p, bs, xs, key)
      ce = task(logits[:b], batch["y"])
      return ce + value, (ce, logits[:b], new_bs, value)

    (_, (ce, logits, new_bs, value)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state = _finish(tx, params, opt_state, g)
    metrics = {"loss": ce, "accuracy": _accuracy(logits, batch["y"]), "consistency": value}
    return params, new_bs, opt_state, metrics

  return step


def _nrs_unlabeled(apply_fn, config):
  """NRS's penalty over the labelled and unlabeled inputs, its centre the task pass."""
  opts = {k: v for k, v in _nrs_options(config).items() if k not in _LOSS_ONLY}
  alpha = opts.pop("alpha")

  def consistency(p, bs, xs, key):
    dkey, nkey = jax.random.split(key)
    logits, new_bs = apply_fn(p, bs, xs, True, dkey)
    at = lambda q: apply_fn(q, bs, xs, True, dkey)[0]
    return logits, new_bs, alpha * nrs_jax.nrs_penalty(at, p, nkey, center_logits=logits, **opts)

  return consistency


def _per_example_unit(v):
  return v / jnp.maximum(
    jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True)), 1e-12
  )


def vat_perturbation(logits_fn, x, target_logits, key, xi: float, eps: float):
  """VAT's adversarial input direction (Miyato et al., 2018), one power iteration: ``d ~ N(0,
  I)`` per example of unit L2 norm, ``g = grad_r KL(p(target) || p(logits_fn(x + r)))`` at ``r
  = xi d``, and ``r_adv = eps g / ||g||`` per example (a constant)."""
  d = _per_example_unit(jax.random.normal(key, jnp.shape(x), jnp.float32).astype(x.dtype))
  kl_at = lambda r: jnp.mean(nrs_jax.kl(target_logits, logits_fn(x + r)))
  return eps * _per_example_unit(jax.lax.stop_gradient(jax.grad(kl_at)(xi * d)))


def _vat(apply_fn, config):
  """VAT: weight * KL(p(x) || p(x + r_adv)), p(x) a fixed target; r_adv from fixed weights."""
  xi, eps, weight = config.vat.xi, config.vat.eps, config.vat.weight

  def consistency(p, bs, xs, key):
    dkey, nkey = jax.random.split(key)
    logits, new_bs = apply_fn(p, bs, xs, True, dkey)
    target = jax.lax.stop_gradient(logits)
    fixed = lambda x: apply_fn(jax.lax.stop_gradient(p), bs, x, True, dkey)[0]
    r_adv = vat_perturbation(fixed, xs, target, nkey, xi, eps)
    adv = apply_fn(p, bs, xs + r_adv, True, dkey)[0]
    return logits, new_bs, weight * jnp.mean(nrs_jax.kl(target, adv))

  return consistency


def _pi_model(apply_fn, config):
  """The Pi-model (Laine and Aila, 2017): two draws of Gaussian input noise, the task loss on
  the first, weight * KL(p(x + n1) || p(x + n2)) with gradients through both (their squared
  error replaced by the KL that NRS and VAT use)."""
  sigma, weight = config.pi_model.noise, config.pi_model.weight

  def consistency(p, bs, xs, key):
    dkey, k1, k2 = jax.random.split(key, 3)
    noisy = lambda k: xs + sigma * jax.random.normal(k, xs.shape, xs.dtype)
    z1, new_bs = apply_fn(p, bs, noisy(k1), True, dkey)
    z2 = apply_fn(p, bs, noisy(k2), True, dkey)[0]
    return z1, new_bs, weight * jnp.mean(nrs_jax.kl(z1, z2))

  return consistency


def soft_kl(teacher_logits, logits, tau, where=None):
  """Mean of KL(softmax(teacher / tau) || softmax(logits / tau)), teacher fixed.

  Over the batch, or over the positions where ``where`` is true.
  """
  kl = nrs_jax.kl(jax.lax.stop_gradient(teacher_logits) / tau, logits / tau)
  if where is None:
    return jnp.mean(kl)
  return jnp.sum(jnp.where(where, kl, 0.0)) / jnp.maximum(jnp.sum(where), 1)


def _distilled_grad(apply_fn, params, bs, batch, key, teacher_logits, weight, tau, loss):
  """Gradient of the task loss + weight * soft_kl(teacher, logits, tau).

  Returns (task, logits, bs, g); token-level labels mask the KL at padding.
  """
  y = batch["y"]
  where = valid_tokens(y) if is_token_level(y) else None

  def loss_fn(p):
    logits, new_bs = apply_fn(p, bs, batch["x"], True, key)
    task = loss(logits, y)
    return task + weight * soft_kl(teacher_logits, logits, tau, where), (task, logits, new_bs)

  (_, (task, logits, new_bs)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return task, logits, new_bs, g


def _saf(apply_fn, tx, config, steps_per_epoch):
  """SAF (Du et al., NeurIPS 2022): KL to each example's own outputs ``epochs`` epochs ago. loss =
  CE + lam * KL(softmax(z_{e - E} / tau) || softmax(z / tau)) from epoch E on (before that
  there is nothing to compare with), where ``z_{e - E}`` are the logits the example got when it
  was seen E epochs earlier. One forward and backward pass per step, plus the memory of E x N x
  C logits."""
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
    active = (epoch >= epochs).astype(jnp.float32)
    task, logits, new_bs, g = _distilled_grad(
      apply_fn, params, bs, batch, key, old, lam * active, tau, loss
    )
    params, opt_state = _finish(tx, params, opt_state, g)
    outputs = mem.outputs.at[slot, batch["idx"]].set(logits.astype(jnp.float32))
    opt_state = (SAFState(mem.count + 1, outputs), *opt_state[1:])
    return params, new_bs, opt_state, {"loss": task, "accuracy": _accuracy(logits, batch["y"])}

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
    new_params, opt_state = _finish(tx, params, opt_state, g)
    ema = jax.tree_util.tree_map(lambda e, w: decay * e + (1 - decay) * w, teacher.ema, new_params)
    opt_state = (TeacherState(teacher.count + 1, ema), *opt_state[1:])
    return new_params, new_bs, opt_state, {"loss": task, "accuracy": _accuracy(logits, batch["y"])}

  return step


def _sgd(apply_fn, tx, config):
  task = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    (loss, (logits, new_bs)), g = _grad_at(apply_fn, params, bs, batch, key, task)
    params, opt_state = _finish(tx, params, opt_state, g)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": _accuracy(logits, batch["y"])}

  return step


def _nrs(apply_fn, tx, config):
  """NRS through make_nrs_loss (default) or the optax transform. Token-level labels ``[B, T]``:
  the penalty averages over the valid (non-PAD) positions, through ``where_fn`` / the
  transform's ``where``."""
  opts = _nrs_options(config)
  task = task_loss(config)
  if config.nrs.get("implementation", "loss") == "transform":
    m = opts.get("neighbor_batch_size")
    reuse = opts.get("reuse_center_logits", False)

    def step(params, bs, opt_state, batch, key):
      (loss, (logits, new_bs)), g = _grad_at(apply_fn, params, bs, batch, key, task)
      # The library's sub-batch (make_nrs_loss's neighbor_batch_size) of the batch and logits.
      pen, centre = (batch, logits) if m is None else nrs_jax.strided_subset((batch, logits), m)
      extra = {"logits_fn": lambda p: apply_fn(p, bs, pen["x"], True, key)[0]}
      if is_token_level(batch["y"]):
        extra["where"] = valid_tokens(pen["y"])
      if opts.get("stop_gradient_center", False) and (m is None or reuse):
        extra["center_logits"] = centre  # a fixed target: share the task pass
      params, opt_state = _finish(tx, params, opt_state, g, extra)
      return params, new_bs, opt_state, {"loss": loss, "accuracy": _accuracy(logits, batch["y"])}

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
    params, opt_state = _finish(tx, params, opt_state, g)
    metrics = {
      "loss": aux["task_loss"],
      "accuracy": _accuracy(aux["logits"], batch["y"]),
      "nrs_penalty": aux["nrs_penalty"],
    }
    return params, aux["model_aux"], opt_state, metrics

  return step


def _ascent_step(apply_fn, tx, perturb, task=cross_entropy):
  """Two-pass SAM-style step: gradient at w + e(w, g), BN statistics from the centre."""

  def step(params, bs, opt_state, batch, key):
    (loss, (logits, new_bs)), g = _grad_at(apply_fn, params, bs, batch, key, task)
    e = perturb(params, g)
    shifted = jax.tree_util.tree_map(lambda p, d: p + d, params, e)
    _, g2 = _grad_at(apply_fn, shifted, bs, batch, key, task)
    params, opt_state = _finish(tx, params, opt_state, g2)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": _accuracy(logits, batch["y"])}

  return step


def _sam(apply_fn, tx, config):
  """SAM (Foret et al., 2021): e = rho * g / ||g||."""
  rho = config.sam.rho

  def perturb(params, g):
    n = optax.tree_utils.tree_norm(g)
    return jax.tree_util.tree_map(lambda x: rho * x / jnp.maximum(n, 1e-12), g)

  return _ascent_step(apply_fn, tx, perturb, task_loss(config))


def _asam(apply_fn, tx, config):
  """Adaptive SAM (Kwon et al., 2021): e = rho * T^2 g / ||T g||, T = |w| + eta."""
  rho, eta = config.asam.rho, config.asam.eta

  def perturb(params, g):
    t = jax.tree_util.tree_map(lambda w: jnp.abs(w) + eta, params)
    tg = jax.tree_util.tree_map(jnp.multiply, t, g)
    n = optax.tree_utils.tree_norm(tg)
    return jax.tree_util.tree_map(lambda ti, x: rho * ti * x / jnp.maximum(n, 1e-12), t, tg)

  return _ascent_step(apply_fn, tx, perturb, task_loss(config))


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
    (loss, (logits, new_bs)), g = _grad_at(apply_fn, params, bs, batch, dkey, task)
    perts = nrs_jax.sample_perturbations(params, pkey, num_neighbors=1, **opts)
    shifted = jax.tree_util.tree_map(lambda p, d: p + d[0], params, perts.as_tree(params))
    _, g2 = _grad_at(apply_fn, shifted, bs, batch, dkey, task)
    g = jax.tree_util.tree_map(lambda a, b: (1 - mix) * a + mix * b, g, g2)
    params, opt_state = _finish(tx, params, opt_state, g)
    return params, new_bs, opt_state, {"loss": loss, "accuracy": _accuracy(logits, batch["y"])}

  return step


def method_defaults() -> dict[str, Any]:
  """Per-method hyperparameters: one sub-dict per method in every config."""
  # Each two-pass method also takes `probability` (default 1): see step_probability.
  return {
    "nrs": dict(
      alpha=1.0, radius=0.05, num_neighbors=1, noise="gaussian", scale="absolute", probability=1.0
    ),
    "sam": dict(rho=0.2, probability=1.0),
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
    "pi_model": dict(noise=0.1, weight=1.0),
  }
