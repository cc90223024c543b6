"""The semi-supervised steps (``SEMI``): the task loss on the labelled rows plus a consistency
term over the labelled and unlabeled inputs together, ``batch["u"]`` (config.labeled_fraction):
NRS's penalty (``nrs_unlabeled``), VAT and the Pi-model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import nrs_jax
from experiments.losses import accuracy
from experiments.losses import task_loss
from experiments.optimizers import LOSS_ONLY
from experiments.optimizers import StepCount
from experiments.optimizers import apply_update
from experiments.optimizers import nrs_options

# Consistency methods that also read an unlabeled batch, batch["u"] (config.labeled_fraction).
SEMI = ("nrs_unlabeled", "vat", "pi_model", "vat_nrs")


def make_semi_step(method: str, apply_fn, tx, config, steps_per_epoch: int = 1):
  """The step of ``method`` (one of ``SEMI``): the task loss plus its consistency term."""
  if method == "pi_model":
    total = config.get("num_steps") or config.num_epochs * steps_per_epoch
    return _semi(apply_fn, tx, config, _pi_model(apply_fn, config, total), counted=True)
  consistency = {"nrs_unlabeled": _nrs_unlabeled, "vat": _vat, "vat_nrs": _vat_nrs}[method]
  return _semi(apply_fn, tx, config, consistency(apply_fn, config))


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


def _semi(apply_fn, tx, config, consistency, counted: bool = False):
  """loss = the task loss on the labelled rows + ``consistency(params, bs, inputs, key, count)
  -> (logits, new_bs, value)`` over the labelled and unlabeled inputs together (one batch, so
  BatchNorm statistics are the whole batch's). The labels of ``u`` do not exist here.
  ``counted``: ``opt_state[0]`` is a :class:`StepCount` (the Pi-model's ramp-up reads it)."""
  task = task_loss(config)

  def step(params, bs, opt_state, batch, key):
    xs, b = with_unlabeled(batch), jnp.shape(batch["x"])[0]
    count = opt_state[0].count if counted else None

    def loss_fn(p):
      logits, new_bs, value = consistency(p, bs, xs, key, count)
      ce = task(logits[:b], batch["y"])
      return ce + value, (ce, logits[:b], new_bs, value)

    (_, (ce, logits, new_bs, value)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params, opt_state = apply_update(tx, params, opt_state, g)
    if counted:
      opt_state = (StepCount(count + 1), *opt_state[1:])
    metrics = {"loss": ce, "accuracy": accuracy(logits, batch["y"]), "consistency": value}
    return params, new_bs, opt_state, metrics

  return step


def _nrs_unlabeled(apply_fn, config):
  """NRS's penalty over the labelled and unlabeled inputs, its centre the task pass."""
  opts = {k: v for k, v in nrs_options(config).items() if k not in LOSS_ONLY}
  alpha = opts.pop("alpha")

  def consistency(p, bs, xs, key, count=None):
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

  def consistency(p, bs, xs, key, count=None):
    dkey, nkey = jax.random.split(key)
    logits, new_bs = apply_fn(p, bs, xs, True, dkey)
    target = jax.lax.stop_gradient(logits)
    fixed = lambda x: apply_fn(jax.lax.stop_gradient(p), bs, x, True, dkey)[0]
    r_adv = vat_perturbation(fixed, xs, target, nkey, xi, eps)
    adv = apply_fn(p, bs, xs + r_adv, True, dkey)[0]
    return logits, new_bs, weight * jnp.mean(nrs_jax.kl(target, adv))

  return consistency


def _vat_nrs(apply_fn, config):
  """VAT plus NRS's penalty on the same labelled and unlabeled inputs (issue 51: does NRS add
  to VAT?): VAT's term as :func:`_vat` draws it, then ``alpha * nrs_penalty`` with the task
  pass as its centre and its own key (``config.vat`` and ``config.nrs``)."""
  vat = _vat(apply_fn, config)
  opts = {k: v for k, v in nrs_options(config).items() if k not in LOSS_ONLY}
  alpha = opts.pop("alpha")

  def consistency(p, bs, xs, key, count=None):
    logits, new_bs, value = vat(p, bs, xs, key)
    dkey, _ = jax.random.split(key)
    at = lambda q: apply_fn(q, bs, xs, True, dkey)[0]
    nkey = jax.random.fold_in(key, 1)
    pen = nrs_jax.nrs_penalty(at, p, nkey, center_logits=logits, **opts)
    return logits, new_bs, value + alpha * pen

  return consistency


def rampup(count, total_steps: int, fraction: float) -> jax.Array:
  """Laine and Aila's Gaussian ramp-up, ``exp(-5 (1 - T)^2)``, ``T = min(count / (fraction *
  total_steps), 1)``: from exp(-5) at step 0 to 1 once ``fraction`` of training has run."""
  length = max(fraction * total_steps, 1.0)
  t = jnp.minimum(jnp.asarray(count, jnp.float32) / length, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def _pi_model(apply_fn, config, total_steps: int):
  """The Pi-model (Laine and Aila, ICLR 2017): two independent stochastic passes (Gaussian
  input noise ``noise``, each its own dropout key), the task loss on the first, and ``w(t) *
  mean ||softmax(z1) - softmax(z2)||^2 / C``, gradients through both, ``w(t) = weight *``
  :func:`rampup` over the first ``rampup`` of training (the paper's 80 of 300 epochs)."""
  sigma, weight = config.pi_model.noise, config.pi_model.weight
  fraction = config.pi_model.get("rampup", 80 / 300)

  def consistency(p, bs, xs, key, count):
    k1, k2, d1, d2 = jax.random.split(key, 4)
    noisy = lambda k: xs + sigma * jax.random.normal(k, xs.shape, xs.dtype)
    z1, new_bs = apply_fn(p, bs, noisy(k1), True, d1)
    z2 = apply_fn(p, bs, noisy(k2), True, d2)[0]
    sq = jnp.mean(jnp.square(jax.nn.softmax(z1) - jax.nn.softmax(z2)))  # (1/C) sum, then mean
    return z1, new_bs, weight * rampup(count, total_steps, fraction) * sq

  return consistency
