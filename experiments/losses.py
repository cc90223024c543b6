"""The harness's losses and metrics: cross-entropy over examples or over the valid tokens of
``[B, T]`` labels (padding < 0), label smoothing, accuracy, and the tempered KL of SAF/MESA."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax

import nrs_jax


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


def accuracy(logits, labels):
  hit = jnp.argmax(logits, -1) == labels
  if not is_token_level(labels):
    return jnp.mean(hit)
  valid = valid_tokens(labels)
  return jnp.sum(hit & valid) / jnp.maximum(jnp.sum(valid), 1)


def soft_kl(teacher_logits, logits, tau, where=None):
  """Mean of KL(softmax(teacher / tau) || softmax(logits / tau)), teacher fixed.

  Over the batch, or over the positions where ``where`` is true.
  """
  kl = nrs_jax.kl(jax.lax.stop_gradient(teacher_logits) / tau, logits / tau)
  if where is None:
    return jnp.mean(kl)
  return jnp.sum(jnp.where(where, kl, 0.0)) / jnp.maximum(jnp.sum(where), 1)
