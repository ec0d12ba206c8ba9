"""Grid in-painting (source_identification Sec. 4.1, Eq. 8)."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from jaxmed.pretext._grid import (cells_to_pixels, check_images, check_prob, grid_tuple,
                                  num_cells)


def grid_cell_mask(key, shape, *, grid, keep_prob):
  """Bernoulli keep-mask of grid cells, upsampled to pixels.

  Eq. 8 of source_identification: a cell ``g(I)`` is kept when ``B(gamma) = 1`` (probability
  ``keep_prob = gamma``) and zeroed otherwise, so a fraction ``1 - gamma`` of cells is masked.
  (The paper's following sentence says the image "retains 1 - gamma"; Eq. 8 is what we follow.)

  Args:
    key: PRNG key.
    shape: spatial batch shape ``(N, *spatial)``, positive ints.
    grid: cell size in pixels, an int or one per spatial axis; the last cell of an axis may be
      partial when the size is not divisible.
    keep_prob: gamma, the probability that a cell is kept.

  Returns:
    ``(N, *spatial)`` bool, True where the pixel is kept.

  Raises:
    ValueError: ``shape`` not of positive ints ``(N, *spatial)``, a ``grid`` that is not a
      positive int (or one per spatial axis), ``keep_prob`` outside ``[0, 1]`` or NaN.
  """
  try:
    n, *spatial = (operator.index(s) for s in shape)
  except (TypeError, ValueError):  # not a sequence of ints, or an empty one
    n, spatial = 0, ()
  if n < 1 or any(s < 1 for s in spatial):
    raise ValueError(f"grid_cell_mask: shape must be (N, *spatial), positive ints; got {shape!r}")
  grid = grid_tuple(grid, spatial)
  keep_prob = check_prob("keep_prob", keep_prob)
  keep = jax.random.bernoulli(key, keep_prob, (n, *num_cells(spatial, grid)))
  return cells_to_pixels(keep, spatial, grid)


def grid_inpaint(key, images, *, grid=8, keep_prob=0.75, fill=0.0):
  """Zero (``fill``) randomly chosen grid cells of each image, the same cells in every channel.

  Args:
    key: PRNG key.
    images: ``(N, *spatial, C)`` float.
    grid, keep_prob: see `grid_cell_mask`.
    fill: value written into masked cells (0 as in Eq. 8).

  Returns:
    ``(corrupted, keep)``: corrupted ``(N, *spatial, C)`` and the bool keep-mask ``(N, *spatial)``.

  Raises:
    ValueError: ``images`` not ``(N, *spatial, C)`` with no axis of size 0, or as
      :func:`grid_cell_mask`.
  """
  check_images(images)
  if 0 in images.shape:
    raise ValueError(f"grid_inpaint: images must be non-empty (no axis of size 0); got shape "
                     f"{tuple(images.shape)}")
  keep = grid_cell_mask(key, images.shape[:-1], grid=grid, keep_prob=keep_prob)
  corrupted = jnp.where(keep[..., None], images, jnp.asarray(fill, images.dtype))
  return corrupted, keep
