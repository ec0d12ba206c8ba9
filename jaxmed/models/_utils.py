"""Small argument helpers shared by the model modules.

Each raises ``ValueError`` naming the argument, what it expects and what it got, so that the
models' messages read the same.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Sequence

import jax


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


def check_choice(value: Any, choices: Sequence[Any], name: str) -> None:
  """``value`` must be one of ``choices``: ``"{name} must be one of (...); got {name}=..."``."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}; got {name}={value!r}")


def check_rate(value: float, name: str, *, inclusive: bool = False) -> None:
  """A dropout-like rate in ``[0, 1)`` (``[0, 1]`` with ``inclusive``)."""
  ok = 0.0 <= value <= 1.0 if inclusive else 0.0 <= value < 1.0
  if not ok:
    raise ValueError(f"{name} must be in [0, 1{']' if inclusive else ')'}; got {name}={value}")


def check_spatial_dims(spatial_dims: int) -> None:
  """``spatial_dims`` must be 2 or 3."""
  if spatial_dims not in (2, 3):
    raise ValueError(f"spatial_dims must be 2 or 3; got spatial_dims={spatial_dims}")


def check_input(x: jax.Array, spatial_dims: int, what: str) -> None:
  """``x`` must be ``(N, H, W, C)`` (2D) or ``(N, D, H, W, C)`` (3D) for ``spatial_dims``.

  ``what`` names the module in the message, e.g. ``"UNet"``.
  """
  if x.ndim != spatial_dims + 2:
    layout = "(N, H, W, C)" if spatial_dims == 2 else "(N, D, H, W, C)"
    raise ValueError(f"{what} with spatial_dims={spatial_dims} expects x of shape {layout} "
                     f"(ndim {spatial_dims + 2}); got shape {x.shape}")


def check_group_channels(num_groups: int, channels: Iterable[int], what: str = "norm='group'"
                         ) -> None:
  """Group norm: ``num_groups >= 1`` dividing every entry of ``channels``.

  The message names ``num_groups`` and the channel counts it does not divide, e.g.
  ``"norm='group' needs every channel count divisible by num_groups=8; (12,) are not"``.
  """
  if not isinstance(num_groups, numbers.Integral) or num_groups < 1:
    raise ValueError(f"num_groups must be an int >= 1; got num_groups={num_groups!r}")
  bad = tuple(sorted({int(c) for c in channels if int(c) % int(num_groups)}))
  if bad:
    raise ValueError(f"{what} needs every channel count divisible by num_groups={num_groups}; "
                     f"{bad} are not")
