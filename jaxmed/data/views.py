"""Training views of subjects: slices, whole volumes, random 3D crops, single modalities.

A view is an example source (`jaxmed.data.sources`: rows read from the subjects on demand, fed
to `jaxmed.data.pipeline.train_iterator`) plus, optionally, a host transform
``transform(example, rng) -> example`` that runs in the grain pipeline on every example:

  * ``"slice"``: axial slices (`jaxmed.data.datasets.slice_view`), optionally with foreground
    oversampling (`SliceOversampler`).
  * ``"volume"``: whole volumes (`volume_view`).
  * ``"crop"``: whole volumes cut to random fixed-size 3D crops by `CropSampler`, with
    foreground oversampling (nnU-Net's ``oversample_foreground_percent``, MONAI's
    ``RandCropByPosNegLabeld``).
  * ``per_modality`` turns any of them into single-channel examples with a ``modality`` id, for
    cross-modal objectives (`jaxmed.data.sources.ModalitySource`).

Config fields read by `make_view` (``config.data``; missing fields take the defaults):
  view: "slice" (default), "volume" or "crop".
  min_foreground: slice view, brain fraction a slice needs (default 0.2).
  fg_fraction: probability that an example is replaced by / centred on labelled voxels
    (default 0.0).
  crop_size: crop view, (D, H, W) crop size.
  negative: crop view, "random" (nnU-Net, default) or "background" (MONAI).
  image_threshold: crop view with negative="background": None (default, every label == 0 voxel
    is a candidate centre) or a float (only voxels with some channel > threshold, as MONAI's
    ``image_key`` / ``image_threshold``).
  per_modality: one example per channel (default False).

All of this is host-side NumPy: it runs in the input pipeline, never inside ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxmed.data import datasets, sources

VIEWS = ("slice", "volume", "crop")
NEGATIVES = ("random", "background")
# Example keys that `CropSampler` cuts by default (any that an example lacks are skipped).
SPATIAL_KEYS = ("image", "label", "brain_mask")

ExampleTransform = Callable[[dict, np.random.Generator], dict]


def volume_view(subjects) -> dict[str, np.ndarray]:
  """Whole volumes of ``subjects`` stacked into one in-memory table (one row per subject).

  Args:
    subjects: non-empty sequence of `jaxmed.data.subject.Subject` sharing ``(D, H, W, C)``.

  Returns:
    ``{"image": (S, D, H, W, C) float32, "label": (S, D, H, W) uint8 (zeros for a subject
    without a label), "brain_mask": (S, D, H, W) bool, "subject_index": (S,) int32}``.
  """
  return sources.materialize(sources.VolumeSource(subjects))


def _check_crop(crop, name: str = "crop") -> tuple[int, int, int]:
  crop = tuple(crop) if isinstance(crop, (Sequence, np.ndarray)) else (crop,)
  if len(crop) != 3 or any(isinstance(c, (bool, np.bool_)) or not isinstance(
      c, (int, np.integer)) or c < 1 for c in crop):
    raise ValueError(f"{name} must be 3 positive ints (D, H, W); got {crop!r}")
  return tuple(int(c) for c in crop)


def _check_fraction(value, name: str = "fg_fraction") -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1]; got {value}")
  return value


def _check_negative(negative) -> str:
  if negative not in NEGATIVES:
    raise ValueError(f"negative must be one of {NEGATIVES}; got {negative!r}")
  return negative


def crop_padding(shape: Sequence[int], crop: Sequence[int]) -> np.ndarray:
  """Zero padding ``(3, 2)`` (before, after) per axis that fits ``crop`` into ``shape``.

  Symmetric as MONAI's ``SpatialPad(method="symmetric")`` (its default):
  ``(d // 2, d - d // 2)`` with ``d = max(crop - shape, 0)``.

  Args:
    shape: volume spatial shape (D, H, W).
    crop: crop size (D, H, W).
  """
  d = np.maximum(np.asarray(crop, np.int64) - np.asarray(shape, np.int64), 0)
  return np.stack([d // 2, d - d // 2], axis=-1)


def origin_range(shape: Sequence[int], crop: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive range ``(low, high)`` of valid crop origins per axis (unpadded coordinates).

  ``[0, L - s]`` where the volume is at least the crop, else the single origin ``-pad_before``
  (the crop covers the symmetrically padded axis, `crop_padding`).

  Args:
    shape: volume spatial shape (D, H, W).
    crop: crop size (D, H, W).
  """
  shape = np.asarray(shape, np.int64)
  crop = np.asarray(crop, np.int64)
  low = -crop_padding(shape, crop)[:, 0]
  return low, low + np.maximum(shape - crop, 0)


def crop_origins(centers, shape: Sequence[int], crop: Sequence[int]) -> np.ndarray:
  """Origins of crops centred as near as possible on ``centers`` inside the (padded) volume.

  MONAI's ``correct_crop_centers`` followed by ``SpatialCrop(roi_center, roi_size)``
  (origin ``= center - crop // 2``), with volumes smaller than the crop zero-padded first as
  by ``SpatialPadd``; equally nnU-Net's clipped ``voxel - patch_size // 2``.

  Args:
    centers: ``(..., 3)`` int voxel coordinates (D, H, W) in the unpadded volume.
    shape: volume spatial shape (D, H, W).
    crop: crop size (D, H, W).

  Returns:
    ``(..., 3)`` int64 origins ``clip(center - crop // 2, low, high)`` (`origin_range`), in
    unpadded coordinates (negative where the crop starts in the padding).
  """
  centers = np.asarray(centers, np.int64)
  low, high = origin_range(shape, crop)
  return np.clip(centers - np.asarray(crop, np.int64) // 2, low, high)


def center_candidates(label: np.ndarray, *, positive: bool, crop: Sequence[int],
                      image: np.ndarray | None = None,
                      image_threshold: float | None = None) -> np.ndarray:
  """Flat indices (into the padded volume) of the voxels a crop centre may be drawn from.

  ``label > 0`` when ``positive``, else ``label == 0`` (and, when ``image_threshold`` is not
  None, some channel of ``image`` > ``image_threshold``), as MONAI's ``map_binary_to_indices``
  on the ``SpatialPadd``-padded label and image (padded voxels are background, image 0).

  Args:
    label: ``(D, H, W)`` integer label map.
    positive: foreground (True) or background (False) candidates.
    crop: crop size (D, H, W); sets the padding (`crop_padding`).
    image: ``(D, H, W, C)`` image, needed when ``image_threshold`` is not None.
    image_threshold: see above.
  """
  pad = crop_padding(label.shape, crop)
  candidate = np.asarray(label) > 0
  if not positive:
    candidate = ~candidate
    if image_threshold is not None:
      if image is None:
        raise ValueError("image_threshold needs the image to select background centres")
      candidate &= np.any(np.asarray(image) > image_threshold, axis=-1)
  if pad.any():
    # Padded voxels: label 0 and image 0, i.e. background unless 0 <= image_threshold.
    fill = not positive and (image_threshold is None or image_threshold < 0)
    candidate = np.pad(candidate, pad, constant_values=fill)
  return np.flatnonzero(candidate)


def sample_crop_origin(rng: np.random.Generator, label: np.ndarray, crop: Sequence[int],
                       fg_fraction: float, negative: str = "random", *,
                       image: np.ndarray | None = None,
                       image_threshold: float | None = None) -> np.ndarray:
  """Draws the origin of one random crop with foreground oversampling.

  With probability ``fg_fraction`` the crop is centred on a voxel drawn uniformly from the
  labelled voxels (``label > 0``); otherwise (and when there is no labelled voxel) a negative
  draw: ``negative="random"`` draws the origin uniformly from `origin_range` (nnU-Net), and
  ``negative="background"`` centres the crop on a voxel drawn uniformly from `center_candidates`
  with ``positive=False`` (MONAI ``RandCropByPosNegLabeld`` after ``SpatialPadd``; when there is
  no such voxel, MONAI's fallback to the labelled voxels, and with none of either a uniform
  origin where MONAI raises). Centres become origins by `crop_origins`.

  Args:
    rng: the example's generator.
    label: ``(D, H, W)`` integer label map.
    crop: crop size (D, H, W).
    fg_fraction: probability of a positive (foreground-centred) crop, in [0, 1].
    negative: "random" or "background".
    image: ``(D, H, W, C)`` image, for ``image_threshold``.
    image_threshold: None or a float, see `center_candidates`.

  Returns:
    ``(3,)`` int64 origin in the unpadded volume's coordinates; the crop is
    ``volume[origin : origin + crop]`` with zeros outside the volume (`extract_crop`).
  """
  label = np.asarray(label)
  if label.ndim != 3:
    raise ValueError(f"label must be (D, H, W); got shape {label.shape}")
  crop = _check_crop(crop)
  fg_fraction = _check_fraction(fg_fraction)
  negative = _check_negative(negative)
  pad_before = crop_padding(label.shape, crop)[:, 0]
  padded_shape = tuple(np.asarray(label.shape) + crop_padding(label.shape, crop).sum(-1))

  def centred(indices):
    center = np.asarray(np.unravel_index(indices[rng.integers(indices.size)], padded_shape))
    return crop_origins(center - pad_before, label.shape, crop)

  if rng.random() < fg_fraction:
    fg = center_candidates(label, positive=True, crop=crop)
    if fg.size:
      return centred(fg)
  if negative == "background":
    bg = center_candidates(label, positive=False, crop=crop, image=image,
                           image_threshold=image_threshold)
    if bg.size:
      return centred(bg)
    fg = center_candidates(label, positive=True, crop=crop)
    if fg.size:
      return centred(fg)
  low, high = origin_range(label.shape, crop)
  return rng.integers(low, high + 1).astype(np.int64)


def extract_crop(array: np.ndarray, origin: Sequence[int], crop: Sequence[int]) -> np.ndarray:
  """``array[origin : origin + crop]`` over the 3 leading axes, zero (False) outside the array.

  Args:
    array: ``(D, H, W, ...)`` array.
    origin: ``(3,)`` int start per axis (may be negative or run past the end).
    crop: crop size (D, H, W).

  Returns:
    ``(*crop, ...)`` array of ``array``'s dtype.
  """
  array = np.asarray(array)
  out = np.zeros(tuple(crop) + array.shape[3:], array.dtype)
  src, dst = [], []
  for o, s, n in zip(origin, crop, array.shape[:3]):
    lo, hi = max(int(o), 0), min(int(o) + int(s), n)
    if hi <= lo:
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - int(o), hi - int(o)))
  out[tuple(dst)] = array[tuple(src)]
  return out


