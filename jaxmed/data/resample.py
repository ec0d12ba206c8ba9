"""Resample a volume to a target voxel spacing on the host (NumPy only), as MONAI ``Spacingd``.

Volumes are ``(D, H, W)`` or channels-last ``(D, H, W, C)`` arrays in canonical orientation
(see `jaxmed.data.subject`), so the affine is diagonal and resampling is axis-aligned and
separable: each axis is resampled on its own with a 1D rule (gather two neighbours and blend
for linear, gather one for nearest).

The sampling grid is MONAI's `Spacing` (default ``diagonal=False``, ``padding_mode="border"``,
``align_corners=False``, ``scale_extent=False``) for a diagonal affine ``diag(s, 1)``: the first
voxel centre stays where it is and, per axis with input size ``n``, spacing ``s`` and target
``t``::

  m   = round_half_even((n - 1) * s / t + 1)            (output size, `output_shape`)
  x_j = clip(j * t / s, 0, n - 1),   j = 0 .. m - 1    (input voxel coordinate of output j)

Points past the last voxel (``x_j > n - 1`` happens when ``m`` was rounded up) take the edge
value (torch ``grid_sample(padding_mode="border")`` clips the coordinate to ``[0, n - 1]``). An
axis whose spacing is within `AFFINE_TOL` (1e-3 mm) of its target keeps its spacing and is not
resampled, as in MONAI.

Linear (``order=1``) output voxel j is ``(1 - w) * a[i] + w * a[min(i + 1, n - 1)]`` with
``i = floor(x_j)``, ``w = x_j - i``, per axis (trilinear overall), computed in float32.
Nearest (``order=0``) picks ``a[rint(x_j)]`` with round-half-to-even, as torch's
``grid_sample(mode="nearest")`` (``std::nearbyint``).

Exact ties: ``x_j`` lands exactly on ``k + 0.5`` whenever ``t / s`` is a half-integer multiple
(e.g. 1 mm -> 1.5 mm, every odd j), and there MONAI's nearest choice is decided by float64
rounding noise in its grid (torch ``affine_grid`` on a normalised affine), not by the
half-to-even rule. To give label maps the same voxels as MONAI, `x_j` is computed with the same
float64 operations as MONAI 1.6 / torch CPU: ``zoom_affine``'s rotation factor
``s * inv(s)``, the normalised ``[-1, 1]`` affine, ``torch.linspace`` (whose CPU kernel uses a
fused multiply-add) and ``grid_sample``'s un-normalisation ``((g + 1) * n - 1) / 2``. These
coordinates differ from ``j * t / s`` by a few ulps only, so linear results are unaffected.

Equivalent SciPy calls: ``scipy.ndimage.map_coordinates(a, x, order=1, mode="nearest")`` on the
grid ``x_j = j * t / s`` above gives the same linear result (``mode="nearest"`` repeats the edge
voxel, i.e. the border clipping). ``scipy.ndimage.zoom`` does not: with ``grid_mode=False`` it
maps output j to ``j * (n - 1) / (m - 1)`` (corners aligned), which equals ``j * t / s`` only when
``(m - 1) * t / s == n - 1``; with ``grid_mode=True`` it aligns the outer voxel edges instead.
SciPy's ``order=0`` rounds ties up (``floor(x + 0.5)``), so it agrees with nearest here except
at exact ties.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

# `monai.data.utils.AFFINE_TOL`: spacings within this (mm) of the target are left as they are.
AFFINE_TOL = 1e-3
# Default rtol of the torch.allclose / np.allclose that MONAI uses to detect a no-op resample.
_ALLCLOSE_RTOL = 1e-5

Spacing = tuple[float, float, float]


def _as_spacing(name: str, value: Sequence[float]) -> Spacing:
  """Validates a voxel spacing: 3 finite positive numbers (mm along D, H, W)."""
  try:
    arr = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be 3 numbers (mm along D, H, W); got {value!r}") from e
  if arr.shape != (3,):
    raise ValueError(
        f"{name} must be 3 numbers (mm along D, H, W); got shape {arr.shape}: {value!r}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite; got {tuple(arr.tolist())}")
  if np.any(arr <= 0):
    raise ValueError(f"{name} must be positive; got {tuple(arr.tolist())}")
  return tuple(float(v) for v in arr)


def _as_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  """Validates a spatial shape: 3 positive integers (D, H, W)."""
  shape = tuple(shape)
  if len(shape) != 3 or not all(isinstance(n, numbers.Integral) and n > 0 for n in shape):
    raise ValueError(f"shape must be 3 positive integers (D, H, W); got {shape!r}")
  return tuple(int(n) for n in shape)


def _affines(spacing: Spacing, target_spacing: Spacing) -> tuple[np.ndarray, np.ndarray, Spacing]:
  """Input and output 4x4 affines of MONAI `Spacing` for a diagonal input affine.

  Mirrors ``Spacing.__call__`` + ``zoom_affine(diagonal=False)`` float op for float op (the
  output affine carries the rotation factor ``s @ inv(s)``, which is 1 up to an ulp).

  Returns:
    ``(src, dst, effective_target)``; the effective target keeps the input spacing on axes
    within `AFFINE_TOL` of the requested target.
  """
  s = np.asarray(spacing, dtype=np.float64)
  t = np.asarray(target_spacing, dtype=np.float64)
  # Spacing: out_d = _d if (target - AFFINE_TOL) <= _d <= (target + AFFINE_TOL) else target.
  keep = ((t - AFFINE_TOL) <= s) & (s <= (t + AFFINE_TOL))
  t = np.where(keep, s, t)
  src = np.diag(np.append(s, 1.0))
  rzs = src[:-1, :-1]
  zs = np.linalg.cholesky(rzs.T @ rzs).T
  rotation = rzs @ np.linalg.inv(zs)
  dst = np.eye(4)
  dst[:-1, :-1] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(t))
  # compute_shape_offset puts the minimum corner (voxel 0) at the input origin: zero offset.
  return src, dst, tuple(float(v) for v in t)


def _shape_from_affines(shape: tuple[int, int, int], src: np.ndarray,
                        dst: np.ndarray) -> tuple[int, int, int]:
  """``monai.data.utils.compute_shape_offset(shape, src, dst, scale_extent=False)[0]``."""
  in_coords = [(0.0, n - 1.0) for n in shape]
  corners = np.asarray(np.meshgrid(*in_coords, indexing="ij")).reshape((3, -1))
  corners = np.concatenate((corners, np.ones_like(corners[:1])))
  corners_out = np.linalg.solve(dst, src) @ corners
  corners_out = corners_out[:-1] / corners_out[-1]
  out = np.round(np.ptp(corners_out, axis=1) + 1.0)
  return tuple(int(v) for v in out)


def output_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: Sequence[float]) -> tuple[int, int, int]:
  """Spatial shape after resampling from `spacing` to `target_spacing`, as MONAI `Spacing`.

  Per axis ``m = round_half_even((n - 1) * s / t + 1)``: the distance between the first and
  last voxel centres is kept (not the outer extent). Axes whose spacing is within `AFFINE_TOL`
  of the target keep ``n``.

  Args:
    shape: input spatial shape ``(D, H, W)``.
    spacing: input voxel size in mm along ``(D, H, W)``.
    target_spacing: output voxel size in mm along ``(D, H, W)``.

  Returns:
    The output ``(D, H, W)``.

  Raises:
    ValueError: `shape` is not 3 positive integers, or a spacing is not 3 finite positive
      numbers.
  """
  shape = _as_shape(shape)
  spacing = _as_spacing("spacing", spacing)
  target_spacing = _as_spacing("target_spacing", target_spacing)
  src, dst, _ = _affines(spacing, target_spacing)
  return _shape_from_affines(shape, src, dst)


def _torch_linspace(m: int) -> np.ndarray:
  """``torch.linspace(-1, 1, m, dtype=torch.float64)`` bit for bit (CPU kernel).

  The kernel computes ``start + step * i`` for ``i < m // 2`` and ``end - step * (m - 1 - i)``
  for the rest; the CPU kernel is compiled with FMA contraction (x86 AVX2 / AVX-512 builds), so
  each is a fused multiply-add (one rounding), reproduced here exactly with integer arithmetic
  (``step`` is a dyadic rational and Python's int true division rounds correctly).
  """
  if m == 1:
    return np.array([-1.0])
  step = 2.0 / (m - 1)
  num, den = step.as_integer_ratio()
  half = m // 2
  return np.array([(num * i - den) / den if i < half else (den - num * (m - 1 - i)) / den
                   for i in range(m)])


def _source_coordinates(shape: tuple[int, int, int], out_shape: tuple[int, int, int],
                        src: np.ndarray, dst: np.ndarray) -> list[np.ndarray]:
  """Per-axis float64 input voxel coordinates of the output voxels, clipped to ``[0, n - 1]``.

  Mathematically ``x_j = j * t / s``; computed with MONAI / torch's float64 operations (see the
  module docstring) so that exact ``.5`` ties round as they do in MONAI.
  """
  xform = np.linalg.solve(src, dst)  # spatial_resample: output voxel -> input voxel.

  def normalize(sizes):  # monai.networks.utils.normalize_transform(align_corners=False)
    sizes = np.asarray(sizes, dtype=np.float64)
    norm = np.diag(np.append(2.0 / sizes, 1.0))
    norm[:-1, -1] = 1.0 / sizes - 1.0
    return norm

  src_norm = normalize(shape)
  dst_norm_inv = np.linalg.inv(normalize(out_shape))
  coords = []
  for k, (n, m) in enumerate(zip(shape, out_shape)):
    # to_norm_affine: src_norm @ xform @ inv(dst_norm), diagonal + translation.
    scale = src_norm[k, k] * xform[k, k]
    theta = scale * dst_norm_inv[k, k]
    shift = scale * dst_norm_inv[k, -1] + src_norm[k, -1]
    # affine_grid(align_corners=False): base = linspace(-1, 1, m) * (m - 1) / m.
    base = _torch_linspace(m) * (m - 1) / m if m > 1 else np.zeros(1)
    grid = base * theta + shift
    # grid_sample: un-normalise (align_corners=False), then padding_mode="border" clips.
    x = ((grid + 1.0) * n - 1.0) / 2.0
    coords.append(np.minimum(float(n - 1), np.maximum(x, 0.0)))
  return coords


def _lerp_axis(a: np.ndarray, axis: int, x: np.ndarray) -> np.ndarray:
  """Linear interpolation of float32 `a` along `axis` at clipped coordinates `x` (float64)."""
  n = a.shape[axis]
  lo = np.floor(x).astype(np.intp)
  hi = np.minimum(lo + 1, n - 1)
  w = (x - lo).astype(np.float32)
  if len(x) == n and np.array_equal(lo, np.arange(n)) and not w.any():
    return a  # identity along this axis.
  out = np.take(a, lo, axis=axis)
  upper = np.take(a, hi, axis=axis)
  bshape = [1] * a.ndim
  bshape[axis] = -1
  upper -= out
  upper *= w.reshape(bshape)
  out += upper
  return out


def resample_to_spacing(volume: np.ndarray, spacing: Sequence[float],
                        target_spacing: Sequence[float], *,
                        order: int) -> tuple[np.ndarray, Spacing]:
  """Resamples `volume` from voxel size `spacing` to `target_spacing`, as MONAI `Spacingd`.

  Same output shape, grid, edge handling and (for ``order=0``) tie rounding as MONAI's
  ``Spacing(pixdim=target_spacing, mode="bilinear" | "nearest")`` on a volume with affine
  ``diag(spacing, 1)``; see the module docstring for the grid equation. Linear results agree
  with MONAI (which interpolates in float64) to float32 rounding.

  No-op: when MONAI would not resample (every axis within `AFFINE_TOL` of its target, in
  particular ``spacing == target_spacing``), a copy of `volume` is returned (cast to float32
  for ``order=1``, dtype kept for ``order=0``) with ``new_spacing == spacing``. The result is
  always a new array, never a view of `volume`.

  Args:
    volume: ``(D, H, W)`` or channels-last ``(D, H, W, C)`` array; channels are resampled
      independently.
    spacing: voxel size of `volume` in mm along ``(D, H, W)``.
    target_spacing: wanted voxel size in mm along ``(D, H, W)``.
    order: 1 = (tri)linear, for images: float32 out, inputs must be finite. 0 = nearest, for
      label maps and masks: dtype kept, values are copied from input voxels.

  Returns:
    ``(resampled, new_spacing)``: the ``(*output_shape(...), [C])`` array and its voxel size,
    `target_spacing` except on axes within `AFFINE_TOL` of it (those keep `spacing`).

  Raises:
    ValueError: `volume` is not 3D / 4D or has an empty axis, a spacing is not 3 finite
      positive numbers, `order` is not 0 or 1, or (``order=1``) `volume` holds NaN or inf.
  """
  volume = np.asarray(volume)
  if volume.ndim not in (3, 4):
    raise ValueError(
        f"volume must be (D, H, W) or (D, H, W, C); got shape {volume.shape} "
        f"(ndim {volume.ndim})")
  if volume.size == 0:
    raise ValueError(f"volume must not have an empty axis; got shape {volume.shape}")
  spacing = _as_spacing("spacing", spacing)
  target_spacing = _as_spacing("target_spacing", target_spacing)
  if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (0, 1):
    raise ValueError(f"order must be 0 (nearest) or 1 (linear); got {order!r}")
  if order == 1:
    if volume.dtype.kind not in "biuf":
      raise ValueError(f"order=1 needs a real numeric volume; got dtype {volume.dtype}")
    if volume.dtype.kind == "f":
      bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
      if bad:
        raise ValueError(
            f"volume (shape {volume.shape}) has {bad} non-finite (NaN / inf) values; "
            f"linear interpolation would spread them")
  out_dtype = np.float32 if order == 1 else volume.dtype

  shape = tuple(int(n) for n in volume.shape[:3])
  src, dst, new_spacing = _affines(spacing, target_spacing)
  out_shape = _shape_from_affines(shape, src, dst)
  # spatial_resample's no-op test: src ~ dst or xform ~ identity, and the same shape.
  xform = np.linalg.solve(src, dst)
  if out_shape == shape and (
      np.allclose(src, dst, rtol=_ALLCLOSE_RTOL, atol=AFFINE_TOL)
      or np.allclose(xform, np.eye(4), rtol=_ALLCLOSE_RTOL, atol=AFFINE_TOL)):
    return np.array(volume, dtype=out_dtype, copy=True), spacing

  coords = _source_coordinates(shape, out_shape, src, dst)
  if order == 0:
    index = [np.rint(x).astype(np.intp) for x in coords]
    return volume[np.ix_(*index)], new_spacing

  out = np.asarray(volume, dtype=np.float32)
  # Shrink first: the axis with the smallest output / input ratio goes first.
  for axis in sorted(range(3), key=lambda k: out_shape[k] / shape[k]):
    out = _lerp_axis(out, axis, coords[axis])
  if out is volume or np.shares_memory(out, volume):
    out = out.copy()
  return out, new_spacing
