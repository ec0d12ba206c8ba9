"""Cartesian k-space undersampling of MR images (the acquisition model of ssfd_feature_distance
Sec. 2.1: a UNet reconstructs 4x-accelerated scans from their zero-filled reconstructions).

Conventions follow fastMRI (``fastmri.fft2c`` / ``ifft2c`` and ``fastmri.data.subsample``):

* Complex images and k-space are complex arrays ``(..., H, W)``: the 2D FFTs act on the last two
  axes (channels-first for this one purpose; channels-last images ``(N, H, W, C)`` are moved to
  ``(N, C, H, W)`` by the caller, see `jaxmed.methods.reconstruction`). The FFTs are centred
  (ifftshift -> fft2 -> fftshift) and orthonormal (``norm="ortho"``), so Parseval holds.
* Masks sample whole columns of k-space: the phase-encode axis is W (the last axis). A mask is
  ``(N, W)`` bool, one row per example, broadcast over H.
* ``num_low = round(W * center_fraction)`` (Python rounding) fully sampled centre columns start at
  column ``(W - num_low + 1) // 2``.

Every function is pure and usable inside `jax.jit`; for the masks, the sizes and the
acceleration / centre-fraction pairs are static Python values and only the key is traced.
Arguments are checked on the host first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MASK_KINDS = ("random", "equispaced")
_AXES = (-2, -1)


def _host_or_jax(x):
  """Jax arrays and tracers as they are, anything else as NumPy (dtype checked before jnp)."""
  return x if isinstance(x, (jax.Array, jax.core.Tracer)) else np.asarray(x)


def _field(fn: str, name: str, x, ndim: int | None = None):
  """``x`` as a complex jax array (real floating input promoted), rank checked."""
  x = _host_or_jax(x)
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
    raise TypeError(f"{fn}: {name} must be a real floating or complex array; got dtype "
                    f"{x.dtype}")
  if ndim is None and x.ndim < 2:
    raise ValueError(f"{fn}: {name} must be (..., H, W) with at least 2 axes; got shape "
                     f"{x.shape}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{fn}: {name} must be (N, H, W); got shape {x.shape}")
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.complex64))


def fft2c(x):
  """Centred orthonormal 2D FFT over the last two axes (fastMRI ``fft2c``): image -> k-space.

  ``fftshift(fft2(ifftshift(x), norm="ortho"))``, so the zero frequency sits at index
  ``(H // 2, W // 2)`` and ``sum |k|^2 == sum |x|^2``.

  Args:
    x: ``(..., H, W)`` complex (or real floating, promoted to complex) image.

  Returns:
    ``(..., H, W)`` complex k-space (complex64 for float32 / complex64 input).

  Raises:
    TypeError: a non-floating, non-complex dtype.
    ValueError: fewer than 2 axes.
  """
  x = _field("fft2c", "x", x)
  return jnp.fft.fftshift(jnp.fft.fft2(jnp.fft.ifftshift(x, axes=_AXES), norm="ortho"),
                          axes=_AXES)


def ifft2c(k):
  """Centred orthonormal inverse 2D FFT over the last two axes (fastMRI ``ifft2c``).

  ``fftshift(ifft2(ifftshift(k), norm="ortho"))``, the inverse of `fft2c`.

  Args:
    k: ``(..., H, W)`` complex k-space (real floating input is promoted to complex).

  Returns:
    ``(..., H, W)`` complex image.

  Raises:
    TypeError: a non-floating, non-complex dtype.
    ValueError: fewer than 2 axes.
  """
  k = _field("ifft2c", "k", k)
  return jnp.fft.fftshift(jnp.fft.ifft2(jnp.fft.ifftshift(k, axes=_AXES), norm="ortho"),
                          axes=_AXES)


# --- masks -------------------------------------------------------------------------------------


def _positive_int(fn: str, name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{fn}: {name} must be an int >= 1; got {value!r}")
  return int(value)


def _real(fn: str, name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{fn}: {name} must be a finite real number; got {value!r}")
  return float(value)


def fastmri_center_fraction(acceleration) -> float:
  """fastMRI's fully sampled centre fraction for an acceleration: 4x -> 0.08, 8x -> 0.04, i.e.
  ``0.32 / acceleration`` (rounded to 4 decimals)."""
  acceleration = float(acceleration)
  if not acceleration >= 1.0:
    raise ValueError(f"acceleration must be >= 1; got {acceleration}")
  return round(0.32 / acceleration, 4)


def check_mask_args(kind: str, accelerations, center_fractions, *, fn: str = "sample_masks"
                    ) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
  """Validates a mask kind and its (acceleration, centre fraction) pairs (width-independent).

  Args:
    kind: "random" or "equispaced".
    accelerations: one acceleration (>= 1) per pair.
    center_fractions: one centre fraction in [0, 1) per pair, paired with ``accelerations`` by
      index.
    fn: the public function named in error messages.

  Returns:
    ``(kind, accelerations, center_fractions)`` as a string and two tuples of floats.

  Raises:
    ValueError: an unknown kind, unequal or empty sequences, or a value out of range.
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"{fn}: kind must be one of {MASK_KINDS}; got {kind!r}")
  if isinstance(accelerations, (numbers.Number, str)) or isinstance(center_fractions,
                                                                    (numbers.Number, str)):
    raise ValueError(f"{fn}: accelerations and center_fractions must be sequences; got "
                     f"{accelerations!r} and {center_fractions!r}")
  accs = tuple(_real(fn, "accelerations[i]", a) for a in accelerations)
  cfs = tuple(_real(fn, "center_fractions[i]", c) for c in center_fractions)
  if not accs or len(accs) != len(cfs):
    raise ValueError(f"{fn}: accelerations and center_fractions must be non-empty and of equal "
                     f"length (paired by index); got {len(accs)} and {len(cfs)}")
  for a in accs:
    if a < 1.0:
      raise ValueError(f"{fn}: acceleration must be >= 1; got {a}")
  for c in cfs:
    if not 0.0 <= c < 1.0:
      raise ValueError(f"{fn}: center_fraction must be in [0, 1); got {c}")
  return kind, accs, cfs


