"""Statistics for evaluation studies: correlation, representation similarity (CKA) and agreement
with human judgements (2AFC, max-normalisation); jit-compiled, importable with nothing heavier
than jax.

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


def two_afc_score(d0, d1, judge):
  """Two-alternative forced choice (2AFC) agreement of a distance with human judgements.

  The LPIPS / BAPPS convention (Zhang et al., 2018; ``score_2afc_dataset`` in
  richzhang/PerceptualSimilarity): for a triplet (reference, distortion p0, distortion p1) with
  model distances ``d0 = d(ref, p0)``, ``d1 = d(ref, p1)`` and ``judge`` the fraction of humans who
  preferred p1 (found it closer to the reference),
  ``score = (d0 < d1) (1 - judge) + (d1 < d0) judge + (d0 == d1) / 2``: the fraction of humans the
  distance agrees with, a tie counting 1/2. Swapping the distortions gives the same score:
  ``two_afc_score(d0, d1, judge) == two_afc_score(d1, d0, 1 - judge)``.

  Args:
    d0: ``(..., n)`` distances from the reference to the first distortion, for ``n`` triplets.
    d1: ``(..., n)`` distances to the second distortion, same shape.
    judge: ``(..., n)`` fraction of humans preferring the second distortion, in ``[0, 1]``.
      Leading axes are a batch.

  Returns:
    ``(...)`` float32 in ``[0, 1]``: the mean score over the ``n`` triplets (NaN if ``n == 0``).

  Raises:
    ValueError: shape mismatch, a 0-d input, non-numeric input, NaN/Inf in a concrete input, or
      a concrete ``judge`` outside ``[0, 1]``.
  """
  fn = "two_afc_score"
  d0, d1 = _checks.vectors(fn, "d0", d0, "d1", d1)
  judge = _checks.as_array(fn, "judge", judge)
  _checks.same_shape(fn, "d0", d0, "judge", judge)
  for name, x in (("d0", d0), ("d1", d1), ("judge", judge)):
    _checks.finite(fn, name, x)
  if not _checks.is_traced(judge):
    values = np.asarray(judge)
    if not np.all((values >= 0) & (values <= 1)):
      raise ValueError(f"{fn}: judge must lie in [0, 1] (fraction of humans preferring d1's "
                       f"distortion); got range [{values.min()}, {values.max()}]")
  return _two_afc_score(d0, d1, judge)


def max_normalize(d):
  """Divide distances by their maximum over the last axis: ``d_i / max_j d_j``.

  The normalization of the CoPer paper (Sec. "Normalization"); it puts the distances of metrics
  with different scales on a common ``[0, 1]`` range. A row that is all zero stays all zero.

  Args:
    d: ``(..., n)`` non-negative distances; leading axes are a batch.

  Returns:
    ``(..., n)`` float32 in ``[0, 1]``, each row's largest entry 1 (unless the row is all zero).

  Raises:
    ValueError: a 0-d input, non-numeric input, or NaN/Inf or negative values in a concrete ``d``.
  """
  d = _checks.as_array("max_normalize", "d", d)
  if d.ndim < 1:
    raise ValueError(f"max_normalize: d must be (..., n) with at least 1 axis; got shape {d.shape}")
  _checks.finite("max_normalize", "d", d)
  if not _checks.is_traced(d) and np.asarray(d).min(initial=0) < 0:
    raise ValueError(f"max_normalize: d must be non-negative distances; got minimum "
                     f"{np.asarray(d).min()} in shape {d.shape} {d.dtype}")
  return _max_normalize(d)


def _validate(fn: str, x, y):
  x, y = _checks.vectors(fn, "x", x, "y", y)
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
  less, at_most = count_below(jnp.sort(keys, axis=-1), keys)
  return (less + at_most + 1).astype(jnp.float32) / 2


def count_below(ordered, keys):
  """Per key, ``#{ordered < key}`` and ``#{ordered <= key}`` by binary search; traceable.

  ordered: (..., m) ascending; keys: (..., n) with the same leading axes.  Returns two
  (..., n) int32 arrays.
  """
  search = lambda side: jnp.vectorize(functools.partial(jnp.searchsorted, side=side),
                                      signature="(m),(n)->(n)")(ordered, keys)
  return search("left"), search("right")


def sortable_keys(x):
  """int32 keys with the order of ``x`` (float32 bit patterns, negatives flipped); traceable."""
  if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
    return x.astype(jnp.int32)
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 ties +0.0
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


@jax.jit
def _two_afc_score(d0, d1, judge):
  judge = judge.astype(jnp.float32)
  score = (d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5
  return jnp.mean(score, axis=-1)


@jax.jit
def _max_normalize(d):
  d = d.astype(jnp.float32)
  peak = jnp.max(d, axis=-1, keepdims=True, initial=0.0)
  return jnp.where(peak > 0, d / jnp.where(peak > 0, peak, 1.0), 0.0)
