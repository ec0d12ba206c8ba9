"""Scores for studies that compare a perceptual distance with human judgements (jit-compiled;
importable with nothing heavier than jax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.metrics import _checks


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
  d0 = _checks.as_array(fn, "d0", d0)
  d1 = _checks.as_array(fn, "d1", d1)
  judge = _checks.as_array(fn, "judge", judge)
  _checks.same_shape(fn, "d0", d0, "d1", d1)
  _checks.same_shape(fn, "d0", d0, "judge", judge)
  if d0.ndim < 1:
    raise ValueError(f"{fn}: d0 must be (..., n) with at least 1 axis; got shape {d0.shape}")
  for name, x in (("d0", d0), ("d1", d1), ("judge", judge)):
    _checks.finite(fn, name, x)
  if not _checks.is_traced(judge) and not bool(jnp.all((judge >= 0) & (judge <= 1))):
    raise ValueError(f"{fn}: judge must lie in [0, 1] (fraction of humans preferring d1's "
                     f"distortion); got range [{float(jnp.min(judge))}, {float(jnp.max(judge))}]")
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
  if not _checks.is_traced(d) and not bool(jnp.all(d >= 0)):
    raise ValueError(f"max_normalize: d must be non-negative distances; got minimum "
                     f"{float(jnp.min(d))} in shape {d.shape} {d.dtype}")
  return _max_normalize(d)


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
