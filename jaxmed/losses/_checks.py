"""Input checks shared by the losses, run on the host before tracing.

As in ``jaxmed.metrics`` (whose checks this package may not import: tests/test_layers.py):
shape, dtype and number checks always run; value checks run only on concrete arrays (NumPy, or a
jax array outside a transformation), one min / max pass each, and are skipped on the abstract
values inside ``jax.jit`` (a training step), so a loss still traces there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def concrete(x) -> bool:
  """True when the values of ``x`` can be read on this host (not a tracer, not a shard of a
  multi-host array)."""
  if isinstance(x, jax.core.Tracer):
    return False
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def in_range(fn: str, name: str, x, low: float, high: float, what: str) -> None:
  """Raise if a concrete ``x`` holds values outside ``[low, high]`` or NaN; ``what`` names the
  documented domain (e.g. ``"probabilities in [0, 1]"``)."""
  if not concrete(x) or not np.size(x):
    return
  values = np.asarray(x)
  lo, hi = values.min(), values.max()
  if not (lo >= low and hi <= high):  # NaN fails both
    raise ValueError(f"{fn}: {name} must be {what}; got values in [{lo}, {hi}] (shape "
                     f"{values.shape}, dtype {values.dtype})")


def same_shape(fn: str, a_name: str, a, b_name: str, b) -> None:
  if np.shape(a) != np.shape(b):
    raise ValueError(f"{fn}: {b_name} shape {np.shape(b)} must equal {a_name} shape "
                     f"{np.shape(a)}")


def real(fn: str, name: str, x) -> None:
  """Raise for a complex ``x`` (a float32 cast would drop its imaginary part)."""
  dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise ValueError(f"{fn}: {name} must be real; got complex dtype {dtype}")


def number(fn: str, name: str, value, *, positive: bool = False) -> float:
  """``value`` as a finite float ``>= 0`` (``> 0`` with ``positive``), else a ValueError; a
  traced value (e.g. a scheduled weight inside ``jit``) passes unchecked."""
  if isinstance(value, jax.core.Tracer):
    return value
  bound = "> 0" if positive else ">= 0"
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {name} must be a finite float {bound}; got {value!r}") from e
  if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
    raise ValueError(f"{fn}: {name} must be a finite float {bound}; got {value!r}")
  return value
