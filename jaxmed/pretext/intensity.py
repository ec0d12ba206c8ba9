"""Non-linear intensity shift by a Bezier curve (source_identification Sec. 4.4, Eq. 11)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.pretext._grid import check_images, check_prob


def bezier_curve(v, points):
  """The cubic Bezier (Bernstein) polynomial ``B(v)`` of Eq. 11 of source_identification.

  ``B(v) = (1-v)^3 p0 + 3 v (1-v)^2 p1 + 3 v^2 (1-v) p2 + v^3 p3``. Eq. 11 as printed reads
  ``(1 - v^3) p0 + 3 v (1 - v^2) p1 + ...``, a typo: its weights do not sum to one (2.5 at
  v = 0.5), so it is not the Bezier curve of Zhou et al. (2019) that the text cites; this is.

  Args:
    v: values, any shape, usually in [0, 1].
    points: ``(..., 4)`` control values ``p0 .. p3``; ``points[..., k]`` broadcasts against
      ``v``.

  Returns:
    ``B(v)``, the broadcast shape of ``v`` and ``points[..., 0]``.
  """
  points = jnp.asarray(points)
  if points.ndim < 1 or points.shape[-1] != 4:
    raise ValueError(f"points must be (..., 4) (p0, p1, p2, p3); got shape {points.shape}")
  v = jnp.asarray(v)
  w = 1.0 - v
  p0, p1, p2, p3 = (points[..., k] for k in range(4))
  return w ** 3 * p0 + 3.0 * v * w ** 2 * p1 + 3.0 * v ** 2 * w * p2 + v ** 3 * p3


def bezier_intensity(key, images, *, invert_prob=0.0):
  """Map the intensities of each image through a random monotone Bezier curve.

  Eq. 11 of source_identification, with the end points fixed as in Models Genesis (Zhou et al.
  2019): per image ``p0 = 0, p3 = 1`` and ``p1, p2 ~ U[0, 1]`` (the paper also samples p0 and
  p3, which can make B non-monotone, contrary to its text); with probability ``invert_prob``
  the end points swap (``p0 = 1, p3 = 0``), a decreasing curve as Models Genesis' inversion.
  Each channel of each image is min-max normalised to [0, 1], mapped through ``B`` and scaled
  back to its own ``[min, max]``; a constant channel is returned unchanged.

  Args:
    key: PRNG key.
    images: ``(N, *spatial, C)`` float.
    invert_prob: probability that an image's curve is decreasing.

  Returns:
    ``(corrupted, points)``: corrupted ``(N, *spatial, C)`` (same dtype, within each channel's
    original range) and the float32 control values ``(N, 4)``.
  """
  # Monotonicity. With a = p1 - p0, b = p2 - p1, c = p3 - p2,
  #   B'(v) = 3 [a (1-v)^2 + 2 b v (1-v) + c v^2].
  # For p0 = 0, p3 = 1: a = p1 >= 0, c = 1 - p2 >= 0. If b >= 0 every term is >= 0. If b < 0
  # (p2 < p1): 0 < p1 - p2 <= p1 and p1 - p2 <= 1 - p2, so b^2 <= a c, and with x = 1-v,
  # y = v >= 0: a x^2 + 2 b x y + c y^2 >= a x^2 - 2 sqrt(ac) x y + c y^2
  # = (sqrt(a) x - sqrt(c) y)^2 >= 0. So B is non-decreasing on [0, 1], from B(0) = 0 to
  # B(1) = 1, hence B([0, 1]) = [0, 1]. Inverted (p0 = 1, p3 = 0): B(v) = 1 - B~(v) where B~
  # has the control values (0, 1 - p1, 1 - p2, 1), again of the form above: non-increasing.
  check_images(images, floating=True)
  invert_prob = check_prob("invert_prob", invert_prob)
  n = images.shape[0]
  control_key, invert_key = jax.random.split(key)
  p1, p2 = jnp.moveaxis(jax.random.uniform(control_key, (n, 2)), -1, 0)
  p0 = jax.random.bernoulli(invert_key, invert_prob, (n,)).astype(jnp.float32)
  points = jnp.stack([p0, p1, p2, 1.0 - p0], axis=-1)

  x = images.astype(jnp.float32)
  spatial_axes = tuple(range(1, images.ndim - 1))
  lo = jnp.min(x, axis=spatial_axes, keepdims=True)                     # (N, 1.., C)
  hi = jnp.max(x, axis=spatial_axes, keepdims=True)
  span = hi - lo
  varies = span > 0
  v = jnp.where(varies, (x - lo) / jnp.where(varies, span, 1.0), 0.0)
  curve = bezier_curve(v, points.reshape((n,) + (1,) * (images.ndim - 1) + (4,)))
  out = jnp.where(varies, jnp.clip(lo + curve * span, lo, hi), x)
  return out.astype(images.dtype), points
