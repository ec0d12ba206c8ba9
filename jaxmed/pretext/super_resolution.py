"""Grid super-resolution input (source_identification Sec. 4.3, Eq. 10)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmed.pretext._grid import cell_sizes, check_images, grid_tuple


def grid_super_resolution(images, *, grid=8):
  """Replace every grid cell by the value at its centre pixel: a blocky low-resolution image.

  Eq. 10 of source_identification: ``g'(I) = g(I)[floor(h / 2), floor(w / 2)]`` with ``h, w``
  the cell's own extent, so a partial last cell (size not divisible by ``grid``) takes the
  centre of the part inside the image. Deterministic; all channels alike. Idempotent.

  Args:
    images: ``(N, *spatial, C)`` float, usually ``(N, H, W, C)``.
    grid: cell size in pixels, an int or one per spatial axis.

  Returns:
    ``(N, *spatial, C)``, constant within each cell.
  """
  check_images(images, floating=True)
  spatial = images.shape[1:-1]
  grid = grid_tuple(grid, spatial)
  out = images
  for axis, (s, g) in enumerate(zip(spatial, grid)):
    sizes = cell_sizes(s, g)
    centres = np.arange(len(sizes)) * g + sizes // 2
    out = jnp.take(out, centres[np.arange(s) // g], axis=axis + 1)
  return out
