"""Rotation prediction: rotate each volume by k * 90 degrees and keep k as its label.

The Swin-UNETR self-supervised recipe (Tang et al. 2022, "Self-Supervised Pre-Training of Swin
Transformers for 3D Medical Image Analysis", Sec. 3.2; research-contributions
``SwinUNETR/Pretrain/utils/ops.py`` ``rot_rand``) draws k uniformly from {0, 1, 2, 3} per sample
and rotates its ``(C, x, y, z)`` tensor with ``torch.rot90(k, dims=(2, 3))``: in the (y, z) plane,
from y towards z. jaxmed volumes read from NIfTI are ``(D, H, W) = (z, y, x)``
(`jaxmed.data.nifti`), so that plane is spatial axes ``(1, 0)`` here, the default.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from jaxmed.pretext._grid import check_images

NUM_ROTATIONS = 4


def _rotation_axes(images, axes, fn: str) -> tuple[int, int]:
  """Array axes of the spatial ``axes`` pair of ``images`` ``(N, *S, C)``, validated."""
  check_images(images)
  nd = len(images.shape) - 2
  try:
    a0, a1 = (operator.index(a) for a in axes)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: axes must be two spatial axis indices; got {axes!r}") from None
  if not (0 <= a0 < nd and 0 <= a1 < nd) or a0 == a1:
    raise ValueError(f"{fn}: axes must be two distinct spatial axes in [0, {nd}) of images "
                     f"{tuple(images.shape)}; got {tuple(axes)}")
  if images.shape[1 + a0] != images.shape[1 + a1]:
    raise ValueError(f"{fn}: the rotation plane must be square (static shapes); images "
                     f"{tuple(images.shape)} have sizes {images.shape[1 + a0]} and "
                     f"{images.shape[1 + a1]} along axes {tuple(axes)}")
  return 1 + a0, 1 + a1


def rotate90(images, k, *, axes=(1, 0)) -> jax.Array:
  """Rotates each image by its own ``k[i] * 90`` degrees, from ``axes[0]`` towards ``axes[1]``.

  ``rotate90(x, k)[i] == np.rot90(x[i], k[i], axes=axes)`` (``x[i]`` is ``(*S, C)``, so
  spatial axis ``a`` is its axis ``a``).

  Args:
    images: ``(N, *S, C)``, the two rotated spatial sizes equal.
    k: ``(N,)`` integers (taken modulo 4).
    axes: two distinct spatial axis indices (0-based over ``S``); default ``(1, 0)``, the
      reference's (y, z) plane for ``(z, y, x)`` volumes.

  Returns:
    ``(N, *S, C)``, same dtype.

  Raises:
    ValueError: ``images`` not ``(N, *S, C)``, bad or non-square ``axes``, ``k`` not ``(N,)``.
  """
  fn = "rotate90"
  a0, a1 = _rotation_axes(images, axes, fn)
  if tuple(getattr(k, "shape", ())) != (images.shape[0],):
    raise ValueError(f"{fn}: k must have shape (N,) = ({images.shape[0]},); got "
                     f"{tuple(getattr(k, 'shape', ()))}")
  images = jnp.asarray(images)
  k = jnp.mod(jnp.asarray(k), NUM_ROTATIONS).reshape((-1,) + (1,) * (images.ndim - 1))
  out = images
  for j in range(1, NUM_ROTATIONS):
    out = jnp.where(k == j, jnp.rot90(images, j, axes=(a0, a1)), out)
  return out


def random_rotation90(key, images, *, axes=(1, 0)) -> tuple[jax.Array, jax.Array]:
  """``rot_rand``: each image rotated by ``k * 90`` degrees with ``k`` uniform in {0, 1, 2, 3}.

  Args:
    key: PRNG key.
    images: ``(N, *S, C)``; the sizes along ``axes`` equal.
    axes: the rotation plane, see `rotate90`.

  Returns:
    ``(rotated (N, *S, C), k (N,) int32)``: the rotation labels of the 4-class task.

  Raises:
    ValueError: as `rotate90`.
  """
  _rotation_axes(images, axes, "random_rotation90")
  k = jax.random.randint(key, (images.shape[0],), 0, NUM_ROTATIONS, dtype=jnp.int32)
  return rotate90(images, k, axes=axes), k
