"""Input checks shared by the metric kernels, run on the host before tracing.

Every public metric validates its arguments here and then calls a jitted kernel. Shape, rank and
dtype checks always run; value checks (NaN, binary, label range) run only on concrete arrays, so
a metric called inside a user's ``jax.jit`` still traces (it then skips the value checks). Each
value check is one pass over the data on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
  """True for an abstract value inside a transformation (``jit``, ``vmap``, ``grad``)."""
  return isinstance(x, jax.core.Tracer)


def as_array(fn: str, name: str, x):
  """``x`` as an array: jax arrays and tracers pass through, anything else becomes NumPy.

  NumPy input stays on the host, so the value checks below read it without a copy; the jitted
  kernel moves it to the device.
  """
  if is_traced(x) or isinstance(x, jax.Array):
    return x
  try:
    x = np.asarray(x)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{fn}: {name} must be a numeric array; got {type(x).__name__}") from e
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ValueError(f"{fn}: {name} must be numeric or bool; got dtype {x.dtype}")
  return x


def same_shape(fn: str, a_name: str, a, b_name: str, b) -> None:
  if np.shape(a) != np.shape(b):
    raise ValueError(f"{fn}: {a_name} shape {np.shape(a)} != {b_name} shape {np.shape(b)}")


def vectors(fn: str, a_name: str, a, b_name: str, b):
  """Two inputs as arrays of one shape ``(..., n)`` (at least one axis)."""
  a, b = as_array(fn, a_name, a), as_array(fn, b_name, b)
  same_shape(fn, a_name, a, b_name, b)
  if a.ndim < 1:
    raise ValueError(f"{fn}: {a_name} must be (..., n) with at least 1 axis; got shape {a.shape}")
  real(fn, a_name, a)
  real(fn, b_name, b)
  return a, b


def real(fn: str, name: str, x) -> None:
  """Raise for a complex ``x`` (the kernels' float32 cast would drop the imaginary part)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise ValueError(f"{fn}: {name} must be real; got dtype {x.dtype}")


def nonempty(fn: str, name: str, x) -> None:
  """Raise if ``x`` has an axis of size 0 (an empty batch: nothing to measure per item)."""
  if not np.prod(np.shape(x), dtype=np.int64):
    raise ValueError(f"{fn}: {name} must be non-empty (at least one item, no axis of size 0: "
                     f"nothing to measure otherwise); got shape {np.shape(x)}")


def rank_in(fn: str, name: str, x, ranks, layout: str) -> None:
  """Raise unless ``x.ndim`` is one of ``ranks``; ``layout`` says what the axes mean."""
  if np.ndim(x) not in tuple(ranks):
    raise ValueError(f"{fn}: {name} must be {layout}; got shape {np.shape(x)}")


def finite(fn: str, name: str, x) -> None:
  """Raise if a concrete ``x`` holds NaN or Inf."""
  if is_traced(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
    return
  # In NumPy: a jitted check on a jax array measured slower at this size, and NumPy input
  # (the common case) is read without a copy.
  if not np.isfinite(np.asarray(x)).all():
    raise ValueError(f"{fn}: {name} contains NaN or Inf (shape {x.shape}, dtype {x.dtype})")


def binary(fn: str, name: str, x) -> None:
  """Raise if a concrete ``x`` holds values other than 0 and 1 (bool always passes)."""
  if is_traced(x) or x.dtype == jnp.bool_:
    return
  values = np.asarray(x)
  if not ((values == 0) | (values == 1)).all():
    raise ValueError(f"{fn}: {name} must be a binary mask (bool or 0/1); found values "
                     f"{np.unique(values)[:6]} (shape {values.shape}, dtype {values.dtype}; "
                     "threshold probabilities first)")


def nonnegative(fn: str, name: str, x, what: str) -> None:
  """Raise if a concrete ``x`` holds a negative value; ``what`` says what ``x`` holds."""
  if is_traced(x) or not x.size:
    return
  low = np.min(np.asarray(x))
  if low < 0:
    raise ValueError(f"{fn}: {name} must be non-negative {what}; got minimum {low} (shape "
                     f"{x.shape}, dtype {x.dtype})")


def labels_below(fn: str, name: str, x, num_classes: int) -> None:
  """Raise if a concrete integer ``x`` holds labels outside ``[0, num_classes)``."""
  if is_traced(x) or not x.size:
    return
  lo, hi = int(np.min(np.asarray(x))), int(np.max(np.asarray(x)))
  if lo < 0 or hi >= int(num_classes):
    raise ValueError(f"{fn}: {name} labels must be in [0, num_classes={num_classes}); found values "
                     f"in [{lo}, {hi}] (shape {x.shape}, dtype {x.dtype})")


def spacing_tuple(fn: str, spacing, ndim: int) -> tuple[float, ...]:
  """Normalise ``spacing`` (None, a number or one positive number per spatial axis)."""
  if spacing is None:
    return (1.0,) * ndim
  values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
  if values.ndim != 1 or values.size not in (1, ndim):
    raise ValueError(f"{fn}: spacing must be a number or {ndim} numbers (one per spatial axis); "
                     f"got {spacing!r}")
  if not np.all(np.isfinite(values) & (values > 0)):
    raise ValueError(f"{fn}: spacing must be positive and finite; got {spacing!r}")
  return tuple(float(v) for v in np.broadcast_to(values, (ndim,)))
