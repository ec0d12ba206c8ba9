"""Regular-grid cell helpers shared by the grid corruptions (source_identification Sec. 4).

An image ``(N, *spatial, C)`` is overlaid with a grid of cells of ``grid`` pixels per axis; the
last cell of an axis is partial when the size is not divisible. The layout is static (numpy), so
the corruptions built on it keep static shapes under `jax.jit`.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def check_images(images, name: str = "images", *, floating: bool = False):
  """Raises unless ``images`` is ``(N, *spatial, C)`` (and floating when asked)."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) < 3:
    raise ValueError(f"{name} must be (N, *spatial, C); got shape {shape}")
  if floating and not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating array; got dtype {images.dtype}")


def check_prob(name: str, value) -> float:
  """``value`` as a float in [0, 1], or a ValueError naming ``name``."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be in [0, 1]; got {value!r}") from None
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1]; got {value}")
  return value


def concrete_values(x):
  """``x`` as a NumPy array when its values can be read here before tracing, else None (a
  tracer inside ``jit``, a shard of a multi-host array): value checks then skip."""
  if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return None
  return np.asarray(x)


def grid_tuple(grid, spatial) -> tuple[int, ...]:
  """``grid`` (an int or one int per spatial axis) as a validated tuple of cell sizes."""
  spatial = tuple(spatial)
  grid = (grid,) * len(spatial) if isinstance(grid, (int, np.integer)) else tuple(grid)
  if len(grid) != len(spatial) or any(int(g) != g or g < 1 for g in grid):
    raise ValueError(f"grid must be a positive int or one per spatial axis {spatial}; "
                     f"got {grid}")
  return tuple(int(g) for g in grid)


def num_cells(spatial, grid) -> tuple[int, ...]:
  """Number of (possibly partial) cells per spatial axis."""
  return tuple(-(-s // g) for s, g in zip(spatial, grid))


def cell_sizes(size: int, g: int) -> np.ndarray:
  """``(ceil(size / g),)`` int: the extent of each cell along one axis (the last may be short)."""
  starts = np.arange(0, size, g)
  return np.minimum(g, size - starts)


def cells_to_pixels(values, spatial, grid):
  """Upsamples per-cell values ``(N, *cells, ...)`` to pixels ``(N, *spatial, ...)``."""
  index = np.ix_(*(np.arange(s) // g for s, g in zip(spatial, grid)))
  return values[(slice(None), *index)]