def _centre_columns(width: int, num_low: int) -> np.ndarray:
  """``(W,)`` bool: ``num_low`` columns from ``(W - num_low + 1) // 2`` (fastMRI)."""
  mask = np.zeros(width, bool)
  pad = (width - num_low + 1) // 2
  mask[pad:pad + num_low] = True
  return mask


def _adjusted_acceleration(fn: str, width: int, acceleration: float, num_low: int) -> float:
  """The equispaced spacing that keeps the overall rate ``1 / acceleration`` given the centre."""
  if num_low * acceleration >= width:
    raise ValueError(
        f"{fn}: an equispaced mask needs round(width * center_fraction) * acceleration < width; "
        f"got width={width}, num_low={num_low}, acceleration={acceleration} (lower the centre "
        f"fraction or the acceleration)")
  return acceleration * (num_low - width) / (num_low * acceleration - width)


def _equispaced_columns(width: int, spacing: float, offset: int) -> np.ndarray:
  """``(W,)`` bool: columns ``round(offset + k * spacing)`` below W (float64, round half even).

  fastMRI's ``np.arange(offset, num_cols - 1, adjusted_accel)`` stops below ``W - 1``; we stop
  below W, so that acceleration 1 samples every column (fastMRI leaves the last one out).
  """
  cols = np.around(np.arange(offset, width, spacing)).astype(np.int64)
  mask = np.zeros(width, bool)
  mask[cols[cols < width]] = True
  return mask


def sample_masks(key, num: int, width: int, *, kind: str = "random",
                 accelerations: Sequence[float] = (4,),
                 center_fractions: Sequence[float] = (0.08,)):
  """Cartesian column masks, one (acceleration, centre fraction) pair drawn per example.

  As fastMRI's ``MaskFunc`` (``allow_any_combination=False``): each example draws the pair index
  uniformly, then

  * ``kind="random"`` (``RandomMaskFunc``): ``num_low = round(W * center_fraction)`` centre
    columns, each remaining column sampled independently with probability
    ``(W / acceleration - num_low) / (W - num_low)`` (none when negative), so the expected
    sampled fraction is ``1 / acceleration`` (``num_low / W`` when that is larger);
  * ``kind="equispaced"`` (fastMRI ``EquispacedMaskFractionFunc``, the v0.1
    ``EquispacedMaskFunc``): the same centre plus columns ``round(offset + k * a)``,
    ``a = acceleration * (num_low - W) / (num_low * acceleration - W)``, offset uniform in
    ``[0, round(a))``; needs ``num_low * acceleration < W``. One departure: the sequence runs
    while ``offset + k * a < W`` where fastMRI stops below ``W - 1``, so that acceleration 1
    samples every column (fastMRI leaves column ``W - 1`` out).

  The per-pair masks of the equispaced kind are tabulated on the host (float64 arithmetic as in
  fastMRI), so inside `jax.jit` a mask is one gather.

  Args:
    key: PRNG key.
    num: number of masks N.
    width: number of k-space columns W (the phase-encode axis, the images' last axis).
    kind: "random" or "equispaced".
    accelerations, center_fractions: the pairs, matched by index.

  Returns:
    ``(masks, acceleration)``: ``(N, W)`` bool, True where a column is sampled, and the
    nominal acceleration of each example ``(N,)`` float32.

  Raises:
    ValueError: ``num`` or ``width`` not an int >= 1, an unknown kind, unpaired or out-of-range
      accelerations / centre fractions, or an equispaced pair whose centre alone reaches the
      sampling budget.
  """
  fn = "sample_masks"
  num = _positive_int(fn, "num", num)
  width = _positive_int(fn, "width", width)
  kind, accs, cfs = check_mask_args(kind, accelerations, center_fractions, fn=fn)
  num_low = [round(width * c) for c in cfs]
  centre = np.stack([_centre_columns(width, n) for n in num_low])

  choice_key, mask_key = jax.random.split(key)
  index = jax.random.randint(choice_key, (num,), 0, len(accs))
  acceleration = jnp.asarray(accs, jnp.float32)[index]
  if kind == "random":
    prob = np.array([(width / a - n) / (width - n) if n < width else 1.0
                     for a, n in zip(accs, num_low)], np.float32)
    outer = jax.random.uniform(mask_key, (num, width)) < jnp.asarray(prob)[index][:, None]
    return jnp.asarray(centre)[index] | outer, acceleration

  spacing = [_adjusted_acceleration(fn, width, a, n) for a, n in zip(accs, num_low)]
  num_offsets = [round(s) for s in spacing]
  table = np.zeros((len(accs), max(num_offsets), width), bool)
  for p, (s, r) in enumerate(zip(spacing, num_offsets)):
    for offset in range(r):
      table[p, offset] = centre[p] | _equispaced_columns(width, s, offset)
  offset = jax.random.randint(mask_key, (num,), 0, jnp.asarray(num_offsets, jnp.int32)[index])
  return jnp.asarray(table)[index, offset], acceleration