class CropSampler:
  """Host transform cutting a random 3D crop with foreground oversampling from a volume.

  Examples are rows of `volume_view`. The origin is drawn by `sample_crop_origin` from the
  example's ``label`` (all zeros when the example has none: every draw is then negative).
  Volumes smaller than the crop along an axis are zero-padded symmetrically (MONAI
  ``SpatialPadd`` with its defaults ``method="symmetric"``, ``mode="constant"``, value 0; False
  for masks), so the output always has the crop shape.

  Differences from the references: nnU-Net forces the last ``oversample_foreground_percent``
  (0.33) of every batch to be foreground; here every example is positive independently with
  probability ``fg_fraction`` (same expected rate, no batch coupling). MONAI raises when there
  is no candidate centre at all; here the origin is then uniform.

  Args:
    crop: crop size (D, H, W).
    fg_fraction: probability that a crop is centred on a labelled voxel (label > 0).
    negative: "random" (uniform origin, nnU-Net) or "background" (centre on a label == 0 voxel,
      MONAI ``RandCropByPosNegLabeld``).
    image_threshold: with negative="background", None (any label == 0 voxel) or a float (only
      voxels where some image channel > threshold: MONAI's ``image_key`` / ``image_threshold``).
    keys: the spatial ``(D, H, W, ...)`` example arrays to cut; ones an example lacks are
      skipped, all other keys pass through unchanged.

  Call: ``sampler(example, rng)`` with ``example["image"]`` ``(D, H, W, C)`` returns the example
  with every key of ``keys`` cut to ``(*crop, ...)`` and ``crop_origin`` ``(3,)`` int32 (in the
  unpadded volume's coordinates: ``out[k] == example[k][crop_origin + idx]`` or 0 outside).
  """

  def __init__(self, crop: Sequence[int], *, fg_fraction: float = 0.0,
               negative: str = "random", image_threshold: float | None = None,
               keys: Sequence[str] = SPATIAL_KEYS):
    self.crop = _check_crop(crop)
    self.fg_fraction = _check_fraction(fg_fraction)
    self.negative = _check_negative(negative)
    if image_threshold is not None:
      if isinstance(image_threshold, bool) or not isinstance(image_threshold,
                                                             (int, float, np.number)):
        raise ValueError(f"image_threshold must be None or a number; got {image_threshold!r}")
      image_threshold = float(image_threshold)
    self.image_threshold = image_threshold
    self.keys = tuple(keys)
    if "image" not in self.keys:
      raise ValueError(f"keys must include 'image'; got {self.keys}")

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if "image" not in example:
      raise ValueError(f"CropSampler needs example['image'] (D, H, W, C); got keys "
                       f"{sorted(example)}")
    image = np.asarray(example["image"])
    if image.ndim != 4:
      raise ValueError(f"CropSampler needs example['image'] of shape (D, H, W, C) (a "
                       f"volume_view row); got shape {image.shape}")
    spatial = image.shape[:3]
    for key in self.keys:
      if key in example and np.shape(example[key])[:3] != spatial:
        raise ValueError(f"example[{key!r}] of shape {np.shape(example[key])} does not share the "
                         f"image's spatial shape {spatial}")
    label = example.get("label")
    label = np.zeros(spatial, np.uint8) if label is None else np.asarray(label)
    origin = sample_crop_origin(rng, label, self.crop, self.fg_fraction, self.negative,
                                image=image, image_threshold=self.image_threshold)
    out = dict(example)
    for key in self.keys:
      if key in example:
        out[key] = extract_crop(example[key], origin, self.crop)
    out["crop_origin"] = origin.astype(np.int32)
    return out

  def __repr__(self):
    return (f"CropSampler(crop={self.crop}, fg_fraction={self.fg_fraction}, "
            f"negative={self.negative!r}, image_threshold={self.image_threshold})")


