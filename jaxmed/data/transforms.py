"""JAX data augmentations for 2D images and 3D volumes (jit/vmap compatible, static shapes).

All transforms act on ONE example (no batch axis) and are meant to run inside a jitted train
step, vmapped over the batch (see `Augment.batch`). Layout is channels-last: a 2D image is
``(H, W, C)``, a 3D volume ``(D, H, W, C)``; the number of spatial dims is inferred from
``image.ndim`` (3 -> 2D, 4 -> 3D). A label is ``(H, W)`` / ``(D, H, W)`` (integer label map, or
a bool / float mask) with the image's spatial shape.

Return convention:
  * Spatial transforms (`random_flip`, `random_rot90`, `random_crop`, `random_affine`,
    `affine_transform`, `elastic_deform`, `resample`) and `Augment.__call__` / `Augment.batch`
    ALWAYS return an ``(image, label)`` tuple; when no label is given, the label slot is None.
  * Intensity transforms (`random_gamma`, `gaussian_noise`, `random_scale_intensity`,
    `random_shift_intensity`) take no label and return the image.

Resampling (affine / elastic) uses `jax.scipy.ndimage.map_coordinates`: order 1 for images,
order 0 (nearest neighbour) for labels, so label values are never interpolated. Points outside
the input read as 0; with ``mode="constant"`` JAX interpolates linearly towards that 0 over the
one voxel beyond each edge, which equals SciPy's ``mode="grid-constant"`` (not SciPy's
``"constant"``, which cuts off at the edge).

Dtypes are preserved: interpolation runs in (at least) float32 and is cast back (rounded and
clipped for integer images). Intensity transforms require floating-point images. Probability
gates sample a bool and select with `jax.lax.cond` / `jnp.where`; a gate that does not fire
returns the input exactly. Shape arguments (`size`, `axes`) and probabilities are static Python
values; all validation happens on static shapes, before tracing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------- validation


def _spatial_ndim(image, fn: str) -> int:
  """2 for ``(H, W, C)``, 3 for ``(D, H, W, C)``; ValueError otherwise."""
  if image.ndim not in (3, 4):
    raise ValueError(
        f"{fn}: image must be (H, W, C) or (D, H, W, C); got shape {tuple(image.shape)}")
  return image.ndim - 1


def _check(image, label, fn: str):
  """Converts to jnp arrays and checks that the label matches the image's spatial shape."""
  image = jnp.asarray(image)
  nd = _spatial_ndim(image, fn)
  if label is not None:
    label = jnp.asarray(label)
    if tuple(label.shape) != tuple(image.shape[:nd]):
      raise ValueError(
          f"{fn}: label shape {tuple(label.shape)} must equal the image spatial shape "
          f"{tuple(image.shape[:nd])} (image shape {tuple(image.shape)})")
  return image, label, nd


def _check_p(p, fn: str) -> float:
  try:
    p = float(p)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: p must be a number in [0, 1]; got {p!r}") from None
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{fn}: p must be in [0, 1]; got {p}")
  return p


def _check_range(value, name: str, fn: str, *, positive: bool = False) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be a (low, high) pair; got {value!r}") from None
  if lo > hi or (positive and lo <= 0.0) or (not positive and lo < 0.0):
    bound = "0 < low" if positive else "0 <= low"
    raise ValueError(f"{fn}: {name} must satisfy {bound} <= high; got {value!r}")
  return lo, hi


def _spatial_axis(axis, nd: int, name: str, fn: str) -> int:
  """Normalises a spatial axis index.

  Non-negative values are spatial indices (equal to image axes, channels being last); negative
  values count from the end of the image array, so -1 is the channel axis (invalid) and -2 the
  last spatial axis.
  """
  a = int(axis)
  if a < 0:
    a += nd + 1
  if not 0 <= a < nd:
    raise ValueError(
        f"{fn}: {name} entry {axis} is not a spatial axis of a {nd}D image "
        f"(valid: 0..{nd - 1}, or -{nd + 1}..-2 counted from the end of the image array)")
  return a


