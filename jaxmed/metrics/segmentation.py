"""Segmentation overlap metrics (jit-compiled; importable with nothing heavier than jax)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.metrics import _checks
from jaxmed.metrics._count import count_true


def dice(pred, target, *, num_classes=None, include_background=True, empty=float("nan")):
  """Dice coefficient ``2 |P & T| / (|P| + |T|)`` per batch item and class.

  Args:
    pred, target: either label maps ``(N, *spatial)`` of integers in ``[0, num_classes)`` (give
      ``num_classes``), or binary masks ``(N, *spatial, C)`` (bool or {0, 1}; one channel per
      class or region; channels may overlap, e.g. BraTS WT/TC/ET).
    num_classes: number of classes of label-map input; None for binary channel input.
    include_background: keep class / channel 0.
    empty: value where both ``pred`` and ``target`` of a class are empty (the ratio is 0/0).
      With ``nan`` (default) such cases drop out of a ``nanmean``, like MONAI's
      ``ignore_empty=True``; note MONAI also returns nan when only the target is empty, where we
      return 0 (a false positive on an empty target is an error, not a missing value).

  Returns:
    ``(N, C)`` float32 (``C - 1`` columns without background).

  Raises:
    ValueError: (before tracing) shape mismatch, rank below 2, an empty batch (an axis of size
      0), label values given without ``num_classes`` of the right form; for concrete input also
      binary masks with values other than 0 and 1 (e.g. probabilities: threshold them first)
      and labels outside ``[0, num_classes)``. Inside a user's ``jit`` the value checks are
      skipped.
  """
  pred, target = _checks.as_array("dice", "pred", pred), _checks.as_array("dice", "target", target)
  pred_shape, target_shape = np.shape(pred), np.shape(target)
  if pred_shape != target_shape:
    raise ValueError(f"dice: pred shape {pred_shape} != target shape {target_shape}")
  _checks.nonempty("dice", "pred", pred)
  if num_classes is None:
    if len(pred_shape) < 3:
      raise ValueError("dice: binary input must be (N, *spatial, C); got shape "
                       f"{pred_shape} (pass num_classes for label maps)")
    for name, x in (("pred", pred), ("target", target)):
      _checks.binary("dice", name, x)  # e.g. probabilities: threshold them first
  else:
    if int(num_classes) < 1:
      raise ValueError(f"dice: num_classes must be >= 1; got {num_classes}")
    if len(pred_shape) < 2:
      raise ValueError(f"dice: label maps must be (N, *spatial); got shape {pred_shape}")
    for name, x in (("pred", pred), ("target", target)):
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"dice: {name} must be an integer label map when num_classes is given; "
                         f"got dtype {x.dtype}")
      _checks.labels_below("dice", name, x, num_classes)
  return _dice(jnp.asarray(pred), jnp.asarray(target), num_classes=num_classes,
               include_background=include_background, empty=float(empty))


@functools.partial(jax.jit, static_argnames=("num_classes", "include_background", "empty"))
def _dice(pred, target, *, num_classes, include_background, empty):
  if num_classes is not None:
    pred = jax.nn.one_hot(pred, num_classes, dtype=jnp.bool_)
    target = jax.nn.one_hot(target, num_classes, dtype=jnp.bool_)
  n, channels = pred.shape[0], pred.shape[-1]
  # (N, C, V): channels first, so each count runs over one contiguous row.
  pred, target = (jnp.moveaxis(x.astype(bool).reshape(n, -1, channels), -1, 1)
                  for x in (pred, target))
  inter = count_true(pred & target).astype(jnp.float32)
  total = (count_true(pred) + count_true(target)).astype(jnp.float32)
  value = jnp.where(total > 0, 2.0 * inter / jnp.where(total > 0, total, 1.0), empty)
  return value if include_background else value[:, 1:]