class SliceOversampler:
  """Host transform oversampling labelled rows of a slice source.

  With probability ``fg_fraction`` the example is replaced by the row ``source[r]``, ``r``
  drawn uniformly from the rows whose ``columns["labelled"]`` is True (a labelled voxel,
  label > 0); otherwise it is returned unchanged.

  Made for `jaxmed.data.sources.SliceSource` (any source with a ``labelled`` column works, e.g.
  an `ArraySource` of a table with ``label``). Put it first in `compose`, before transforms that
  read ``subject_index`` / ``slice_index``.

  Args:
    source: the training rows (a dict of arrays is wrapped in `sources.ArraySource`); a
      replaced example takes all of the drawn row's arrays (other example keys pass through).
    fg_fraction: replacement probability in [0, 1]; > 0 needs at least one labelled row.
  """

  def __init__(self, source, fg_fraction: float):
    self.fg_fraction = _check_fraction(fg_fraction)
    self.source = sources.as_source(source)
    if "labelled" not in self.source.columns:
      raise ValueError(f"SliceOversampler needs a 'labelled' column (rows with a label); "
                       f"{self.source!r} has columns {sorted(self.source.columns)}")
    self.labelled_rows = np.flatnonzero(self.source.columns["labelled"])
    if self.fg_fraction > 0 and not self.labelled_rows.size:
      raise ValueError(f"fg_fraction={self.fg_fraction} oversamples labelled slices, but none of "
                       f"the {len(self.source)} examples has a labelled voxel (label > 0); set "
                       f"fg_fraction=0 or use labelled subjects")

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    if self.fg_fraction == 0 or rng.random() >= self.fg_fraction:
      return example
    row = self.labelled_rows[rng.integers(self.labelled_rows.size)]
    return {**example, **self.source[int(row)]}

  def __repr__(self):
    return (f"SliceOversampler(fg_fraction={self.fg_fraction}, "
            f"labelled_rows={self.labelled_rows.size}/{len(self.source)})")