def _gate(key, p: float, fn, image, label):
  """Applies ``fn(image, label)`` with probability p; the input is returned exactly otherwise."""
  if p >= 1.0:
    return fn(image, label)
  if p <= 0.0:
    return image, label
  apply = jax.random.bernoulli(key, p)
  return lax.cond(apply, lambda ops: fn(*ops), lambda ops: ops, (image, label))


def _flat_random(sampler, key, shape, dtype, *args):
  """Draws ``prod(shape)`` samples flat and reshapes.

  Equivalent in distribution to sampling `shape` directly, but XLA:CPU compiles the
  (partitionable) threefry generator over >2-D shapes very slowly; 1-D is fast everywhere.
  """
  return sampler(key, (math.prod(shape),), dtype, *args).reshape(shape)


# ----------------------------------------------------------------------------- permutations


def random_flip(key, image, label=None, *, axes=None, p: float = 0.5):
  """Flips each of `axes` independently with probability p.

  Args:
    key: PRNG key.
    image: ``(H, W, C)`` or ``(D, H, W, C)``.
    label: optional ``(H, W)`` / ``(D, H, W)``.
    axes: spatial axes to consider (see module docs for negative indices); default all.
    p: per-axis flip probability.

  Returns:
    ``(image, label)``, same shapes and dtypes.
  """
  image, label, nd = _check(image, label, "random_flip")
  p = _check_p(p, "random_flip")
  axes = tuple(range(nd)) if axes is None else tuple(
      _spatial_axis(a, nd, "axes", "random_flip") for a in axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"random_flip: axes must be distinct; got {axes}")
  if not axes:
    return image, label
  flips = jax.random.bernoulli(key, p, (len(axes),))
  for i, a in enumerate(axes):
    image = jnp.where(flips[i], jnp.flip(image, a), image)
    if label is not None:
      label = jnp.where(flips[i], jnp.flip(label, a), label)
  return image, label


def random_rot90(key, image, label=None, *, axes=(-3, -2)):
  """Rotates by k * 90 degrees, k uniform in {0, 1, 2, 3}, in the plane of two spatial axes.

  Args:
    key: PRNG key.
    image: ``(H, W, C)`` or ``(D, H, W, C)``.
    label: optional ``(H, W)`` / ``(D, H, W)``.
    axes: two distinct spatial axes of equal size. Non-negative values are spatial indices;
      negative ones count from the end of the image array, so the default ``(-3, -2)`` is the
      ``(H, W)`` plane for both 2D and 3D images. Rotation direction as in `np.rot90`.

  Returns:
    ``(image, label)``, same shapes and dtypes.
  """
  image, label, nd = _check(image, label, "random_rot90")
  if len(tuple(axes)) != 2:
    raise ValueError(f"random_rot90: axes must name two spatial axes; got {axes!r}")
  a0, a1 = (_spatial_axis(a, nd, "axes", "random_rot90") for a in axes)
  if a0 == a1:
    raise ValueError(f"random_rot90: axes must be distinct; got {axes!r}")
  if image.shape[a0] != image.shape[a1]:
    raise ValueError(
        f"random_rot90: axes {tuple(axes)} must have equal size for a static output shape; "
        f"image shape {tuple(image.shape)} has sizes {image.shape[a0]} and {image.shape[a1]}")
  k = jax.random.randint(key, (), 0, 4)

  def branch(j):
    return lambda ops: jax.tree.map(lambda x: jnp.rot90(x, j, axes=(a0, a1)), ops)

  return lax.switch(k, [branch(j) for j in range(4)], (image, label))


