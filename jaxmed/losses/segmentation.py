"""Segmentation losses: soft Dice and (binary / softmax) cross-entropy, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr


def soft_dice_loss(probs, target, *, smooth=_SMOOTH, batch_dice=False):
  """``1 - (2 tp + s) / (2 tp + fp + fn + s)`` per item and channel, averaged (MONAI DiceLoss).

  Args:
    probs: ``(N, *spatial, C)`` probabilities.
    target: ``(N, *spatial, C)`` {0, 1} targets.
    batch_dice: pool the batch before the ratio (nnU-Net's batch Dice) instead of per item.
  """
  probs = probs.astype(jnp.float32)
  target = target.astype(jnp.float32)
  axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
  tp = jnp.sum(probs * target, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
  return jnp.mean(1.0 - (2.0 * tp + smooth) / (denom + smooth))


def sigmoid_dice_ce_loss(logits, target, *, dice_weight=1.0, ce_weight=1.0, batch_dice=True):
  """Region-based loss for overlapping regions (BraTS WT/TC/ET): soft Dice + binary CE.

  Args:
    logits: ``(N, *spatial, R)``; target: ``(N, *spatial, R)`` bool or {0, 1}.
    batch_dice: pool the Dice over the batch (nnU-Net's default for 2D): with per-slice Dice,
      the many slices where a small region is absent drive its channel to zero.
  """
  logits = logits.astype(jnp.float32)
  target = target.astype(jnp.float32)
  ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  dice = soft_dice_loss(jax.nn.sigmoid(logits), target, batch_dice=batch_dice)
  return dice_weight * dice + ce_weight * ce


def softmax_dice_ce_loss(logits, labels, *, dice_weight=1.0, ce_weight=1.0, batch_dice=False):
  """Loss for mutually exclusive classes (organs, tissues): soft Dice of the softmax against
  the one-hot labels + cross-entropy, as MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``
  with its defaults (Dice over every class including the background, per item, smooth 1e-5;
  mean cross-entropy over voxels).

  Args:
    logits: ``(N, *spatial, K)`` class scores (K includes the background class 0).
    labels: ``(N, *spatial)`` integer labels in [0, K).
    batch_dice: pool the Dice over the batch (MONAI ``batch=True``) instead of per item.
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} must be logits {logits.shape} without the class "
                     f"axis")
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
  dice = soft_dice_loss(jax.nn.softmax(logits, axis=-1), onehot, batch_dice=batch_dice)
  return dice_weight * dice + ce_weight * ce
