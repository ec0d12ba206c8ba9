"""Poisson-disc context masks for SSFD context prediction (ssfd_feature_distance Sec. 2.2, 5.1).

SSFD pre-trains its UNet by in-painting zero-filled ``16 x 16`` patches that cover 25% of the
image, placed by Poisson-disc sampling so that they never overlap. Here the patches are placed by
dart throwing (random sequential addition): candidate top-left corners are drawn uniformly over
every position that keeps the square inside the image and accepted, in order, when their
Chebyshev distance to every accepted corner is at least ``patch`` (two axis-aligned
``patch x patch`` squares are disjoint exactly then), until ``K`` squares are placed.

Coverage bound. Random sequential addition of aligned squares jams: on an unbounded plane no
further square fits once about 56% of the area is covered (0.562, Brosilow, Ziff & Vigil, Phys.
Rev. A 43, 631 (1991)); images jam earlier because of their borders (measured with 16 x 16
patches: on average 8.0 squares = 50% at 64 x 64, as few as 4 = 25%; 54% at 128 x 128; 56.5% at
320 x 320), and the number of darts needed grows without bound near jamming. ``coverage`` is
therefore limited to ``(0, MAX_COVERAGE] = (0, 0.4]``. With the default ``32 K`` darts the
fraction of draws that come up short is, at coverage 0.45: 14% (64 x 64), 10% (80 x 112), 1.8%
(128 x 128); at 0.4: 2.7% (64 x 64, where K rounds to 6 = 37.5%), 0.45% (80 x 112), 0.02%
(128 x 128), 0 (320 x 320); at SSFD's 0.25: none in 10^5 draws at 64 x 64, 80 x 112 and
128 x 128, none in 10^4 at 320 x 320 (on average about 2 K darts are used). At 64 x 64, K = 4
cannot jam at all (three squares block at most three of the four corners of the 49 x 49 range
of top-left corners), so only running out of 128 darts could leave a slot empty.
``tests/pretext/test_context_mask.py`` re-measures the 0.25 rate.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator

import jax
import jax.numpy as jnp

MAX_COVERAGE = 0.4
# Darts thrown per requested square when ``num_candidates`` is not given.
CANDIDATES_PER_PATCH = 32


def _num_patches(image_shape, patch: int, coverage: float) -> int:
  """Validates the arguments and returns ``K = round(coverage * H * W / patch**2)``."""
  if len(image_shape) != 2:
    raise ValueError(f"image_shape must be (H, W); got {tuple(image_shape)}")
  h, w = (int(s) for s in image_shape)
  if isinstance(patch, bool) or not isinstance(patch, numbers.Integral):
    raise TypeError(f"patch must be an int; got {type(patch).__name__} {patch!r}")
  patch = operator.index(patch)
  if isinstance(coverage, bool) or not isinstance(coverage, numbers.Real):
    raise TypeError(f"coverage must be a float; got {type(coverage).__name__} {coverage!r}")
  if patch < 1:
    raise ValueError(f"patch must be >= 1; got patch={patch}")
  if patch > h or patch > w:
    raise ValueError(f"patch={patch} must fit in the image: patch <= H and W; "
                     f"got image shape (H, W) = ({h}, {w})")
  if not 0.0 < coverage <= MAX_COVERAGE:
    raise ValueError(
        f"coverage must be in (0, {MAX_COVERAGE}] (random sequential addition of squares jams "
        f"near 0.56 and earlier at image borders); got coverage={coverage}")
  k = int(math.floor(coverage * h * w / patch**2 + 0.5))
  if k < 1:
    raise ValueError(f"coverage={coverage} of a {h} x {w} image is less than half a "
                     f"{patch} x {patch} patch (K = round(coverage * H * W / patch**2) = 0)")
  return k


def _counts(image_shape, patch, coverage, num_candidates) -> tuple[int, int]:
  """Validated ``(K, number of darts)``."""
  k = _num_patches(image_shape, patch, coverage)
  m = CANDIDATES_PER_PATCH * k if num_candidates is None else num_candidates
  if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < k:
    raise ValueError(f"num_candidates must be an int >= K = {k}; got {num_candidates!r}")
  return k, int(m)


def _dart_throw(candidates: jax.Array, num_patches: int, patch: int):
  """Accepts ``candidates`` in order when their Chebyshev distance to all accepted ones >= patch.

  A `jax.lax.while_loop` over the static ``(M, 2)`` candidates that stops once K are accepted
  (at 25% coverage that is after about 2 K darts, so the default ``32 K`` bound is rarely
  reached); each step checks the candidate against all K slots at once.

  Args:
    candidates: ``(M, 2)`` int32 top-left corners, in the order they are tried.
    num_patches: K, the number of squares wanted; later candidates are ignored once K are in.
    patch: square side, the minimum Chebyshev distance between accepted corners.

  Returns:
    ``(corners (K, 2) int32, valid (K,) bool)``: accepted corners in acceptance order; slots
    left empty (fewer than K accepted) are ``valid = False`` with corner ``(0, 0)``.
  """
  candidates = candidates.astype(jnp.int32)
  m = candidates.shape[0]
  slots = jnp.arange(num_patches)

  def cond(carry):
    i, _, count = carry
    return (i < m) & (count < num_patches)

  def body(carry):
    i, corners, count = carry
    candidate = candidates[i]
    dist = jnp.max(jnp.abs(corners - candidate[None, :]), axis=-1)
    accept = ~jnp.any((slots < count) & (dist < patch))
    corners = jnp.where(accept & (slots == count)[:, None], candidate[None, :], corners)
    return i + 1, corners, count + accept.astype(jnp.int32)

  init = (jnp.int32(0), jnp.zeros((num_patches, 2), jnp.int32), jnp.int32(0))
  _, corners, count = jax.lax.while_loop(cond, body, init)
  return corners, slots < count


def poisson_disc_corners(key, image_shape, *, patch: int = 16, coverage: float = 0.25,
                         num_candidates: int | None = None):
  """Top-left corners of non-overlapping ``patch x patch`` squares by Poisson-disc sampling.

  Dart throwing (ssfd_feature_distance Sec. 2.2): ``num_candidates`` corners are drawn
  uniformly from ``[0, H - patch] x [0, W - patch]`` and accepted in order when their Chebyshev
  distance to every accepted corner is ``>= patch``, until ``K = round(coverage * H * W /
  patch**2)`` are accepted. Accepted corners are therefore a Poisson-disc sample (minimum
  Chebyshev distance ``patch``) and the squares are disjoint and inside the image. If the darts
  run out first, the remaining slots are invalid; at ``coverage = 0.25`` with the default
  ``32 K`` darts that was not seen in 10^5 draws at 64 x 64, 80 x 112 or 128 x 128, nor in
  10^4 at 320 x 320 (rates at higher coverage in the module docstring).

  Args:
    key: PRNG key.
    image_shape: ``(H, W)``.
    patch: square side in pixels, ``1 <= patch <= min(H, W)``.
    coverage: target fraction of the image covered, in ``(0, MAX_COVERAGE]``.
    num_candidates: darts thrown (static; default ``CANDIDATES_PER_PATCH * K``), ``>= K``.

  Returns:
    ``(corners, valid)``: ``(K, 2)`` int32 ``(row, col)`` top-left corners and ``(K,)`` bool.
  """
  k, m = _counts(image_shape, patch, coverage, num_candidates)
  return _corners(key, (int(image_shape[0]), int(image_shape[1])), int(patch), k, m)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _corners(key, image_shape, patch, k, m):
  h, w = image_shape
  high = jnp.array([h - patch + 1, w - patch + 1], jnp.int32)
  candidates = jax.random.randint(key, (m, 2), 0, high, dtype=jnp.int32)
  return _dart_throw(candidates, k, patch)


def _corners_to_mask(corners, valid, image_shape, patch: int):
  """``(K, 2)`` corners + ``(K,)`` valid -> ``(H, W)`` bool, True inside the valid squares."""
  h, w = image_shape
  rows = jnp.arange(h)[None, :] - corners[:, :1]          # (K, H)
  cols = jnp.arange(w)[None, :] - corners[:, 1:]          # (K, W)
  in_rows = ((rows >= 0) & (rows < patch) & valid[:, None]).astype(jnp.float32)
  in_cols = ((cols >= 0) & (cols < patch)).astype(jnp.float32)
  # Squares are disjoint, so the sum of their indicator outer products is 0 or 1 per pixel.
  counts = jnp.einsum("kh,kw->hw", in_rows, in_cols, precision=jax.lax.Precision.HIGHEST)
  return counts > 0.5


def context_mask(key, shape, *, patch: int = 16, coverage: float = 0.25,
                 num_candidates: int | None = None):
  """Per-image Poisson-disc patch masks (independent draws), True where the image is zero-filled.

  Args:
    key: PRNG key; image ``n`` uses ``jax.random.split(key, N)[n]``.
    shape: ``(N, H, W)``.
    patch, coverage, num_candidates: see `poisson_disc_corners`.

  Returns:
    ``(N, H, W)`` bool; ``K * patch**2`` pixels are True per image when all K squares were
    placed.
  """
  if len(shape) != 3:
    raise ValueError(f"shape must be (N, H, W); got {tuple(shape)}")
  n, h, w = (int(s) for s in shape)
  if n < 1:
    raise ValueError(f"shape must have N >= 1 images; got {tuple(shape)}")
  k, m = _counts((h, w), patch, coverage, num_candidates)
  return _masks(key, (n, h, w), int(patch), k, m)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _masks(key, shape, patch, k, m):
  n, h, w = shape

  def one(sub):
    corners, valid = _corners(sub, (h, w), patch, k, m)
    return _corners_to_mask(corners, valid, (h, w), patch)

  return jax.vmap(one)(jax.random.split(key, n))


def context_inpaint(key, images, *, patch: int = 16, coverage: float = 0.25, fill: float = 0.0,
                    num_candidates: int | None = None):
  """Fills Poisson-disc placed patches of each image with ``fill`` (SSFD context prediction).

  ssfd_feature_distance Sec. 2.2 / Fig. 4: zero-filled ``16 x 16`` patches over 25% of the
  image, the same squares in every channel of an image, independent between images.

  Args:
    key: PRNG key.
    images: ``(N, H, W, C)`` float.
    patch, coverage, num_candidates: see `poisson_disc_corners`.
    fill: value written into the patches (0 in SSFD).

  Returns:
    ``(corrupted, mask)``: ``(N, H, W, C)`` like ``images`` and ``(N, H, W)`` bool, True where
    filled.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"images must be floating point; got dtype {images.dtype}")
  mask = context_mask(key, images.shape[:3], patch=patch, coverage=coverage,
                      num_candidates=num_candidates)
  corrupted = jnp.where(mask[..., None], jnp.asarray(fill, images.dtype), images)
  return corrupted, mask
