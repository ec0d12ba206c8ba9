"""Segmentation losses: soft Dice and (binary / softmax) cross-entropy, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmed.losses import _checks

_SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr


def soft_dice_loss(probs, target, *, smooth=_SMOOTH, batch_dice=False):
  """``1 - (2 tp + s) / (2 tp + fp + fn + s)`` per item and channel, averaged (MONAI DiceLoss).

  Args:
    probs: ``(N, *spatial, C)`` probabilities in ``[0, 1]`` (a sigmoid or softmax output).
    target: ``(N, *spatial, C)`` targets in ``[0, 1]``: bool or {0, 1}, or soft targets (mixup).
    smooth: ``s``, a finite float ``>= 0``.
    batch_dice: pool the batch before the ratio (nnU-Net's batch Dice) instead of per item.

  Raises:
    ValueError: (before tracing) shapes that differ or rank below 2, a negative or non-finite
      ``smooth``; for concrete input also ``probs`` or ``target`` outside ``[0, 1]`` or NaN
      (e.g. logits passed as probabilities, or labels 0..K-1 instead of one channel per class).
  """
  fn = "soft_dice_loss"
  _check_region_pair(fn, "probs", probs, target)
  smooth = _checks.number(fn, "smooth", smooth)
  _checks.in_range(fn, "probs", probs, 0.0, 1.0, "probabilities in [0, 1] (apply the sigmoid "
                   "or softmax to logits first)")
  return _soft_dice(probs, target, smooth, batch_dice)


def _check_region_pair(fn: str, name: str, x, target) -> None:
  """``x`` and ``target`` of one shape ``(N, *spatial, C)``, real; a concrete ``target`` in
  ``[0, 1]``."""
  if np.ndim(x) < 2:
    raise ValueError(f"{fn}: {name} must be (N, *spatial, C); got shape {np.shape(x)}")
  _checks.same_shape(fn, name, x, "target", target)
  _checks.real(fn, name, x)
  _checks.real(fn, "target", target)
  _checks.in_range(fn, "target", target, 0.0, 1.0, "in [0, 1] (bool, 0/1 or soft targets; one "
                   "channel per region, not class labels)")


def _soft_dice(probs, target, smooth, batch_dice):
  probs = probs.astype(jnp.float32)
  target = target.astype(jnp.float32)
  axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
  tp = jnp.sum(probs * target, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
  return jnp.mean(1.0 - (2.0 * tp + smooth) / (denom + smooth))


def sigmoid_dice_ce_loss(logits, target, *, dice_weight=1.0, ce_weight=1.0, batch_dice=True):
  """Region-based loss for overlapping regions (BraTS WT/TC/ET): soft Dice + binary CE.

  Args:
    logits: ``(N, *spatial, R)`` region scores (before the sigmoid).
    target: ``(N, *spatial, R)`` in ``[0, 1]``: bool or {0, 1}, or soft targets (mixup).
    dice_weight, ce_weight: finite floats ``>= 0``.
    batch_dice: pool the Dice over the batch (nnU-Net's default for 2D): with per-slice Dice,
      the many slices where a small region is absent drive its channel to zero.

  Raises:
    ValueError: (before tracing) shapes that differ or rank below 2, complex input, a negative
      or non-finite weight; for concrete input also a ``target`` outside ``[0, 1]`` or NaN.
  """
  fn = "sigmoid_dice_ce_loss"
  _check_region_pair(fn, "logits", logits, target)
  dice_weight, ce_weight = _loss_weights(fn, dice_weight, ce_weight)
  logits = logits.astype(jnp.float32)
  target = target.astype(jnp.float32)
  ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))
  dice = _soft_dice(jax.nn.sigmoid(logits), target, _SMOOTH, batch_dice)
  return dice_weight * dice + ce_weight * ce


def _loss_weights(fn: str, dice_weight, ce_weight) -> tuple[float, float]:
  return _checks.number(fn, "dice_weight", dice_weight), _checks.number(fn, "ce_weight", ce_weight)


def softmax_dice_ce_loss(logits, labels, *, dice_weight=1.0, ce_weight=1.0, batch_dice=False):
  """Loss for mutually exclusive classes (organs, tissues): soft Dice of the softmax against
  the one-hot labels + cross-entropy, as MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``
  with its defaults (Dice over every class including the background, per item, smooth 1e-5;
  mean cross-entropy over voxels).

  Args:
    logits: ``(N, *spatial, K)`` class scores (K includes the background class 0).
    labels: ``(N, *spatial)`` integer labels in [0, K).
    dice_weight, ce_weight: finite floats ``>= 0``.
    batch_dice: pool the Dice over the batch (MONAI ``batch=True``) instead of per item.

  Raises:
    ValueError: (before tracing) ``labels`` not of shape ``logits.shape[:-1]`` or not of an
      integer dtype (a float or bool map would one-hot to wrong or empty rows), complex
      ``logits``, a negative or non-finite weight; for concrete ``labels`` also values outside
      ``[0, K)`` (they would one-hot to an all-zero row and count as no class).
  """
  fn = "softmax_dice_ce_loss"
  if np.ndim(logits) < 2 or np.shape(labels) != np.shape(logits)[:-1]:
    raise ValueError(f"{fn}: labels shape {np.shape(labels)} must be logits shape "
                     f"{np.shape(logits)} without the class axis")
  _checks.real(fn, "logits", logits)
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{fn}: labels must be an integer label map; got dtype "
                     f"{jnp.result_type(labels)}")
  num_classes = np.shape(logits)[-1]
  _checks.in_range(fn, "labels", labels, 0, num_classes - 1,
                   f"class labels in [0, K={num_classes}) (K = logits.shape[-1])")
  dice_weight, ce_weight = _loss_weights(fn, dice_weight, ce_weight)
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  ce = jnp.mean(optax.softmax_cross_entropy(logits, onehot))
  dice = _soft_dice(jax.nn.softmax(logits, axis=-1), onehot, _SMOOTH, batch_dice)
  return dice_weight * dice + ce_weight * ce