def random_crop(key, image, label=None, *, size: Sequence[int]):
  """Random crop of spatial shape `size`; each offset uniform over the valid positions.

  Args:
    key: PRNG key.
    image: ``(H, W, C)`` or ``(D, H, W, C)``.
    label: optional ``(H, W)`` / ``(D, H, W)``.
    size: crop size per spatial axis, each in ``[1, dim]``.

  Returns:
    ``(image (*size, C), label size)``.
  """
  image, label, nd = _check(image, label, "random_crop")
  size = tuple(int(s) for s in size)
  spatial = tuple(image.shape[:nd])
  if len(size) != nd or any(not 1 <= s <= n for s, n in zip(size, spatial)):
    raise ValueError(
        f"random_crop: size {size} must have {nd} entries, each in [1, dim], for image shape "
        f"{tuple(image.shape)}")
  keys = jax.random.split(key, nd)
  starts = [jax.random.randint(keys[i], (), 0, n - s + 1) for i, (s, n) in
            enumerate(zip(size, spatial))]
  zero = jnp.zeros((), starts[0].dtype)
  image = lax.dynamic_slice(image, (*starts, zero), (*size, image.shape[-1]))
  if label is not None:
    label = lax.dynamic_slice(label, starts, size)
  return image, label


# ----------------------------------------------------------------------------- resampling


def _compute_dtype(dtype):
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.float32


def _cast_back(x, dtype):
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    x = jnp.clip(jnp.round(x), info.min, info.max)
  return x.astype(dtype)


def resample(image, label=None, *, coords):
  """Samples image and label at voxel coordinates (output grid given by `coords`).

  ``out[x] = image[coords[:, x]]`` with linear interpolation for the image and nearest neighbour
  for the label; coordinates outside the input read as 0 (SciPy ``mode="grid-constant"``).

  Args:
    image: ``(*S, C)`` with ``len(S)`` in (2, 3).
    label: optional, shape ``S``.
    coords: ``(len(S), *S_out)`` float voxel coordinates into the input.

  Returns:
    ``(image (*S_out, C), label S_out)`` with the input dtypes.
  """
  image, label, nd = _check(image, label, "resample")
  coords = jnp.asarray(coords)
  if coords.ndim != nd + 1 or coords.shape[0] != nd:
    raise ValueError(
        f"resample: coords must be ({nd}, *spatial_out) for image shape {tuple(image.shape)}; "
        f"got {tuple(coords.shape)}")
  ctype = _compute_dtype(image.dtype)
  coords = coords.astype(ctype)
  coord_list = [coords[i] for i in range(nd)]

  def sample(channel):
    return jax.scipy.ndimage.map_coordinates(channel, coord_list, order=1, mode="constant",
                                             cval=0.0)

  out = jax.vmap(sample, in_axes=-1, out_axes=-1)(image.astype(ctype))
  out = _cast_back(out, image.dtype)
  if label is not None:
    src = label.astype(jnp.uint8) if label.dtype == jnp.bool_ else label
    lab = jax.scipy.ndimage.map_coordinates(src, coord_list, order=0, mode="constant", cval=0)
    label = lab.astype(label.dtype)
  return out, label


def _grid(spatial: tuple[int, ...], dtype) -> list[Array]:
  return list(jnp.meshgrid(*[jnp.arange(n, dtype=dtype) for n in spatial], indexing="ij"))


# Rotation planes of the three 3D angles: angle i rotates in plane _PLANES_3D[i] (about axis i).
_PLANES_3D = ((1, 2), (0, 2), (0, 1))


def _plane_rotation(theta, nd: int, plane: tuple[int, int]) -> Array:
  c, s = jnp.cos(theta), jnp.sin(theta)
  p, q = plane
  r = jnp.eye(nd, dtype=theta.dtype)
  r = r.at[p, p].set(c).at[q, q].set(c).at[p, q].set(-s).at[q, p].set(s)
  return r


def _rotation_matrix(angles, nd: int) -> Array:
  """Rotation matrix from angles in radians: 2D ``(1,)``; 3D ``(3,)``, ``R = R0 @ R1 @ R2``."""
  if nd == 2:
    return _plane_rotation(angles[0], 2, (0, 1))
  r = [_plane_rotation(angles[i], 3, _PLANES_3D[i]) for i in range(3)]
  # Plain products, not matmuls: keeps full float32 precision on accelerators (no TF32).
  def mul(a, b):
    return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)
  return mul(mul(r[0], r[1]), r[2])


