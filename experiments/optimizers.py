"""The optimisers and optax plumbing every method composes with: the base optimiser (SGD with
momentum or AdamW, cosine schedule), the state holders of SAF and MESA, the NRS transform on
the transform path, and one update applied to params."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import nrs_jax

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
  slot ``e % epochs`` holding epoch ``e``'s logits until epoch ``e + epochs`` replaces them;
  ``stamps [epochs, num_train]`` (int32), ``e + 1`` where epoch ``e`` wrote the example's
  logits, 0 where none was written (an example an epoch's drop-last batching skipped)."""

  count: jax.Array
  outputs: jax.Array
  stamps: jax.Array


class TeacherState(NamedTuple):
  """MESA's teacher: ``count`` steps taken; ``ema`` = ``decay * ema + (1 - decay) * params``."""

  count: jax.Array
  ema: Any


class StepCount(NamedTuple):
  """The steps taken (the Pi-model's ramp-up reads it)."""

  count: jax.Array


class LookState(NamedTuple):
  """LookSAM's memory: ``gv``, the part of the last SAM gradient orthogonal to the task's."""

  gv: Any


def state_holder(init_fn) -> optax.GradientTransformation:
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
      outputs = jnp.zeros((e, num_train, c), jnp.float32)
      return SAFState(jnp.zeros([], jnp.int32), outputs, jnp.zeros((e, num_train), jnp.int32))

    return optax.chain(state_holder(saf_init), base)
  if config.method == "mesa":
    teacher = lambda params: TeacherState(
      jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.asarray, params)
    )
    return optax.chain(state_holder(teacher), base)
  if config.method == "pi_model":  # (its ramp-up reads the steps taken)
    return optax.chain(state_holder(lambda p: StepCount(jnp.zeros([], jnp.int32))), base)
  if config.method == "looksam":
    return optax.chain(state_holder(lambda p: LookState(jax.tree.map(jnp.zeros_like, p))), base)
  if config.method == "nrs" and config.nrs.get("implementation", "loss") == "transform":
    opts = nrs_options(config)
    for name in LOSS_ONLY:
      opts.pop(name, None)
    return optax.chain(nrs_jax.add_nrs_gradient(key=config.seed, **opts), base)
  return base


# make_nrs_loss options that the transform path implements in the step instead.
LOSS_ONLY = ("neighbor_batch_size", "reuse_center_logits")


def nrs_options(config) -> dict:
  opts = dict(config.nrs)
  for name in ("implementation", "probability", "refresh_every"):
    opts.pop(name, None)
  if opts.get("reuse", "") is None:
    del opts["reuse"]  # (the transform's default; make_nrs_loss has no reuse)
  return opts


def apply_update(tx, params, opt_state, grads, update_kwargs=None):
  updates, opt_state = tx.update(grads, opt_state, params, **(update_kwargs or {}))
  return optax.apply_updates(params, updates), opt_state
