"""Small argument helpers shared by the model modules."""

from __future__ import annotations

import numbers
from typing import Sequence


def spatial_tuple(value: int | Sequence[int], d: int, name: str) -> tuple[int, ...]:
  """``value`` repeated to ``d`` ints (an int) or checked to have ``d`` entries, all >= 1.

  Raises:
    ValueError: naming ``name`` when a sequence has the wrong length or an entry is < 1.
  """
  if isinstance(value, numbers.Integral):
    out = (int(value),) * d
  else:
    out = tuple(int(v) for v in value)
    if len(out) != d:
      raise ValueError(f"{name} must be an int or a sequence of {d} ints for spatial_dims={d}; "
                       f"got {name}={tuple(value)}")
  if any(v < 1 for v in out):
    raise ValueError(f"{name} must be >= 1 along every axis; got {name}={out}")
  return out
