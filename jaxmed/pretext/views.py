"""Augmented views: random resized crops, SwAV multi-crop and SimSiam two-view pairs, and their
grey-level colour jitter and random Gaussian blur (`color_jitter`, `random_gaussian_blur`).

SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", Sec. 3.2 "multi-crop"; facebookresearch/swav `src/multicropdataset.py`) trains on
``nmb_crops = [2, 6]`` views per image: 2 global crops of ``size 224`` with
``RandomResizedCrop(scale=(0.14, 1))`` and 6 local crops of ``size 96`` with scale
``(0.05, 0.14)``, each followed by a horizontal flip (p = 0.5) and colour / blur augmentations.
SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning") uses two independently
augmented views of every image.

Every function is pure JAX with static shapes, usable inside `jax.jit`, with explicit `jax.random`
keys. Layout is channels-last: a batch of 2D images is ``(N, H, W, C)``, of 3D volumes
``(N, D, H, W, C)``; the number of spatial dims is inferred from ``image.ndim``. The low-level
`sample_crop_box` and `resized_crop` act on ONE example (no batch axis) like
`jaxmed.data.transforms`; `random_resized_crop`, `multi_crop` and `two_views` act on a batch,
with one key per example (and per view). All static arguments are validated in Python before
tracing; errors name the argument. The crop / flip kernels are jitted internally with their
static arguments, so eager calls compile once per configuration; under an outer `jax.jit` they
are simply inlined.

Crop geometry follows torchvision's ``RandomResizedCrop`` (``get_params`` + ``resized_crop``):

  * Area (3D: volume) fraction ``s ~ U(scale)``; aspect ratio ``r`` log-uniform in ``ratio``;
    side lengths ``round(sqrt(A s r))`` (W) and ``round(sqrt(A s / r))`` (H), so ``r = w / h``.
    In nD the ratios are taken against the FIRST spatial axis: ``r_k = side_k / side_0`` for
    ``k = 1 .. nd-1``, each drawn independently and log-uniformly in ``ratio``, and
    ``side_0 = (V s / prod r_k) ** (1 / nd)``. In 2D that is exactly torchvision (r = W / H); in
    3D, H/D and W/D are in ``ratio`` while W/H = r_2 / r_1 spans ``(lo / hi, hi / lo)``, i.e.
    ``(9/16, 16/9)`` for the default ratio. Pass ``ratio=(1, 1)`` for cubic crops.
  * Static-shape rejection sampling: torchvision draws up to 10 candidate boxes in turn and takes
    the first that fits inside the image (each side in ``[1, dim]``). Here all 10 candidates are
    drawn at once and the first one that fits is selected, which is the same distribution. When
    none fits, the fallback is torchvision's central crop: the largest box whose ratios are the
    image's own clamped into ``ratio``, centred (computed statically; see `_fallback_box`). The
    offset of a fitting box is uniform over the integer positions that keep it inside the image.
  * Resizing samples a ``size`` grid inside the box with (bi/tri)linear interpolation and
    half-pixel centres (PyTorch ``interpolate(..., align_corners=False)`` on the cropped box, edge
    values replicated). No antialiasing: this matches torchvision on tensors with
    ``antialias=False``; PIL (which SwAV uses) low-pass filters when a crop is shrunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.data.transforms import Augment, random_flip, resample

Array = jax.Array

# torchvision's RandomResizedCrop.get_params tries this many candidate boxes before falling back.
NUM_ATTEMPTS = 10

# Fields accepted by `multi_crop_from_config` (keyword arguments of `multi_crop`).
MULTI_CROP_FIELDS = ("num_global", "num_local", "global_size", "local_size", "global_scale",
                     "local_scale", "ratio", "flip")


# ----------------------------------------------------------------------------- validation


def _check_batch(image, fn: str) -> tuple[Array, int]:
  """``image`` as a jnp array ``(N, *spatial, C)`` with 2 or 3 spatial dims, and that count."""
  shape = getattr(image, "shape", None)
  if shape is None or len(shape) not in (4, 5):
    raise ValueError(
        f"{fn}: image must be (N, H, W, C) or (N, D, H, W, C); got shape "
        f"{None if shape is None else tuple(shape)}")
  image = jnp.asarray(image)
  if not (jnp.issubdtype(image.dtype, jnp.floating) or jnp.issubdtype(image.dtype, jnp.integer)):
    raise TypeError(f"{fn}: image must be a real (float or integer) array; got dtype "
                    f"{image.dtype}")
  if any(s < 1 for s in image.shape):
    raise ValueError(f"{fn}: image must have non-empty axes; got shape {tuple(image.shape)}")
  return image, image.ndim - 2


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_size(size, nd: int | None, name: str, fn: str) -> tuple[int, ...] | int:
  """An int (repeated over spatial axes) or one positive int per spatial axis.

  With ``nd=None`` (spatial rank not known yet) an int is returned as is and a tuple must have
  2 or 3 entries.
  """
  if _is_int(size):
    if size < 1:
      raise ValueError(f"{fn}: {name} must be a positive int or one per spatial axis; got {size}")
    return (int(size),) * nd if nd is not None else int(size)
  try:
    size = tuple(size)
  except TypeError:
    raise ValueError(f"{fn}: {name} must be an int or a tuple of ints; got {size!r}") from None
  want = "2 or 3" if nd is None else str(nd)
  if (len(size) != nd if nd is not None else len(size) not in (2, 3)):
    raise ValueError(f"{fn}: {name} must have {want} entries (one per spatial axis); got "
                     f"{size!r} with {len(size)}")
  if any(not _is_int(s) or s < 1 for s in size):
    raise ValueError(f"{fn}: {name} entries must be positive ints; got {size!r}")
  return tuple(int(s) for s in size)


def _pair(value, name: str, fn: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be a (low, high) pair; got {value!r}") from None
  return lo, hi


def _check_scale(scale, name: str, fn: str) -> tuple[float, float]:
  lo, hi = _pair(scale, name, fn)
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"{fn}: {name} must satisfy 0 < low <= high <= 1 (area fractions); got "
                     f"{scale!r}")
  return lo, hi


def _check_ratio(ratio, fn: str) -> tuple[float, float]:
  lo, hi = _pair(ratio, "ratio", fn)
  if not 0.0 < lo <= hi or not math.isfinite(hi):
    raise ValueError(f"{fn}: ratio must satisfy 0 < low <= high (aspect ratios); got {ratio!r}")
  return lo, hi


def _check_count(value, name: str, fn: str, minimum: int) -> int:
  if not _is_int(value) or value < minimum:
    raise ValueError(f"{fn}: {name} must be an int >= {minimum}; got {value!r}")
  return int(value)


def _check_spatial(spatial_shape, fn: str) -> tuple[int, ...]:
  try:
    spatial = tuple(spatial_shape)
  except TypeError:
    spatial = None
  if spatial is None or len(spatial) not in (2, 3) or any(not _is_int(s) or s < 1 for s in spatial):
    raise ValueError(f"{fn}: spatial_shape must be 2 or 3 positive ints; got {spatial_shape!r}")
  return tuple(int(s) for s in spatial)


# ----------------------------------------------------------------------------- augment adapter


def image_only(augment, *, name: str = "augment", fn: str = "image_only") -> Callable:
  """Adapts an augmentation to the ``(key, images) -> images`` batch convention used here.

  * An `Augment` instance is applied with `Augment.batch` (one key per example) and its image
    kept: ``augment.batch(key, images)[0]``. (Calling the instance itself would treat a 2D batch
    ``(N, H, W, C)`` as ONE 3D volume.)
  * Any other callable is called as ``augment(key, images)``; a tuple result is read with the
    `jaxmed.data.transforms` convention ``(image, label, ...)`` and its first element kept, an
    array result is used as is.

  Args:
    augment: an `Augment` or a callable ``(key, images (N, *S, C)) -> images | (images, ...)``.

  Returns:
    A callable ``(key, images) -> images``.
  """
  if isinstance(augment, Augment):
    return lambda key, images: augment.batch(key, images)[0]
  if not callable(augment):
    raise TypeError(f"{fn}: {name} must be an Augment or a callable (key, images) -> images; "
                    f"got {type(augment).__name__}")

  def wrapped(key, images):
    out = augment(key, images)
    if isinstance(out, tuple):
      if not out:
        raise ValueError(f"{fn}: {name} returned an empty tuple; expected images")
      out = out[0]
    if not hasattr(out, "shape"):
      raise TypeError(f"{fn}: {name} must return an array (or a tuple starting with one); got "
                      f"{type(out).__name__}")
    return out

  return wrapped


# ----------------------------------------------------------------------------- crop boxes


def _fallback_box(spatial: tuple[int, ...], ratio: tuple[float, float]):
  """torchvision's fallback central crop, generalised to nD (static numpy).

  The largest box with ``side_k / side_0`` in ``ratio`` for every k that fits the image:
  ``t = min(dim_0, min_k dim_k / ratio_lo)``, ``side_0 = round(t)``,
  ``side_k = round(min(dim_k, t * ratio_hi))``, centred with ``start = (dim - side) // 2``.
  In 2D this is torchvision's three cases (image ratio below, above or inside ``ratio``).
  """
  lo, hi = ratio
  t = min([float(spatial[0])] + [d / lo for d in spatial[1:]])
  sides = [round(t)] + [round(min(float(d), t * hi)) for d in spatial[1:]]
  sides = np.clip(np.asarray(sides, np.int32), 1, np.asarray(spatial, np.int32))
  starts = (np.asarray(spatial, np.int32) - sides) // 2
  return starts, sides


@functools.partial(jax.jit, static_argnames=("spatial", "scale", "ratio"))
def _sample_box(key, spatial, scale, ratio):
  """`sample_crop_box` without validation (static, already-checked arguments)."""
  nd = len(spatial)
  # One draw (fast to compile on CPU): per candidate an area fraction and nd - 1 log-ratios, then
  # one offset per axis.
  u = jax.random.uniform(key, (NUM_ATTEMPTS * nd + nd,), jnp.float32)
  u_cand = u[:NUM_ATTEMPTS * nd].reshape(NUM_ATTEMPTS, nd)
  dims = jnp.asarray(spatial, jnp.int32)
  volume = float(math.prod(spatial))
  frac = scale[0] + (scale[1] - scale[0]) * u_cand[:, 0]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  log_r = log_lo + (log_hi - log_lo) * u_cand[:, 1:]
  log_side0 = (jnp.log(volume * frac) - jnp.sum(log_r, axis=-1)) / nd
  log_sides = jnp.concatenate([log_side0[:, None], log_side0[:, None] + log_r], axis=-1)
  # Clip before the cast so that huge candidates cannot overflow int32; they stay invalid.
  sides = jnp.round(jnp.clip(jnp.exp(log_sides), 0.0, 2.0 * max(spatial))).astype(jnp.int32)
  fits = jnp.all((sides >= 1) & (sides <= dims), axis=-1)
  first = jnp.argmax(fits)  # index of the first fitting candidate (0 when none fits)
  found = jnp.any(fits)
  length = sides[first]
  # Offset uniform over the integers 0 .. dim - length (torchvision's randint).
  slack = jnp.maximum(dims - length, 0)
  start = jnp.minimum(jnp.floor(u[NUM_ATTEMPTS * nd:] * (slack + 1)).astype(jnp.int32), slack)
  fb_start, fb_length = _fallback_box(spatial, ratio)
  start = jnp.where(found, start, jnp.asarray(fb_start))
  length = jnp.where(found, length, jnp.asarray(fb_length))
  return start, length


def sample_crop_box(key, spatial_shape: Sequence[int], *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Draws one `RandomResizedCrop` box (torchvision ``RandomResizedCrop.get_params``) in nD.

  See the module docstring for the distribution, the nD aspect ratios and the fallback.

  Args:
    key: PRNG key.
    spatial_shape: ``(H, W)`` or ``(D, H, W)`` of the image, static ints.
    scale: ``(low, high)`` range of the box's area (volume) fraction, ``0 < low <= high <= 1``.
    ratio: ``(low, high)`` range of the aspect ratios ``side_k / side_0``, log-uniform.

  Returns:
    ``(start, length)``, each ``(nd,)`` int32: the box is
    ``image[start[0]:start[0] + length[0], ...]``, always inside the image.
  """
  fn = "sample_crop_box"
  spatial = _check_spatial(spatial_shape, fn)
  return _sample_box(key, spatial, _check_scale(scale, "scale", fn), _check_ratio(ratio, fn))