def affine_transform(image, label=None, *, angles, scale=1.0):
  """Deterministic rotation about the centre plus isotropic scaling, one resampling pass.

  Conventions. Angles are in degrees. 2D: one angle, rotating in the ``(0, 1)`` (H, W) plane.
  3D: three angles ``(a0, a1, a2)`` rotating in the planes ``(1, 2)``, ``(0, 2)`` and ``(0, 1)``
  (i.e. about axes 0, 1, 2), composed as ``R = R0 @ R1 @ R2``. A plane rotation by +90 degrees in
  plane ``(p, q)`` equals ``np.rot90(x, 1, axes=(p, q))`` for a square plane. ``scale > 1``
  magnifies the content. With centre ``c = (shape - 1) / 2`` the output is

    ``out[o] = in[c + R^T (o - c) / scale]``,

  i.e. ``scipy.ndimage.affine_transform(in, M, offset=c - M c, order=1, mode="grid-constant")``
  with ``M = R^T / scale`` (per channel; order 0 for the label).

  Args:
    image: ``(H, W, C)`` or ``(D, H, W, C)``.
    label: optional ``(H, W)`` / ``(D, H, W)``.
    angles: 2D: scalar or ``(1,)``; 3D: ``(3,)``. May be traced.
    scale: scalar zoom factor (> 0). May be traced.

  Returns:
    ``(image, label)``, same shapes and dtypes.
  """
  image, label, nd = _check(image, label, "affine_transform")
  ctype = _compute_dtype(image.dtype)
  angles = jnp.asarray(angles, ctype)
  n_angles = 1 if nd == 2 else 3
  if angles.size != n_angles or (angles.ndim > 1):
    raise ValueError(
        f"affine_transform: a {nd}D image needs {n_angles} angle(s); got angles of shape "
        f"{tuple(angles.shape)}")
  scale = jnp.asarray(scale, ctype)
  if scale.ndim != 0:
    raise ValueError(f"affine_transform: scale must be a scalar; got shape {scale.shape}")
  m = _rotation_matrix(jnp.deg2rad(angles.reshape(n_angles)), nd).T / scale
  spatial = tuple(image.shape[:nd])
  centre = [(n - 1) / 2.0 for n in spatial]
  rel = [g - c for g, c in zip(_grid(spatial, ctype), centre)]
  coords = jnp.stack([sum(m[i, j] * rel[j] for j in range(nd)) + centre[i] for i in range(nd)])
  return resample(image, label, coords=coords)


def random_affine(key, image, label=None, *, max_rotation: float = 15.0,
                  scale_range: tuple[float, float] | None = (0.85, 1.25), p: float = 1.0):
  """Random rotation about the centre + isotropic scaling (see `affine_transform`).

  Each angle (one in 2D, three in 3D) is uniform in ``[-max_rotation, max_rotation]`` degrees;
  the scale is uniform in `scale_range` (None: no scaling). Applied with probability p; when not
  applied the input is returned exactly.

  Returns:
    ``(image, label)``, same shapes and dtypes.
  """
  image, label, nd = _check(image, label, "random_affine")
  p = _check_p(p, "random_affine")
  max_rotation = float(max_rotation)
  if max_rotation < 0:
    raise ValueError(f"random_affine: max_rotation must be >= 0; got {max_rotation}")
  lo, hi = (1.0, 1.0) if scale_range is None else _check_range(
      scale_range, "scale_range", "random_affine", positive=True)
  gate_key, angle_key, scale_key = jax.random.split(key, 3)
  n_angles = 1 if nd == 2 else 3
  angles = jax.random.uniform(angle_key, (n_angles,), minval=-max_rotation, maxval=max_rotation)
  scale = jax.random.uniform(scale_key, (), minval=lo, maxval=hi)

  def fn(img, lab):
    return affine_transform(img, lab, angles=angles, scale=scale)

  return _gate(gate_key, p, fn, image, label)