def compose(*transforms: ExampleTransform | None) -> ExampleTransform | None:
  """Chains host transforms ``(example, rng) -> example``, applied left to right.

  All share the example's generator; None entries are skipped; returns None when all are None.
  """
  transforms = tuple(t for t in transforms if t is not None)
  if not transforms:
    return None
  if len(transforms) == 1:
    return transforms[0]

  def transform(example, rng):
    for t in transforms:
      example = t(example, rng)
    return example

  return transform


def make_view(cfg, subjects):
  """The configured training view of ``subjects``: its example source and host transform.

  Examples are read from the subjects on demand (`jaxmed.data.sources`), so file-backed
  subjects (`jaxmed.data.cache`) are never loaded whole.

  Args:
    cfg: ``config.data`` (ConfigDict or dict) with the fields listed in the module docstring.
    subjects: sequence of `jaxmed.data.subject.Subject` (a list, or a file-backed sequence).

  Returns:
    ``(source, transform)``: ``"slice"`` -> `sources.SliceSource` (+ `SliceOversampler` when
    ``fg_fraction > 0``); ``"volume"`` -> `sources.VolumeSource`, no transform; ``"crop"`` ->
    a lazy `sources.VolumeSource` + `CropSampler`. ``per_modality`` wraps the source in
    `sources.ModalitySource`.
  """
  view = cfg.get("view", "slice")
  if view not in VIEWS:
    raise ValueError(f"data.view must be one of {VIEWS}; got {view!r}")
  fg_fraction = _check_fraction(cfg.get("fg_fraction", 0.0), "data.fg_fraction")
  per_modality = cfg.get("per_modality", False)
  if not isinstance(per_modality, (bool, np.bool_)):
    raise ValueError(f"data.per_modality must be a bool; got {per_modality!r}")
  if view == "volume" and fg_fraction > 0:
    raise ValueError(f"data.fg_fraction={fg_fraction} needs data.view 'slice' or 'crop'; "
                     f"view='volume' yields whole volumes")
  sampler = None
  if view == "crop":
    crop_size = cfg.get("crop_size", None)
    if crop_size is None:
      raise ValueError("data.view='crop' needs data.crop_size (D, H, W)")
    crop = _check_crop(crop_size, "data.crop_size")
    negative = cfg.get("negative", "random")
    if negative not in NEGATIVES:
      raise ValueError(f"data.negative must be one of {NEGATIVES}; got {negative!r}")
    sampler = CropSampler(crop, fg_fraction=fg_fraction, negative=negative,
                          image_threshold=cfg.get("image_threshold", None))
  if view == "slice":
    source = sources.SliceSource(subjects, min_foreground=cfg.get("min_foreground", 0.2))
  else:
    source = sources.VolumeSource(subjects, lazy=view == "crop")
  if per_modality:
    source = sources.ModalitySource(source)
  if view == "slice" and fg_fraction > 0:
    sampler = SliceOversampler(source, fg_fraction)
  return source, sampler
