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
from experiments.optimizers import apply_update
from experiments.optimizers import nrs_options

# Consistency methods that also read an unlabeled batch, batch["u"] (config.labeled_fraction).
SEMI = ("nrs_unlabeled", "vat", "pi_model")


def make_semi_step(method: str, apply_fn, tx, config):
  """The step of ``method`` (one of ``SEMI``): the task loss plus its consistency term."""
  consistency = {"nrs_unlabeled": _nrs_unlabeled, "vat": _vat, "pi_model": _pi_model}[method]
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
    params, opt_state = apply_update(tx, params, opt_state, g)
    metrics = {"loss": ce, "accuracy": accuracy(logits, batch["y"]), "consistency": value}
    return params, new_bs, opt_state, metrics

  return step


def _nrs_unlabeled(apply_fn, config):
  """NRS's penalty over the labelled and unlabeled inputs, its centre the task pass."""
  opts = {k: v for k, v in nrs_options(config).items() if k not in LOSS_ONLY}
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