def gaussian_smooth(x, sigma: float, *, axes=None, truncate: float = 4.0):
  """Separable Gaussian filter along `axes` (default all) with reflect boundaries.

  Matches ``scipy.ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)`` on the
  chosen axes: per axis, symmetric padding then a 1D ``VALID`` convolution at HIGHEST precision.

  Args:
    x: any array (float).
    sigma: standard deviation in samples (> 0), static.
    axes: axes to smooth; default all.
    truncate: kernel radius in standard deviations.

  Returns:
    The smoothed array, same shape and dtype.
  """
  x = jnp.asarray(x)
  sigma = float(sigma)
  if sigma <= 0:
    raise ValueError(f"gaussian_smooth: sigma must be > 0; got {sigma}")
  axes = tuple(range(x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  weights = np.exp(-0.5 * (t / sigma) ** 2)
  weights /= weights.sum()
  dtype = x.dtype
  ctype = _compute_dtype(dtype)
  kernel = jnp.asarray(weights, ctype)[None, None, :]  # (out_channels, in_channels, width)
  x = x.astype(ctype)
  for a in axes:
    pad = [(0, 0)] * x.ndim
    pad[a] = (radius, radius)
    xp = jnp.moveaxis(jnp.pad(x, pad, mode="symmetric"), a, -1)
    rows = xp.reshape(-1, 1, xp.shape[-1])  # (lines, 1, n + 2 * radius)
    out = lax.conv_general_dilated(rows, kernel, (1,), "VALID",
                                   precision=lax.Precision.HIGHEST)
    x = jnp.moveaxis(out.reshape(*xp.shape[:-1], x.shape[a]), -1, a)
  return x.astype(dtype)


def elastic_deform(key, image, label=None, *, alpha: float = 8.0, sigma: float = 3.0,
                   p: float = 1.0):
  """Random smooth elastic deformation.

  Each displacement component is uniform noise in [-1, 1] smoothed by `gaussian_smooth` (sigma
  in voxels) and rescaled so that its RMS over the image is `alpha` voxels; the image is sampled
  at ``x + displacement(x)`` (linear; label nearest). Applied with probability p.

  Returns:
    ``(image, label)``, same shapes and dtypes.
  """
  image, label, nd = _check(image, label, "elastic_deform")
  p = _check_p(p, "elastic_deform")
  alpha, sigma = float(alpha), float(sigma)
  if alpha < 0:
    raise ValueError(f"elastic_deform: alpha must be >= 0; got {alpha}")
  if sigma <= 0:
    raise ValueError(f"elastic_deform: sigma must be > 0; got {sigma}")
  spatial = tuple(image.shape[:nd])
  ctype = _compute_dtype(image.dtype)
  gate_key, noise_key = jax.random.split(key)

  def fn(img, lab):
    noise = _flat_random(jax.random.uniform, noise_key, (nd, *spatial), ctype, -1.0, 1.0)
    field = gaussian_smooth(noise, sigma, axes=tuple(range(1, nd + 1)))
    rms = jnp.sqrt(jnp.mean(jnp.square(field), axis=tuple(range(1, nd + 1)), keepdims=True))
    disp = alpha * field / jnp.maximum(rms, jnp.finfo(ctype).tiny)
    coords = jnp.stack(_grid(spatial, ctype)) + disp
    return resample(img, lab, coords=coords)

  return _gate(gate_key, p, fn, image, label)


# ----------------------------------------------------------------------------- intensity


def _check_float_image(image, fn: str):
  image = jnp.asarray(image)
  _spatial_ndim(image, fn)
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"{fn}: image must be floating point; got dtype {image.dtype}")
  return image


def random_gamma(key, image, *, gamma_range: tuple[float, float] = (0.7, 1.5), p: float = 1.0):
  """nnU-Net style gamma: per channel rescale to [0, 1] by min/max, ``x ** gamma``, rescale back.

  One gamma is shared by all channels and sampled LOG-uniformly in `gamma_range`, so gamma and
  1 / gamma are equally likely for a range symmetric in log space. Per-channel min and max are
  preserved; constant channels are returned unchanged. Applied with probability p.

  Args:
    key: PRNG key.
    image: float ``(H, W, C)`` or ``(D, H, W, C)``.
    gamma_range: ``(low, high)`` with ``0 < low <= high``.
    p: probability of applying.

  Returns:
    The image, same shape and dtype.
  """
  image = _check_float_image(image, "random_gamma")
  p = _check_p(p, "random_gamma")
  lo, hi = _check_range(gamma_range, "gamma_range", "random_gamma", positive=True)
  gate_key, gamma_key = jax.random.split(key)
  ctype = _compute_dtype(image.dtype)
  log_gamma = jax.random.uniform(gamma_key, (), ctype, math.log(lo), math.log(hi))
  gamma = jnp.exp(log_gamma)

  def fn(img, _):
    x = img.astype(ctype)
    axes = tuple(range(img.ndim - 1))
    mn = jnp.min(x, axis=axes, keepdims=True)
    mx = jnp.max(x, axis=axes, keepdims=True)
    rng = mx - mn
    ok = rng > 0
    x01 = jnp.clip((x - mn) / jnp.where(ok, rng, 1.0), 0.0, 1.0)
    out = jnp.where(ok, jnp.power(x01, gamma) * rng + mn, x)
    return out.astype(img.dtype), None

  return _gate(gate_key, p, fn, image, None)[0]


def gaussian_noise(key, image, *, std=(0.0, 0.1), p: float = 1.0):
  """Additive zero-mean Gaussian noise, std uniform in `std` = ``(low, high)``.

  A single number is a fixed std. Applied with probability p.

  Args:
    key: PRNG key.
    image: float ``(H, W, C)`` or ``(D, H, W, C)``.
    std: ``(low, high)`` with ``0 <= low <= high``, or a number.
    p: probability of applying.

  Returns:
    The image, same shape and dtype.
  """
  image = _check_float_image(image, "gaussian_noise")
  p = _check_p(p, "gaussian_noise")
  if np.ndim(std) == 0:
    std = (std, std)
  lo, hi = _check_range(std, "std", "gaussian_noise")
  gate_key, std_key, noise_key = jax.random.split(key, 3)
  ctype = _compute_dtype(image.dtype)

  def fn(img, _):
    s = jax.random.uniform(std_key, (), ctype, lo, hi)
    noise = _flat_random(jax.random.normal, noise_key, img.shape, ctype)
    return (img.astype(ctype) + s * noise).astype(img.dtype), None

  return _gate(gate_key, p, fn, image, None)[0]


def _check_magnitude(value, name: str, fn: str) -> float:
  """``value`` as a finite float >= 0; ValueError naming ``name`` otherwise."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be a number >= 0; got {value!r}") from None
  if not (math.isfinite(v) and v >= 0.0):
    raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {value!r}")
  return v


def random_scale_intensity(key, image, *, factor: float = 0.1, p: float = 1.0):
  """MONAI ``RandScaleIntensity``: ``image * (1 + u)``, u uniform in ``[-factor, factor]``.

  One u is drawn per call and shared by all channels (MONAI's default ``channel_wise=False``).
  Applied with probability p.

  Args:
    key: PRNG key.
    image: float ``(H, W, C)`` or ``(D, H, W, C)``.
    factor: the largest relative change, ``>= 0`` (0 returns the image unchanged).
    p: probability of applying.

  Returns:
    The image, same shape and dtype.
  """
  return _uniform_intensity(key, image, factor, p, "factor", "random_scale_intensity",
                            lambda x, u: x * (1 + u))


def random_shift_intensity(key, image, *, offset: float = 0.1, p: float = 1.0):
  """MONAI ``RandShiftIntensity``: ``image + u``, u uniform in ``[-offset, offset]``.

  One u is drawn per call and shared by all channels (MONAI's default ``channel_wise=False``).
  Applied with probability p.

  Args:
    key: PRNG key.
    image: float ``(H, W, C)`` or ``(D, H, W, C)``.
    offset: the largest absolute shift, ``>= 0`` (0 returns the image unchanged).
    p: probability of applying.

  Returns:
    The image, same shape and dtype.
  """
  return _uniform_intensity(key, image, offset, p, "offset", "random_shift_intensity",
                            lambda x, u: x + u)


def _uniform_intensity(key, image, magnitude, p, name: str, fn_name: str, combine):
  """``combine(image, u)`` with one u ~ U(-magnitude, magnitude) for all channels, with
  probability p; the image unchanged when ``magnitude`` is 0."""
  image = _check_float_image(image, fn_name)
  p = _check_p(p, fn_name)
  magnitude = _check_magnitude(magnitude, name, fn_name)
  if magnitude == 0.0:
    return image
  gate_key, u_key = jax.random.split(key)
  ctype = _compute_dtype(image.dtype)

  def fn(img, _):
    u = jax.random.uniform(u_key, (), ctype, -magnitude, magnitude)
    return combine(img.astype(ctype), u).astype(img.dtype), None

  return _gate(gate_key, p, fn, image, None)[0]


# ----------------------------------------------------------------------------- composition


def _to_tuple(value):
  if isinstance(value, (list, tuple)):
    return tuple(_to_tuple(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True)
class Augment:
  """Composed augmentation pipeline (a static, hashable config).

  Applied per example in the order: crop, affine (rotation + scale), elastic, flip, rot90, gamma,
  noise, intensity scale, intensity shift (the last four on the image only). Each step draws
  from its own fixed sub-key, so enabling one step does not change the randomness of the others.

  Attributes:
    flip: random flips of every spatial axis (p = 0.5 each).
    rot90: random k * 90 degree rotation in the (H, W) plane (H must equal W).
    crop_size: random crop size per spatial axis; None disables.
    rotation: max rotation in degrees for the affine step; 0 disables rotation.
    scale: ``(low, high)`` isotropic scale range; None disables scaling.
    affine_p: probability of the affine step (runs if rotation > 0 or scale is set).
    elastic_alpha: elastic displacement RMS in voxels; 0 disables.
    elastic_sigma: elastic smoothing sigma in voxels.
    elastic_p: probability of the elastic step.
    gamma: ``(low, high)`` gamma range; None disables.
    gamma_p: probability of the gamma step.
    noise_std: max Gaussian noise std (drawn uniformly in [0, noise_std]); 0 disables.
    noise_p: probability of the noise step.
    intensity_scale: MONAI ``RandScaleIntensity`` factor f: the image times ``1 + u``, u uniform
      in [-f, f], one u per example for all channels; 0 disables.
    intensity_scale_p: probability of the intensity scale step.
    intensity_shift: MONAI ``RandShiftIntensity`` offset o: the image plus u, u uniform in
      [-o, o], one u per example for all channels; 0 disables.
    intensity_shift_p: probability of the intensity shift step.
  """

  flip: bool = True
  rot90: bool = False
  crop_size: tuple[int, ...] | None = None
  rotation: float = 0.0
  scale: tuple[float, float] | None = None
  affine_p: float = 0.2
  elastic_alpha: float = 0.0
  elastic_sigma: float = 3.0
  elastic_p: float = 0.2
  gamma: tuple[float, float] | None = None
  gamma_p: float = 0.3
  noise_std: float = 0.0
  noise_p: float = 0.15
  intensity_scale: float = 0.0
  intensity_scale_p: float = 0.1
  intensity_shift: float = 0.0
  intensity_shift_p: float = 0.1

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _to_tuple(getattr(self, f.name)))
    if self.crop_size is not None and (
        not self.crop_size or any(int(s) < 1 for s in self.crop_size)):
      raise ValueError(f"Augment: crop_size must be positive ints; got {self.crop_size!r}")
    for name in ("affine_p", "elastic_p", "gamma_p", "noise_p", "intensity_scale_p",
                 "intensity_shift_p"):
      _check_p(getattr(self, name), f"Augment.{name}")
    for name in ("intensity_scale", "intensity_shift"):
      object.__setattr__(self, name, _check_magnitude(getattr(self, name), name, "Augment"))
    for name in ("rotation", "elastic_alpha", "noise_std"):
      if float(getattr(self, name)) < 0:
        raise ValueError(f"Augment: {name} must be >= 0; got {getattr(self, name)!r}")
    if float(self.elastic_sigma) <= 0:
      raise ValueError(f"Augment: elastic_sigma must be > 0; got {self.elastic_sigma!r}")
    if self.scale is not None:
      _check_range(self.scale, "scale", "Augment", positive=True)
    if self.gamma is not None:
      _check_range(self.gamma, "gamma", "Augment", positive=True)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | Any) -> Augment:
    """Builds from a mapping / `ml_collections.ConfigDict` with any subset of the fields.

    Lists become tuples; unknown keys raise a ValueError naming them.
    """
    if hasattr(cfg, "to_dict"):
      cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
      raise ValueError(f"Augment.from_config: cfg must be a mapping; got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise ValueError(
          f"Augment.from_config: unknown keys {unknown}; valid keys are {sorted(known)}")
    return cls(**{k: _to_tuple(v) for k, v in cfg.items()})

  def __call__(self, key, image, label=None):
    """Augments one example ``(*S, C)`` (+ label ``S``); returns ``(image, label)``."""
    image, label, _ = _check(image, label, "Augment")
    keys = jax.random.split(key, 7)
    if self.crop_size is not None:
      image, label = random_crop(keys[0], image, label, size=self.crop_size)
    if self.rotation > 0 or self.scale is not None:
      image, label = random_affine(keys[1], image, label, max_rotation=self.rotation,
                                   scale_range=self.scale, p=self.affine_p)
    if self.elastic_alpha > 0:
      image, label = elastic_deform(keys[2], image, label, alpha=self.elastic_alpha,
                                    sigma=self.elastic_sigma, p=self.elastic_p)
    if self.flip:
      image, label = random_flip(keys[3], image, label)
    if self.rot90:
      image, label = random_rot90(keys[4], image, label)
    if self.gamma is not None:
      image = random_gamma(keys[5], image, gamma_range=self.gamma, p=self.gamma_p)
    if self.noise_std > 0:
      image = gaussian_noise(keys[6], image, std=(0.0, self.noise_std), p=self.noise_p)
    # Keys folded in rather than split from `key`, so the steps above keep their randomness.
    if self.intensity_scale > 0:
      image = random_scale_intensity(jax.random.fold_in(key, 7), image,
                                     factor=self.intensity_scale, p=self.intensity_scale_p)
    if self.intensity_shift > 0:
      image = random_shift_intensity(jax.random.fold_in(key, 8), image,
                                     offset=self.intensity_shift, p=self.intensity_shift_p)
    return image, label

  def batch(self, key, images, labels=None):
    """Augments ``(B, *S, C)`` (+ labels ``(B, *S)``) with one key per example.

    Returns:
      ``(images, labels)``; labels is None when not given.
    """
    images = jnp.asarray(images)
    if images.ndim not in (4, 5):
      raise ValueError(
          f"Augment.batch: images must be (B, H, W, C) or (B, D, H, W, C); got shape "
          f"{tuple(images.shape)}")
    if labels is not None:
      labels = jnp.asarray(labels)
      if tuple(labels.shape) != tuple(images.shape[:-1]):
        raise ValueError(
            f"Augment.batch: labels shape {tuple(labels.shape)} must equal images shape without "
            f"channels {tuple(images.shape[:-1])}")
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(self.__call__)(keys, images, labels)