# ----------------------------------------------------------------------------- resampling


@functools.partial(jax.jit, static_argnames=("size",))
def _resize_box(image, start, length, size):
  """`resized_crop` without validation: one example ``(*S, C)`` -> ``(*size, C)``."""
  axes = []
  for k, n in enumerate(size):
    s = start[k].astype(jnp.float32)
    l = length[k].astype(jnp.float32)
    # Half-pixel centres of the output grid mapped into the box (align_corners=False), clamped
    # to the box's first / last voxel centre as PyTorch does on the cropped array.
    c = s + (jnp.arange(n, dtype=jnp.float32) + 0.5) * (l / n) - 0.5
    axes.append(jnp.clip(c, s, s + l - 1.0))
  coords = jnp.stack(jnp.meshgrid(*axes, indexing="ij"))
  return resample(image, coords=coords)[0]


def resized_crop(image, start, length, *, size):
  """Crops the box ``[start, start + length)`` of one example and resizes it to `size`.

  Equals ``torch.nn.functional.interpolate(crop, size, mode="bilinear" | "trilinear",
  align_corners=False)`` on the cropped array (torchvision ``F.resized_crop`` on tensors with
  ``antialias=False``): half-pixel sample centres, edge voxels of the box replicated, no voxel
  outside the box contributes. Integer images are rounded back to their dtype.

  Args:
    image: one example ``(H, W, C)`` or ``(D, H, W, C)`` (no batch axis; vmap for batches).
    start: ``(nd,)`` int box origin (may be traced).
    length: ``(nd,)`` int box side lengths, ``>= 1`` and inside the image (may be traced).
    size: output spatial size, an int or one per spatial axis.

  Returns:
    ``(*size, C)`` with the input dtype.
  """
  fn = "resized_crop"
  shape = getattr(image, "shape", None)
  if shape is None or len(shape) not in (3, 4):
    raise ValueError(f"{fn}: image must be one example (H, W, C) or (D, H, W, C); got shape "
                     f"{None if shape is None else tuple(shape)}")
  image = jnp.asarray(image)
  nd = image.ndim - 1
  size = _check_size(size, nd, "size", fn)
  start, length = jnp.asarray(start), jnp.asarray(length)
  for name, v in (("start", start), ("length", length)):
    if v.shape != (nd,):
      raise ValueError(f"{fn}: {name} must have shape ({nd},) for image shape "
                       f"{tuple(image.shape)}; got {tuple(v.shape)}")
  return _resize_box(image, start, length, size)


