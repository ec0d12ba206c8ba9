"""Binary and multi-class classification metrics (jit-compiled; importable with nothing heavier
than jax).

All functions reduce over the last axis ``(..., n) -> (...)`` and treat leading axes as a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.metrics import _checks
from jaxmed.metrics.statistics import count_below, sortable_keys


def roc_auc(scores, labels):
  """Area under the ROC curve, equal to scikit-learn's binary ``roc_auc_score``.

  Computed as the Mann-Whitney statistic ``U / (P N)``: the fraction of (positive, negative)
  pairs in which the positive scores higher, a tied pair counting 1/2 (sklearn's trapezoidal
  ROC treats ties the same way). One sort of the negatives and a binary search per positive:
  O(n log n), not O(n^2).
  Scores are compared at the precision of the jax array (float32 for float input by default),
  so float64 scores that differ only beyond float32 precision tie.

  Args:
    scores: ``(..., n)`` numeric scores, higher meaning more likely positive.
    labels: ``(..., n)`` binary labels (bool or {0, 1}), same shape. Leading axes are a batch.

  Returns:
    ``(...)`` float32 in ``[0, 1]``. NaN where a row holds only one class (or is empty); sklearn
    raises there.

  Raises:
    ValueError: shape mismatch, a 0-d input, non-numeric or complex input, NaN/Inf in concrete
      ``scores``, or concrete ``labels`` other than 0/1 (e.g. probabilities).
  """
  scores, labels = _checks.vectors("roc_auc", "scores", scores, "labels", labels)
  _checks.finite("roc_auc", "scores", scores)
  _checks.binary("roc_auc", "labels", labels)
  return _roc_auc(scores, labels)


def sensitivity_specificity(pred, labels):
  """Sensitivity ``TP / (TP + FN)`` and specificity ``TN / (TN + FP)`` of binary predictions.

  Equal to scikit-learn's ``recall_score`` with ``pos_label=1`` and ``pos_label=0``, except that
  a row without positives (sensitivity) or without negatives (specificity) gives NaN where
  sklearn returns 0 with a warning (``zero_division="warn"``).

  Args:
    pred: ``(..., n)`` binary predictions (bool or {0, 1}).
    labels: ``(..., n)`` binary ground truth, same shape. Leading axes are a batch.

  Returns:
    ``(sensitivity, specificity)``, each ``(...)`` float32.

  Raises:
    ValueError: shape mismatch, a 0-d input, non-numeric or complex input, or concrete values
      other than 0/1 (e.g. probabilities: threshold them first).
  """
  pred, labels = _checks.vectors("sensitivity_specificity", "pred", pred, "labels", labels)
  _checks.binary("sensitivity_specificity", "pred", pred)
  _checks.binary("sensitivity_specificity", "labels", labels)
  return _sensitivity_specificity(pred, labels)


def accuracy(pred, labels):
  """Fraction of entries where ``pred == labels``, like scikit-learn's ``accuracy_score``.

  Args:
    pred: ``(..., n)`` predicted class labels, integer or bool.
    labels: ``(..., n)`` true class labels, integer or bool, same shape. Leading axes are a batch.

  Returns:
    ``(...)`` float32 in ``[0, 1]``; NaN for an empty last axis.

  Raises:
    ValueError: shape mismatch, a 0-d input, or a floating-point (or other non-integer) dtype;
      compare class labels, not probabilities.
  """
  pred, labels = _checks.vectors("accuracy", "pred", pred, "labels", labels)
  for name, x in (("pred", pred), ("labels", labels)):
    if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
      raise ValueError(f"accuracy: {name} must hold integer or bool class labels; got dtype "
                       f"{x.dtype}")
  return _accuracy(pred, labels)


@jax.jit
def _roc_auc(scores, labels):
  labels = labels.astype(bool)
  keys = sortable_keys(scores)
  # Negatives sorted first; positives get a key above every finite score and sort after them.
  negatives = jnp.sort(jnp.where(labels, jnp.iinfo(jnp.int32).max, keys), axis=-1)
  n_pos = jnp.sum(labels, axis=-1, dtype=jnp.int32)
  n_neg = scores.shape[-1] - n_pos
  below, at_most = (jnp.minimum(c, n_neg[..., None]) for c in count_below(negatives, keys))
  # below: negatives scoring lower; at_most: lower or tied
  # U / (P N): per positive, the fraction of negatives it beats (ties 1/2), averaged.
  denominator = jnp.maximum(2 * n_neg, 1).astype(jnp.float32)[..., None]
  wins = jnp.where(labels, (below + at_most).astype(jnp.float32) / denominator, 0.0)
  auc = jnp.sum(wins, axis=-1) / jnp.maximum(n_pos, 1).astype(jnp.float32)
  return jnp.where((n_pos > 0) & (n_neg > 0), auc, jnp.nan)


@jax.jit
def _sensitivity_specificity(pred, labels):
  pred, labels = pred.astype(bool), labels.astype(bool)
  count = lambda m: jnp.sum(m, axis=-1, dtype=jnp.int32).astype(jnp.float32)
  tp, fn = count(pred & labels), count(~pred & labels)
  tn, fp = count(~pred & ~labels), count(pred & ~labels)
  ratio = lambda a, b: jnp.where(a + b > 0, a / (a + b), jnp.nan)
  return ratio(tp, fn), ratio(tn, fp)


@jax.jit
def _accuracy(pred, labels):
  equal = jnp.sum(pred == labels, axis=-1, dtype=jnp.int32)
  return equal.astype(jnp.float32) / pred.shape[-1]
