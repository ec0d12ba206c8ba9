"""Local pixel shuffling (source_identification Sec. 4.2, Eq. 9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.pretext._grid import (cell_sizes, check_images, check_prob, grid_tuple,
                                  num_cells)
from jaxmed.pretext.inpaint import grid_cell_mask


def local_shuffle(key, images, *, grid=8, prob=0.5):
  """Shuffle the rows and the columns of randomly selected grid cells.

  Eq. 9 of source_identification: a cell ``g(I)`` is selected when ``B(gamma) = 1``
  (probability ``prob = gamma``) and replaced by ``P g(I) Q``, with ``P`` a random row
  permutation and ``Q`` a random column permutation, drawn independently for every cell of every
  image; unselected cells are unchanged. All channels of a cell move together. For volumes
  ``(N, D, H, W, C)`` every spatial axis of the cell gets its own permutation. (Models Genesis
  permutes all pixels of a block freely; Eq. 9's ``P g Q`` keeps each row's pixels together.)

  Args:
    key: PRNG key.
    images: ``(N, *spatial, C)`` float, usually ``(N, H, W, C)``.
    grid: cell size in pixels, an int or one per spatial axis; the last cell of an axis may be
      partial when the size is not divisible (it is shuffled within its own extent).
    prob: gamma, the probability that a cell is shuffled.

  Returns:
    ``(corrupted, selected)``: corrupted ``(N, *spatial, C)`` and the bool mask
    ``(N, *spatial)``, True in the selected (shuffled) cells.
  """
  check_images(images, floating=True)
  n, *spatial = images.shape[:-1]
  grid = grid_tuple(grid, spatial)
  prob = check_prob("prob", prob)
  cells = num_cells(spatial, grid)
  select_key, perm_key = jax.random.split(key)
  selected = grid_cell_mask(select_key, (n, *spatial), grid=grid, keep_prob=prob)

  ndim = len(spatial)
  # Per-pixel index arrays, broadcastable to (N, *spatial): the image, each axis's coordinate
  # and each axis's cell.
  image_index = np.arange(n).reshape((n,) + (1,) * ndim)
  coords = [np.arange(s).reshape([1] * (a + 1) + [s] + [1] * (ndim - a - 1))
            for a, s in enumerate(spatial)]
  cell_index = [c // g for c, g in zip(coords, grid)]
  # One permutation of range(cell extent) per (image, cell, axis): argsort of uniform keys, the
  # positions past a partial cell's end pushed last so that they never enter the permutation.
  # A single draw for all axes (random bits are slow to compile on CPU).
  uniform = jax.random.uniform(perm_key, (n, *cells, sum(grid)))
  bounds = np.cumsum((0,) + grid)
  sources = []
  for a, (s, g) in enumerate(zip(spatial, grid)):
    beyond = np.arange(g) >= cell_sizes(s, g)[:, None]            # (cells[a], g)
    beyond = beyond.reshape([1] * (a + 1) + [cells[a]] + [1] * (ndim - a - 1) + [g])
    u = uniform[..., bounds[a]:bounds[a + 1]]
    perm = jnp.argsort(jnp.where(beyond, jnp.inf, u), axis=-1)   # (N, *cells, g)
    moved = cell_index[a] * g + perm[(image_index, *cell_index, coords[a] % g)]
    sources.append(jnp.where(selected, moved, coords[a]))
  return images[(image_index, *sources)], selected