@functools.partial(jax.jit, static_argnames=("size", "scale", "ratio"))
def _rrc_batch(key, image, size, scale, ratio):
  """Per-example random resized crop of a validated batch ``(N, *S, C)``."""
  spatial = tuple(image.shape[1:-1])

  def one(k, x):
    start, length = _sample_box(k, spatial, scale, ratio)
    return _resize_box(x, start, length, size)

  return jax.vmap(one)(jax.random.split(key, image.shape[0]), image)


def random_resized_crop(key, image, *, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision / SwAV ``RandomResizedCrop`` of every example of a 2D or 3D batch.

  Each example gets its own key, box (`sample_crop_box`) and linear resize (`resized_crop`).

  Args:
    key: PRNG key.
    image: ``(N, H, W, C)`` or ``(N, D, H, W, C)``, float (integer images are rounded back).
    size: output spatial size, an int or one int per spatial axis.
    scale: ``(low, high)`` range of the crop's area (3D: volume) fraction, in ``(0, 1]``.
    ratio: ``(low, high)`` aspect-ratio range (``W / H`` in 2D; ``H / D`` and ``W / D`` drawn
      independently in 3D).

  Returns:
    ``(N, *size, C)`` with the input dtype.
  """
  fn = "random_resized_crop"
  image, nd = _check_batch(image, fn)
  size = _check_size(size, nd, "size", fn)
  return _rrc_batch(key, image, size, _check_scale(scale, "scale", fn), _check_ratio(ratio, fn))


# ----------------------------------------------------------------------------- views


def _flip_axes(nd: int) -> tuple[int, ...]:
  # 2D: SwAV's RandomHorizontalFlip flips W only; 3D volumes have no canonical "horizontal", so
  # every axis is flipped independently.
  return (nd - 1,) if nd == 2 else tuple(range(nd))


@functools.partial(jax.jit, static_argnames=("size", "scale", "ratio", "flip"))
def _crop_flip(crop_keys, flip_keys, image, size, scale, ratio, flip):
  """Cropped (and flipped) views ``(V, N, *size, C)``, one crop / flip key per view."""
  axes = _flip_axes(image.ndim - 2)

  def view(k_crop, k_flip):
    v = _rrc_batch(k_crop, image, size, scale, ratio)
    if flip:
      keys = jax.random.split(k_flip, v.shape[0])
      v = jax.vmap(lambda k, x: random_flip(k, x, axes=axes, p=0.5)[0])(keys, v)
    return v

  return jax.vmap(view)(crop_keys, flip_keys)


def _crop_views(key, image, num, size, scale, ratio, flip, augment):
  """``num`` independent views ``(num, N, *size, C)`` of a validated batch.

  View ``i`` draws its crop, flip and augment keys from ``split(split(key, num)[i], 3)``. The
  crops and flips run as one jitted function (fast eager calls too); `augment` is the caller's.
  """
  keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(key, num))
  if augment is not None:  # shape check first, without running anything
    view = jax.ShapeDtypeStruct((image.shape[0], *size, image.shape[-1]), image.dtype)
    out = jax.eval_shape(augment, keys[0, 2], view)
    if tuple(out.shape) != view.shape:
      raise ValueError(f"multi_crop: augment must keep the view shape {view.shape}; got "
                       f"{tuple(out.shape)}")
  views = _crop_flip(keys[:, 0], keys[:, 1], image, size, scale, ratio, flip)
  if augment is None:
    return views
  return jax.vmap(augment)(keys[:, 2], views)


def multi_crop(key, image, *, global_size, local_size, num_global: int = 2, num_local: int = 6,
               global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), ratio=(3 / 4, 4 / 3),
               flip: bool = True, augment=None):
  """SwAV multi-crop: ``num_global`` large and ``num_local`` small random resized crops.

  SwAV (Caron et al. 2020, Sec. 3.2; `src/multicropdataset.py` with ``nmb_crops 2 6``,
  ``size_crops 224 96``, ``min_scale_crops 0.14 0.05``, ``max_scale_crops 1 0.14``). Every view
  of every example is cropped independently (`random_resized_crop`), then with `flip` flipped
  with probability 0.5 per example: along W only in 2D (SwAV's ``RandomHorizontalFlip``), along
  each of D, H, W independently in 3D. Then `augment`, if given, runs on each view batch with its
  own key. Cropping, flipping and augmenting draw from separate sub-keys, so switching flip or
  augment on or off does not change the crops.

  Args:
    key: PRNG key.
    image: ``(N, H, W, C)`` or ``(N, D, H, W, C)``.
    global_size, local_size: output spatial sizes, an int or one int per spatial axis.
    num_global: number of global views, ``>= 1``.
    num_local: number of local views, ``>= 0``.
    global_scale, local_scale: ``(low, high)`` area (volume) fraction ranges in ``(0, 1]``.
    ratio: aspect-ratio range of every crop (see `random_resized_crop`).
    flip: random flips as described above.
    augment: optional ``(key, images (N, *size, C)) -> images`` of the same shape, or an
      `Augment` (applied through `image_only`, i.e. `Augment.batch`, image kept). Typically an
      intensity augmentation.

  Returns:
    ``(global_views, local_views)``: ``(num_global, N, *global_size, C)`` and
    ``(num_local, N, *local_size, C)`` with the input dtype. With ``num_local = 0`` the local
    views are an empty ``(0, N, *local_size, C)`` array (never None), so the output structure
    does not depend on the configuration.
  """
  fn = "multi_crop"
  image, nd = _check_batch(image, fn)
  global_size = _check_size(global_size, nd, "global_size", fn)
  local_size = _check_size(local_size, nd, "local_size", fn)
  num_global = _check_count(num_global, "num_global", fn, 1)
  num_local = _check_count(num_local, "num_local", fn, 0)
  global_scale = _check_scale(global_scale, "global_scale", fn)
  local_scale = _check_scale(local_scale, "local_scale", fn)
  ratio = _check_ratio(ratio, fn)
  if not isinstance(flip, (bool, np.bool_)):
    raise ValueError(f"{fn}: flip must be a bool; got {flip!r}")
  aug = None if augment is None else image_only(augment, fn=fn)
  k_global, k_local = jax.random.split(key)
  global_views = _crop_views(k_global, image, num_global, global_size, global_scale, ratio,
                             bool(flip), aug)
  if num_local == 0:
    local_views = jnp.zeros((0, image.shape[0], *local_size, image.shape[-1]), image.dtype)
  else:
    local_views = _crop_views(k_local, image, num_local, local_size, local_scale, ratio,
                              bool(flip), aug)
  return global_views, local_views


def two_views(key, image, augment):
  """SimSiam-style pair: two independently augmented views of the same batch.

  SimSiam (Chen & He 2021, Alg. 1: ``x1, x2 = aug(x), aug(x)``). The views use the two halves of
  ``jax.random.split(key)``; `augment` may change the spatial size (e.g. a `random_resized_crop`
  partial followed by intensity changes) but must keep the batch axis.

  Args:
    key: PRNG key.
    image: ``(N, H, W, C)`` or ``(N, D, H, W, C)``.
    augment: ``(key, images) -> images`` on the whole batch, or an `Augment` / a callable returning
      an ``(images, ...)`` tuple (see `image_only`).

  Returns:
    ``(2, N, *S_out, C_out)``: view 0 and view 1 stacked.
  """
  fn = "two_views"
  image, _ = _check_batch(image, fn)
  if augment is None:
    raise TypeError(f"{fn}: augment is required (an Augment or a callable (key, images) -> "
                    f"images); got None")
  aug = image_only(augment, fn=fn)

  def view(k):
    out = aug(k, image)
    if out.ndim < 1 or out.shape[0] != image.shape[0]:
      raise ValueError(f"{fn}: augment must keep the batch axis of size {image.shape[0]}; got "
                       f"output shape {tuple(out.shape)}")
    return out

  return jax.vmap(view)(jax.random.split(key, 2))


# ----------------------------------------------------------------------------- config


def multi_crop_from_config(cfg: Mapping[str, Any] | Any, *, augment=None) -> Callable:
  """Builds ``(key, image) -> (global_views, local_views)`` from a config section.

  Args:
    cfg: a mapping or `ml_collections.ConfigDict` with ``global_size`` and ``local_size`` and
      any of ``num_global, num_local, global_scale, local_scale, ratio, flip`` (the `multi_crop`
      keywords; missing ones take its defaults, i.e. SwAV's). Lists become tuples; unknown or
      missing required fields raise a ValueError naming them.
    augment: optional per-view augmentation, as in `multi_crop`.

  Returns:
    ``functools.partial(multi_crop, **cfg, augment=augment)``, validated now except for the
    number of spatial axes, which is checked against the image at call time.
  """
  fn = "multi_crop_from_config"
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f"{fn}: cfg must be a mapping or ConfigDict; got {type(cfg).__name__}")
  unknown = sorted(set(cfg) - set(MULTI_CROP_FIELDS))
  if unknown:
    raise ValueError(f"{fn}: unknown fields {unknown}; valid fields are {list(MULTI_CROP_FIELDS)}")
  missing = [k for k in ("global_size", "local_size") if k not in cfg]
  if missing:
    raise ValueError(f"{fn}: missing required fields {missing}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  sizes = [_check_size(kw[k], None, k, fn) for k in ("global_size", "local_size")]
  if all(isinstance(s, tuple) for s in sizes) and len(sizes[0]) != len(sizes[1]):
    raise ValueError(f"{fn}: global_size and local_size must have the same number of spatial "
                     f"axes; got {sizes[0]} and {sizes[1]}")
  kw["global_size"], kw["local_size"] = sizes
  if "num_global" in kw:
    kw["num_global"] = _check_count(kw["num_global"], "num_global", fn, 1)
  if "num_local" in kw:
    kw["num_local"] = _check_count(kw["num_local"], "num_local", fn, 0)
  for k in ("global_scale", "local_scale"):
    if k in kw:
      kw[k] = _check_scale(kw[k], k, fn)
  if "ratio" in kw:
    kw["ratio"] = _check_ratio(kw["ratio"], fn)
  if "flip" in kw and not isinstance(kw["flip"], (bool, np.bool_)):
    raise ValueError(f"{fn}: flip must be a bool; got {kw['flip']!r}")
  if augment is not None:
    image_only(augment, fn=fn)  # type check now
  return functools.partial(multi_crop, **kw, augment=augment)


# ----------------------------------------------------------------------------- intensity


def _check_prob(p, name: str, fn: str) -> float:
  try:
    p = float(p)
  except (TypeError, ValueError):
    raise ValueError(f"{fn}: {name} must be a probability in [0, 1]; got {p!r}") from None
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{fn}: {name} must be a probability in [0, 1]; got {p!r}")
  return p


def _check_float_batch(images, fn: str) -> Array:
  images, _ = _check_batch(images, fn)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"{fn}: images must be a float array; got dtype {images.dtype}")
  return images


# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), used by adjust_contrast.
_LUMA = (0.2989, 0.587, 0.114)


@functools.partial(jax.jit, static_argnames=("brightness", "contrast", "p", "value_range"))
def _jitter(key, images, brightness, contrast, p, value_range):
  lo, hi = value_range
  n = images.shape[0]
  per_example = (n,) + (1,) * (images.ndim - 1)
  # One draw for the batch (fast to compile on CPU): gate, order, brightness, contrast.
  u = jax.random.uniform(key, (4, n), jnp.float32)
  apply, bright_first = (u[0] < p).reshape(per_example), (u[1] < 0.5).reshape(per_example)
  b_lo, c_lo = max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast)
  fb = (b_lo + (1.0 + brightness - b_lo) * u[2]).reshape(per_example)
  fc = (c_lo + (1.0 + contrast - c_lo) * u[3]).reshape(per_example)
  x = images.astype(jnp.float32)

  def bright(y):
    return jnp.clip(fb * y, lo, hi) if brightness else y

  def contr(y):
    if not contrast:
      return y
    grey = (jnp.tensordot(y, jnp.asarray(_LUMA, jnp.float32), axes=([-1], [0]))
            if y.shape[-1] == 3 else jnp.mean(y, axis=-1))
    mean = jnp.mean(grey, axis=tuple(range(1, grey.ndim))).reshape(per_example)
    return jnp.clip(fc * y + (1.0 - fc) * mean, lo, hi)

  out = jnp.where(bright_first, contr(bright(x)), bright(contr(x)))
  return jnp.where(apply, out, x).astype(images.dtype)


def color_jitter(key, images, *, brightness: float = 0.8, contrast: float = 0.8, p: float = 0.8,
                 value_range=(0.0, 1.0)):
  """torchvision ``RandomApply([ColorJitter(brightness, contrast)], p)`` on grey-level images.

  SwAV's colour distortion (``src/multicropdataset.py``: ``ColorJitter(0.8, 0.8, 0.8, 0.2)``
  applied with p 0.8) and SimSiam's (``ColorJitter(0.4, 0.4, 0.4, 0.1)``, p 0.8) reduced to
  the two factors that change a grey image (saturation, hue and SwAV's random grayscale leave
  an image whose channels are equal unchanged). Per example, with probability ``p``:
  brightness ``f_b ~ U(max(0, 1 - brightness), 1 + brightness)``, ``x -> clip(f_b x)``, and
  contrast ``f_c ~ U(max(0, 1 - contrast), 1 + contrast)``, ``x -> clip(f_c x + (1 - f_c)
  mean(grey(x)))`` (the example's mean grey level: torchvision's luma for 3 channels, the
  channel mean otherwise), in a random order (torchvision permutes its transforms), clipped
  to ``value_range`` (torchvision's float images: [0, 1]).

  Args:
    key: PRNG key.
    images: float ``(N, H, W, C)`` or ``(N, D, H, W, C)``.
    brightness, contrast: jitter strengths, ``>= 0`` (0 disables that factor).
    p: probability of jittering an example.
    value_range: ``(low, high)`` clipping range of the image values.

  Returns:
    The jittered images, same shape and dtype.
  """
  fn = "color_jitter"
  images = _check_float_batch(images, fn)
  p = _check_prob(p, "p", fn)
  strengths = []
  for name, v in (("brightness", brightness), ("contrast", contrast)):
    try:
      v = float(v)
    except (TypeError, ValueError):
      raise ValueError(f"{fn}: {name} must be a number >= 0; got {v!r}") from None
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {v!r}")
    strengths.append(v)
  lo, hi = _pair(value_range, "value_range", fn)
  if not lo < hi:
    raise ValueError(f"{fn}: value_range must be (low, high) with low < high; got "
                     f"{value_range!r}")
  return _jitter(key, images, strengths[0], strengths[1], p, (lo, hi))


@functools.partial(jax.jit, static_argnames=("sigma", "p", "radius"))
def _blur(key, images, sigma, p, radius):
  n = images.shape[0]
  per_example = (n,) + (1,) * (images.ndim - 1)
  u = jax.random.uniform(key, (2, n), jnp.float32)  # gate, sigma
  s = sigma[0] + (sigma[1] - sigma[0]) * u[1]
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(offsets[None] / s[:, None]))
  w = w / jnp.sum(w, axis=1, keepdims=True)  # (N, 2 radius + 1)
  x = images.astype(jnp.float32)
  y = x
  for axis in range(1, images.ndim - 1):
    pad = [(0, 0)] * y.ndim
    pad[axis] = (radius, radius)
    yp = jnp.pad(y, pad, mode="symmetric")
    size = y.shape[axis]
    y = sum(w[:, i].reshape(per_example) * jax.lax.slice_in_dim(yp, i, i + size, axis=axis)
            for i in range(2 * radius + 1))
  return jnp.where((u[0] < p).reshape(per_example), y, x).astype(images.dtype)


def random_gaussian_blur(key, images, *, sigma=(0.1, 2.0), p: float = 0.5,
                         truncate: float = 4.0):
  """SwAV / SimSiam random Gaussian blur: per example, with probability ``p``, a Gaussian
  filter of standard deviation ``sigma ~ U(sigma)`` pixels over every spatial axis.

  SwAV's ``PILRandomGaussianBlur(p=0.5, radius_min=0.1, radius_max=2.0)`` (PIL's
  ``GaussianBlur(radius)``, whose radius is the standard deviation) and SimSiam's
  ``GaussianBlur([0.1, 2.0])`` with p 0.5. The kernel has a static radius of
  ``int(truncate * sigma_max + 0.5)`` pixels; edges are mirrored (``scipy.ndimage`` "reflect", as
  `jaxmed.data.transforms.gaussian_smooth`).

  Args:
    key: PRNG key.
    images: float ``(N, H, W, C)`` or ``(N, D, H, W, C)``.
    sigma: ``(low, high)`` range of the standard deviation in pixels, ``0 < low <= high``.
    p: probability of blurring an example.
    truncate: kernel radius in units of the largest sigma.

  Returns:
    The blurred images, same shape and dtype.
  """
  fn = "random_gaussian_blur"
  images = _check_float_batch(images, fn)
  p = _check_prob(p, "p", fn)
  lo, hi = _pair(sigma, "sigma", fn)
  if not (0.0 < lo <= hi and math.isfinite(hi)):
    raise ValueError(f"{fn}: sigma must satisfy 0 < low <= high; got {sigma!r}")
  if not float(truncate) > 0:
    raise ValueError(f"{fn}: truncate must be > 0; got {truncate!r}")
  return _blur(key, images, (lo, hi), p, int(float(truncate) * hi + 0.5))
