"""Sliding-window inference over whole volumes, numerically MONAI's ``sliding_window_inference``.

A model trained on fixed-size patches predicts a whole ``(N, *spatial, C_in)`` batch of volumes
window by window; overlapping predictions are blended with an importance map and divided by the
summed weights::

    predict = lambda x: model.apply(variables, x, train=False)   # (B, *roi, C) -> (B, *roi, K)
    infer = jax.jit(functools.partial(sliding_window_inference, predict, roi_size=(96, 96, 96),
                                      overlap=0.5, mode="gaussian", batch_size=4, mesh=mesh))
    logits = infer(volumes)                                       # (N, D, H, W, K) float32

It follows `monai.inferers.sliding_window_inference` (MONAI 1.6) step by step, channels last:

  * A volume smaller than ``roi_size`` along an axis is padded there (``padding_mode``, ``cval``;
    the smaller half before, the larger after, as ``torch.nn.functional.pad``) and the output
    is cropped back.
  * Windows start every ``int(roi * (1 - overlap))`` voxels (at least 1; the whole ``roi`` where
    it equals the image size), the last one moved back to end at the image border
    (`window_starts`), in C order over the axes, volume after volume.
  * Each prediction is weighted by `importance_map` (ones, or a separable Gaussian of standard
    deviation ``sigma_scale * roi`` clamped below at 1e-3), summed into the output, and the sum
    divided by the summed weights of the windows covering each voxel.

The window origins are NumPy constants computed at trace time. A ``lax.fori_loop`` runs over
batches of ``batch_size`` windows gathered with ``lax.dynamic_slice`` (the last batch is
filled up with repeats of the last window, whose predictions are dropped, so ``predict``
compiles for one shape) and added into the output with ``lax.dynamic_update_slice``: memory is
one window batch plus the output, whatever the number of windows. With a ``mesh`` the window
batch is split over its ``"data"`` axis; the result is that of one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ("constant", "gaussian")
# ``torch.nn.functional.pad`` modes (MONAI's ``PytorchPadMode``) -> ``jnp.pad`` modes.
PADDING_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
                 "circular": "wrap"}
# Smallest importance weight (MONAI's ``compute_importance_map``): no voxel gets weight 0.
MIN_WEIGHT = 1e-3


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _per_axis(value, ndim: int, name: str) -> tuple[float, ...]:
  """``value`` (a number or ``ndim`` numbers) as ``ndim`` floats."""
  values = tuple(value) if isinstance(value, (Sequence, np.ndarray)) else (value,) * ndim
  if len(values) != ndim:
    raise ValueError(f"{name} must be a number or {ndim} numbers (one per spatial axis); "
                     f"got {value!r}")
  if not all(_is_number(v) for v in values):
    raise ValueError(f"{name} must be a number or {ndim} numbers; got {value!r}")
  return tuple(float(v) for v in values)


def _check_roi(roi_size, spatial: tuple[int, ...], volume_shape) -> tuple[int, ...]:
  """``roi_size`` as ``len(spatial)`` positive ints; None or <= 0 takes the volume's size."""
  ndim = len(spatial)
  roi = tuple(roi_size) if isinstance(roi_size, (Sequence, np.ndarray)) else (roi_size,) * ndim
  if len(roi) != ndim:
    raise ValueError(f"roi_size {tuple(roi)} has {len(roi)} axes but volume shape "
                     f"{tuple(volume_shape)} has {ndim} spatial axes (N, *spatial, C)")
  if not all(r is None or _is_int(r) for r in roi):
    raise ValueError(f"roi_size must be ints (None or <= 0: the volume's size); got {roi_size!r}")
  return tuple(int(r) if r is not None and r > 0 else int(s) for r, s in zip(roi, spatial))


def _check_overlap(overlap, ndim: int) -> tuple[float, ...]:
  overlap = _per_axis(overlap, ndim, "overlap")
  if not all(0.0 <= o < 1.0 for o in overlap):
    raise ValueError(f"overlap must be in [0, 1); got {overlap}")
  return overlap


def _check_sigma_scale(sigma_scale, ndim: int) -> tuple[float, ...]:
  sigma_scale = _per_axis(sigma_scale, ndim, "sigma_scale")
  if not all(s > 0.0 for s in sigma_scale):
    raise ValueError(f"sigma_scale must be > 0; got {sigma_scale}")
  return sigma_scale


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, ...]:
  """Step between window starts per axis (MONAI's ``_get_scan_interval``).

  Args:
    image_size: spatial size of the (padded) image, every axis >= ``roi_size``.
    roi_size: window size, same length.
    overlap: overlap fraction in [0, 1) per axis.

  Returns:
    ``roi`` where it equals the image size, else ``max(int(roi * (1 - overlap)), 1)``.
  """
  return tuple(int(r) if r == s else max(int(r * (1 - o)), 1)
               for s, r, o in zip(image_size, roi_size, overlap))


