"""Reconstruction losses (float32 reductions)."""

from __future__ import annotations

import jax.numpy as jnp


def _weighted_mean(x, weights):
  if weights is None:
    return jnp.mean(x)
  weights = jnp.broadcast_to(weights, x.shape).astype(jnp.float32)
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def l1_loss(pred, target, weights=None):
  """Mean absolute error, optionally weighted (e.g. by a mask broadcastable to ``pred``)."""
  return _weighted_mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)), weights)


def l2_loss(pred, target, weights=None):
  """Mean squared error, optionally weighted."""
  return _weighted_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), weights)


def l1_l2_loss(pred, target, weights=None):
  """L1 + L2 reconstruction loss, Eq. 4 of source_identification."""
  return l1_loss(pred, target, weights) + l2_loss(pred, target, weights)
