"""Reconstruction losses (float32 reductions)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmed.losses import _checks

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check(fn: str, pred, target, weights) -> None:
  """Same-shape real ``pred`` and ``target``; ``weights`` real, broadcastable to ``pred`` and,
  when concrete, non-negative and finite (before tracing; see ``_checks``)."""
  _checks.same_shape(fn, "pred", pred, "target", target)
  _checks.real(fn, "pred", pred)
  _checks.real(fn, "target", target)
  if weights is None:
    return
  shape = np.shape(pred)
  try:
    fits = np.broadcast_shapes(np.shape(weights), shape) == shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(f"{fn}: weights shape {np.shape(weights)} must broadcast to pred shape "
                     f"{shape}")
  _checks.real(fn, "weights", weights)
  _checks.in_range(fn, "weights", weights, 0.0, _FLOAT32_MAX, "non-negative and finite")


def _weighted_mean(x, weights):
  if weights is None:
    return jnp.mean(x)
  weights = jnp.broadcast_to(weights, x.shape).astype(jnp.float32)
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _l1(pred, target, weights):
  return _weighted_mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), weights)


def _l2(pred, target, weights):
  return _weighted_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), weights)


def l1_loss(pred, target, weights=None):
  """Mean absolute error, optionally weighted.

  Args:
    pred, target: real arrays of the same shape.
    weights: None, or non-negative finite weights broadcastable to ``pred`` (e.g. a 0/1 mask
      ``(N, *spatial, 1)``); the weighted sum is divided by ``max(sum(weights), 1)``.

  Returns:
    float32 scalar.

  Raises:
    ValueError: (before tracing) shapes that differ, complex input, ``weights`` that do not
      broadcast to ``pred``; for concrete ``weights`` also negative, NaN or infinite values.
  """
  _check("l1_loss", pred, target, weights)
  return _l1(pred, target, weights)


def l2_loss(pred, target, weights=None):
  """Mean squared error, optionally weighted; arguments and errors as :func:`l1_loss`."""
  _check("l2_loss", pred, target, weights)
  return _l2(pred, target, weights)


def l1_l2_loss(pred, target, weights=None):
  """L1 + L2 reconstruction loss, Eq. 4 of source_identification; arguments and errors as
  :func:`l1_loss`."""
  _check("l1_l2_loss", pred, target, weights)
  return _l1(pred, target, weights) + _l2(pred, target, weights)