def random_mask(key, num: int, width: int, *, acceleration: float = 4.0,
                center_fraction: float = 0.08):
  """``(N, W)`` bool fastMRI ``RandomMaskFunc`` column masks for one acceleration.

  See `sample_masks` (``kind="random"``) for the construction; arguments and errors likewise.
  """
  return sample_masks(key, num, width, kind="random", accelerations=(acceleration,),
                      center_fractions=(center_fraction,))[0]


def equispaced_mask(key, num: int, width: int, *, acceleration: float = 4.0,
                    center_fraction: float = 0.08):
  """``(N, W)`` bool fastMRI ``EquispacedMaskFractionFunc`` column masks for one acceleration.

  See `sample_masks` (``kind="equispaced"``) for the construction; arguments and errors
  likewise.
  """
  return sample_masks(key, num, width, kind="equispaced", accelerations=(acceleration,),
                      center_fractions=(center_fraction,))[0]


# --- undersampling -----------------------------------------------------------------------------


def _mask_for(fn: str, mask, shape) -> jax.Array:
  """``mask`` as ``(N, 1, W)`` bool for a ``(N, H, W)`` field."""
  mask = _host_or_jax(mask)
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.number)):
    raise TypeError(f"{fn}: mask must be bool or numeric; got dtype {mask.dtype}")
  if mask.shape != (shape[0], shape[2]):
    raise ValueError(f"{fn}: mask must be (N, W) = {(shape[0], shape[2])} for input of shape "
                     f"{tuple(shape)}; got shape {mask.shape}")
  return jnp.asarray(mask).astype(bool)[:, None, :]


def undersample(kspace, mask):
  """Zero the unsampled columns of k-space.

  Args:
    kspace: ``(N, H, W)`` complex k-space (centred, as from `fft2c`).
    mask: ``(N, W)`` bool (or 0/1) column mask.

  Returns:
    ``(N, H, W)`` complex: ``kspace`` where the column is sampled, 0 elsewhere.

  Raises:
    TypeError: ``kspace`` not floating/complex, or ``mask`` not bool/numeric.
    ValueError: ``kspace`` not rank 3 or ``mask`` not ``(N, W)``.
  """
  kspace = _field("undersample", "kspace", kspace, ndim=3)
  mask = _mask_for("undersample", mask, kspace.shape)
  return jnp.where(mask, kspace, jnp.zeros((), kspace.dtype))


def zero_filled(image, mask):
  """Magnitude of the zero-filled reconstruction ``|ifft2c(mask * fft2c(image))|``.

  A real image is treated as a complex one with zero imaginary part, so with a full mask the
  result is ``|image|`` (the image itself when it is non-negative, as magnitude MR images are).

  Args:
    image: ``(N, H, W)`` real floating or complex images.
    mask: ``(N, W)`` bool (or 0/1) column masks.

  Returns:
    ``(N, H, W)`` float32.

  Raises:
    TypeError: ``image`` not floating/complex, or ``mask`` not bool/numeric.
    ValueError: ``image`` not rank 3 or ``mask`` not ``(N, W)``.
  """
  image = _field("zero_filled", "image", image, ndim=3)
  _mask_for("zero_filled", mask, image.shape)
  return jnp.abs(ifft2c(undersample(fft2c(image), mask))).astype(jnp.float32)
