"""Correlation and representation-similarity statistics (jit-compiled; importable with nothing
heavier than jax).

All functions reduce over the trailing axes and treat leading axes as a batch. They compute in
float32 and center before multiplying, so large offsets (e.g. ``1e3 + noise``) keep their accuracy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.metrics import _checks


def pearson(x, y):
  """Pearson correlation coefficient over the last axis, like ``scipy.stats.pearsonr``.

  Args:
    x, y: ``(..., n)`` numeric arrays of the same shape; leading axes are a batch.

  Returns:
    ``(...)`` float32 in ``[-1, 1]``. NaN where ``x`` or ``y`` is constant along the last axis
    (scipy also returns NaN, with a warning), which includes ``n <= 1`` (scipy raises there).

  Raises:
    ValueError: shape mismatch, a 0-d input, non-numeric input, or NaN/Inf in a concrete input.
  """
  x, y = _validate("pearson", x, y)
  return _pearson(x, y)


def spearman(x, y):
  """Spearman rank correlation over the last axis, like ``scipy.stats.spearmanr``.

  The Pearson correlation of the ranks; tied values share their average rank (scipy's
  ``rankdata(method="average")``). Ranking sorts each row once: O(n log n).

  Args:
    x, y: ``(..., n)`` numeric arrays of the same shape; leading axes are a batch.

  Returns:
    ``(...)`` float32 in ``[-1, 1]``. NaN where ``x`` or ``y`` is constant along the last axis
    (as in scipy), which includes ``n <= 1``.

  Raises:
    ValueError: shape mismatch, a 0-d input, non-numeric input, or NaN/Inf in a concrete input.
  """
  x, y = _validate("spearman", x, y)
  return _spearman(x, y)


def linear_cka(x, y):
  """Linear centered kernel alignment (Kornblith et al., 2019) between two representations.

  With ``X``, ``Y`` the column-centered features of the same ``n`` examples,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, which equals the HSIC form
  ``tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))`` with ``K = X X^T``, ``L = Y Y^T``. It is
  invariant to orthogonal transforms and isotropic scaling of either input, and ``CKA(x, x) = 1``.
  Cost O(n (p + q)^2) time and O((p + q)^2) memory per batch item (feature-space form).

  Args:
    x: ``(..., n, p)`` features of ``n`` examples.
    y: ``(..., n, q)`` features of the same examples; any width ``q``. Leading axes are a batch
      and must equal those of ``x``.

  Returns:
    ``(...)`` float32 in ``[0, 1]`` (up to float32 rounding). NaN where ``x`` or ``y`` is constant
    across examples (its centered features are all zero).

  Raises:
    ValueError: shapes that differ other than in the last axis, rank below 2, non-numeric input,
      or NaN/Inf in a concrete input.
  """
  x = _checks.as_array("linear_cka", "x", x)
  y = _checks.as_array("linear_cka", "y", y)
  if x.ndim < 2:
    raise ValueError(f"linear_cka: x must be (..., n, p) with at least 2 axes; got shape {x.shape}")
  if x.shape[:-1] != y.shape[:-1]:
    raise ValueError(f"linear_cka: x shape {x.shape} and y shape {y.shape} must agree except in "
                     "the last (feature) axis")
  _checks.finite("linear_cka", "x", x)
  _checks.finite("linear_cka", "y", y)
  return _linear_cka(x, y)


def _validate(fn: str, x, y):
  x = _checks.as_array(fn, "x", x)
  y = _checks.as_array(fn, "y", y)
  _checks.same_shape(fn, "x", x, "y", y)
  if x.ndim < 1:
    raise ValueError(f"{fn}: x must be (..., n) with at least 1 axis; got shape {x.shape}")
  _checks.finite(fn, "x", x)
  _checks.finite(fn, "y", y)
  return x, y


@jax.jit
def _pearson(x, y):
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  xc = x - jnp.mean(x, axis=-1, keepdims=True)
  yc = y - jnp.mean(y, axis=-1, keepdims=True)
  r = jnp.sum(xc * yc, axis=-1) / (jnp.sqrt(jnp.sum(xc * xc, axis=-1)) *
                                   jnp.sqrt(jnp.sum(yc * yc, axis=-1)))
  constant = jnp.all(x == x[..., :1], axis=-1) | jnp.all(y == y[..., :1], axis=-1)
  return jnp.where(constant, jnp.nan, jnp.clip(r, -1.0, 1.0))


@jax.jit
def _spearman(x, y):
  return _pearson(_average_ranks(x), _average_ranks(y))


@jax.jit
def _linear_cka(x, y):
  def unit_centered(z):
    z = z.astype(jnp.float32)
    z = z - jnp.mean(z, axis=-2, keepdims=True)
    # CKA is scale invariant; unit Frobenius norm keeps the fourth powers below in range.
    return z / jnp.sqrt(jnp.sum(z * z, axis=(-2, -1), keepdims=True))

  x, y = unit_centered(x), unit_centered(y)
  gram = lambda a, b: jnp.einsum("...na,...nb->...ab", a, b, precision=jax.lax.Precision.HIGHEST)
  frobenius_sq = lambda m: jnp.sum(m * m, axis=(-2, -1))
  return frobenius_sq(gram(y, x)) / (jnp.sqrt(frobenius_sq(gram(x, x))) *
                                     jnp.sqrt(frobenius_sq(gram(y, y))))


def _average_ranks(x):
  """1-based ranks along the last axis, ties sharing their average rank; traceable.

  ``(..., n) -> (..., n)`` float32, equal to ``scipy.stats.rankdata(x, method="average",
  axis=-1)``: ``rank = (#{< x_i} + #{<= x_i} + 1) / 2``, both counts by binary search in the
  sorted row. The sort is of order-preserving int32 keys alone, which XLA:CPU sorts ~8x faster
  than floats or (value, index) pairs (measured at 1e6: 53 vs 430 / 400 ms).
  """
  keys = sortable_keys(x)
  ordered = jnp.sort(keys, axis=-1)
  count = lambda side: jnp.vectorize(functools.partial(jnp.searchsorted, side=side),
                                     signature="(n),(n)->(n)")(ordered, keys)
  return (count("left") + count("right") + 1).astype(jnp.float32) / 2


def sortable_keys(x):
  """int32 keys with the order of ``x`` (float32 bit patterns, negatives flipped); traceable."""
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.int32)
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 ties +0.0
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