def window_starts(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> np.ndarray:
  """Start voxels of all windows (MONAI's ``dense_patch_slices``).

  Args:
    image_size: spatial size of the (padded) image, every axis >= ``roi_size``.
    roi_size: window size, same length.
    overlap: overlap fraction in [0, 1) per axis.

  Returns:
    ``(num_windows, ndim)`` int64 starts in C order over the axes (the last axis varies
    fastest); along each axis the starts step by `scan_interval` until a window reaches the
    border, and that last window is moved back to end at the border.
  """
  steps = scan_interval(image_size, roi_size, overlap)
  per_axis = []
  for size, roi, step in zip(image_size, roi_size, steps):
    count = next((d + 1 for d in range(-(-size // step)) if d * step + roi >= size), 1)
    per_axis.append([d * step - max(d * step + roi - size, 0) for d in range(count)])
  grid = np.meshgrid(*per_axis, indexing="ij")
  return np.stack([g.reshape(-1) for g in grid], axis=-1).astype(np.int64)


def importance_map(roi_size: Sequence[int], mode: str = "constant",
                   sigma_scale: float | Sequence[float] = 0.125) -> np.ndarray:
  """Per-voxel weight of a window's prediction (MONAI's ``compute_importance_map``).

  Args:
    roi_size: window size ``(*roi,)``.
    mode: ``"constant"`` (all ones) or ``"gaussian"``: the product over axes of
      ``exp(-x**2 / (2 sigma**2))``, ``x`` the distance (in voxels) to the window centre and
      ``sigma = sigma_scale * roi`` (1 at the centre of an odd-sized window), clamped below at
      ``max(min, 1e-3)``.
    sigma_scale: a number or one per axis, > 0.

  Returns:
    ``roi_size``-shaped float32 weights.
  """
  roi_size = tuple(int(r) for r in roi_size)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  if mode == "constant":
    weights = np.ones(roi_size, np.float32)
  else:
    sigma_scale = _check_sigma_scale(sigma_scale, len(roi_size))
    weights = np.ones((), np.float32)
    for size, scale in zip(roi_size, sigma_scale):
      x = (np.arange(size) - (size - 1) / 2.0).astype(np.float32)
      sigma = size * scale
      gauss = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
      weights = weights[..., None] * gauss
  return np.maximum(weights, max(float(weights.min()), MIN_WEIGHT)).astype(np.float32)


def sliding_window_inference(predict: Callable[[jax.Array], jax.Array], volume,
                             roi_size: int | Sequence[int | None], *,
                             overlap: float | Sequence[float] = 0.25, mode: str = "constant",
                             sigma_scale: float | Sequence[float] = 0.125, batch_size: int = 4,
                             padding_mode: str = "constant", cval: float = 0.0,
                             mesh: Mesh | None = None) -> jax.Array:
  """Predict whole volumes window by window and blend the overlaps, as MONAI does.

  Jit-able (window positions depend only on shapes and the static arguments), e.g.
  ``jax.jit(functools.partial(sliding_window_inference, predict, roi_size=(64, 64)))``.

  Args:
    predict: channels-last JAX function ``(B, *roi_size, C_in) -> (B, *roi_size, C_out)``
      with ``B = batch_size`` (rounded as below), e.g.
      ``lambda x: model.apply(variables, x, train=False)``.
    volume: ``(N, *spatial, C_in)`` batch of volumes; ``spatial`` is ``(H, W)`` in 2D,
      ``(D, H, W)`` in 3D.
    roi_size: window size, an int for every axis or one per spatial axis; a ``None`` or
      non-positive entry takes the volume's size along that axis (MONAI's ``fall_back_tuple``).
    overlap: overlap fraction between neighbouring windows in [0, 1), one or per axis.
    mode: blending weights, ``"constant"`` or ``"gaussian"`` (see `importance_map`).
    sigma_scale: Gaussian standard deviation as a fraction of ``roi_size`` (> 0), one or per
      axis; used in ``"gaussian"`` mode.
    batch_size: windows per ``predict`` call (>= 1), capped at the total number of windows
      over the ``N`` volumes and rounded up to a multiple of the mesh's ``"data"`` size.
    padding_mode: how a volume smaller than ``roi_size`` is padded: ``"constant"``,
      ``"reflect"``, ``"replicate"`` or ``"circular"`` (``torch.nn.functional.pad`` modes).
    cval: fill value of ``"constant"`` padding.
    mesh: optional `jax.sharding.Mesh` with a ``"data"`` axis; with several devices on it,
      each window batch is split over that axis.

  Returns:
    ``(N, *spatial, C_out)`` float32 blended predictions.

  Raises:
    ValueError: on a malformed argument, or a ``predict`` whose output is not
      ``(B, *roi_size, C_out)``.
  """
  shape = tuple(int(s) for s in np.shape(volume))
  if len(shape) < 3:
    raise ValueError(f"volume must be (N, *spatial, C) with at least one spatial axis; got "
                     f"shape {shape}")
  num, spatial = shape[0], shape[1:-1]
  ndim = len(spatial)
  roi = _check_roi(roi_size, spatial, shape)
  overlap = _check_overlap(overlap, ndim)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
  sigma_scale = _check_sigma_scale(sigma_scale, ndim)
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"padding_mode must be one of {tuple(PADDING_MODES)}; got {padding_mode!r}")
  if not _is_number(cval):
    raise ValueError(f"cval must be a number; got {cval!r}")
  data = 1
  if mesh is not None:
    if "data" not in mesh.axis_names:
      raise ValueError(f"mesh must have a 'data' axis; got axes {mesh.axis_names}")
    data = int(mesh.shape["data"])

  volume = jnp.asarray(volume)
  # Pad axes smaller than the window: the smaller half before (torch.nn.functional.pad).
  pads = [((r - s) // 2, (r - s) - (r - s) // 2) if r > s else (0, 0)
          for s, r in zip(spatial, roi)]
  if any(p != (0, 0) for p in pads):
    extra = {"constant_values": cval} if padding_mode == "constant" else {}
    volume = jnp.pad(volume, [(0, 0), *pads, (0, 0)], mode=PADDING_MODES[padding_mode], **extra)
  image_size = tuple(max(s, r) for s, r in zip(spatial, roi))

  starts = window_starts(image_size, roi, overlap)  # (W, ndim)
  num_windows = len(starts)
  total = num * num_windows
  batch = -(-min(batch_size, total) // data) * data
  num_batches = -(-total // batch)
  # Window k of the flat list is window k % W of volume k // W; the last batch repeats the last.
  flat = np.minimum(np.arange(num_batches * batch), total - 1)
  origins = np.concatenate([(flat // num_windows)[:, None], starts[flat % num_windows],
                            np.zeros((len(flat), 1), np.int64)], axis=1)
  origins = jnp.asarray(origins.reshape(num_batches, batch, ndim + 2), jnp.int32)
  weights = jnp.asarray(importance_map(roi, mode, sigma_scale))

  window_in = jax.ShapeDtypeStruct((batch, *roi, shape[-1]), volume.dtype)
  out_struct = jax.eval_shape(predict, window_in)
  out_shape = tuple(getattr(out_struct, "shape", ()))
  if len(out_shape) != ndim + 2 or out_shape[:-1] != (batch, *roi):
    raise ValueError(f"predict must map {window_in.shape} -> {(batch, *roi, 'C_out')}; got "
                     f"{out_shape if hasattr(out_struct, 'shape') else type(out_struct).__name__}")
  channels_out = out_shape[-1]
  window_sharding = NamedSharding(mesh, P("data")) if data > 1 else None
  replicated = NamedSharding(mesh, P()) if data > 1 else None

  def predict_batch(i, out):
    origin = origins[i]  # (batch, ndim + 2): volume, spatial starts, channel 0
    windows = jax.vmap(lambda o: lax.dynamic_slice(volume, o, (1, *roi, shape[-1]))[0])(origin)
    if window_sharding is not None:
      windows = lax.with_sharding_constraint(windows, window_sharding)
    preds = predict(windows).astype(jnp.float32) * weights[..., None]
    if replicated is not None:
      preds = lax.with_sharding_constraint(preds, replicated)

    def add(j, out):
      patch = lax.dynamic_slice(out, origin[j], (1, *roi, channels_out))
      return lax.dynamic_update_slice(out, patch + preds[j][None], origin[j])

    # Only the batch's real windows: the repeats filling up the last batch are dropped.
    return lax.fori_loop(0, jnp.minimum(batch, total - i * batch), add, out)

  out = jnp.zeros((num, *image_size, channels_out), jnp.float32)
  if replicated is not None:
    out = lax.with_sharding_constraint(out, replicated)
  out = lax.fori_loop(0, num_batches, predict_batch, out)

  window_origins = jnp.asarray(starts, jnp.int32)

  def add_weights(k, count):
    patch = lax.dynamic_slice(count, window_origins[k], roi)
    return lax.dynamic_update_slice(count, patch + weights, window_origins[k])

  count = lax.fori_loop(0, num_windows, add_weights, jnp.zeros(image_size, jnp.float32))
  out = out / count[None, ..., None]
  crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial))
  return out[(slice(None), *crop, slice(None))]
