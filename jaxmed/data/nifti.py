"""Read BraTS-style NIfTI folders with nibabel into `Subject` records.

Folder layout (names configurable)::

  <root>/<case>/<case>_t1.nii.gz
  <root>/<case>/<case>_t1ce.nii.gz
  <root>/<case>/<case>_t2.nii.gz
  <root>/<case>/<case>_flair.nii.gz
  <root>/<case>/<case>_seg.nii.gz      (optional: seg=None reads no label)

Every volume is reoriented with ``nibabel.as_closest_canonical`` (RAS+, stored ``(x, y, z)``)
and transposed to ``(z, y, x)`` = ``(D, H, W)``, so axis 0 is the axial axis; the voxel spacing
from the header zooms is reordered the same way. Data are read directly as float32 (never via
a float64 ``get_fdata()``), label maps as uint8.

Labels: BraTS 2018-2021 use {0, 1, 2, 4} (1 necrotic / non-enhancing core, 2 edema,
4 enhancing tumour); BraTS 2023 releases use 3 instead of 4 for the enhancing tumour. A tumour
label map containing 3 (and no 4) is mapped 3 -> 4 so every `Subject` uses the 2018 values.
WMH label maps must be binary {0, 1}; multi-class maps ("organs", "tissues") hold 0..K.

Unreadable files (truncated gzip, garbage bytes, bad header) raise ValueError naming the file,
also when nibabel only fails once the (lazily loaded) data are read; missing files raise
FileNotFoundError with the full path.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import string
import struct
import zlib
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from jaxmed.data.subject import CLASS_NAMES, PATHOLOGIES, Subject

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
# Allowed label values per pathology, after the BraTS 2023 3 -> 4 mapping.
_ALLOWED_LABELS = {"tumour": (0, 1, 2, 4), "wmh": (0, 1),
                   **{p: tuple(range(len(names) + 1)) for p, names in CLASS_NAMES.items()}}
_HGG = re.compile(r"(?<![a-z0-9])hgg(?![a-z0-9])", re.IGNORECASE)
# Exceptions nibabel / gzip / zlib raise on unreadable or corrupt files.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    OSError,
    EOFError,
    zlib.error,
    struct.error,
    ValueError,
    TypeError,
    IndexError,
)

PathLike = str | os.PathLike


def _describe(path: PathLike) -> str:
  return str(pathlib.Path(path).absolute())


def _read_canonical(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Reads one 3D file as float32 ``(D, H, W)`` in canonical orientation + spacing (mm)."""
  path = pathlib.Path(path)
  where = _describe(path)
  if not path.exists():
    raise FileNotFoundError(f"NIfTI file not found: {where}")
  if not path.is_file():
    raise ValueError(f"not a NIfTI file (not a regular file): {where}")
  try:
    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
  except _READ_ERRORS as e:
    raise ValueError(f"cannot read NIfTI file {where}: {type(e).__name__}: {e}") from e
  # A trailing singleton axis, e.g. (x, y, z, 1), is still a 3D volume.
  if len(shape) < 3 or any(s != 1 for s in shape[3:]):
    raise ValueError(f"expected a 3D volume in {where}; got shape {shape}")
  try:
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    affine = np.asarray(img.affine, dtype=np.float64)
    # Read here, inside the try: nibabel loads data lazily, so truncated or corrupt data
    # only fail at this point, not at `nib.load`.
    data = img.get_fdata(dtype=np.float32).reshape(shape[:3])
  except _READ_ERRORS as e:
    raise ValueError(f"cannot read NIfTI data from {where}: {type(e).__name__}: {e}") from e
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"invalid affine in {where}: {affine.tolist()}")
  if not all(np.isfinite(z) and z > 0 for z in zooms):
    raise ValueError(f"invalid voxel spacing (header zooms) in {where}: {zooms}")
  ornt = nib.orientations.io_orientation(affine)
  if np.isnan(ornt).any():
    raise ValueError(f"degenerate affine in {where} (no orientation): {affine.tolist()}")
  canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
  data = np.asarray(canonical.dataobj, dtype=np.float32)
  # Canonical axis ornt[i, 0] is input axis i.
  canonical_zooms = [0.0, 0.0, 0.0]
  for i in range(3):
    canonical_zooms[int(ornt[i, 0])] = zooms[i]
  # (x, y, z) -> (z, y, x).
  data = np.ascontiguousarray(data.transpose(2, 1, 0))
  spacing = tuple(float(z) for z in canonical_zooms[::-1])
  return data, spacing


def load_volume(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Loads a 3D NIfTI (``.nii`` or ``.nii.gz``) file.

  Args:
    path: the file.

  Returns:
    ``(volume, spacing)``: float32 ``(D, H, W)`` volume in canonical orientation (axis 0 =
    axial, from inferior to superior; axis 1 posterior -> anterior; axis 2 left -> right) and
    the voxel size in mm along ``(D, H, W)`` from the header zooms.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is unreadable / corrupt, or not 3D.
  """
  return _read_canonical(path)


def read_channels(paths: Sequence[PathLike],
                  case: str) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Reads one 3D file per channel (`load_volume`) into ``(D, H, W, C)`` float32 + the first
  file's spacing; files of different shapes or with NaN / inf values raise ValueError naming
  them (and ``case``)."""
  volumes, spacing = [], None
  for path in paths:
    volume, vol_spacing = _read_canonical(path)
    if volumes and volume.shape != volumes[0].shape:
      raise ValueError(
          f"shape mismatch in case {case}: {_describe(paths[0])} has shape {volumes[0].shape} "
          f"but {_describe(path)} has shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
      raise ValueError(f"image {_describe(path)} contains NaN or inf values")
    volumes.append(volume)
    spacing = spacing or vol_spacing
  return np.stack(volumes, axis=-1), spacing


def _load_label(path: PathLike, pathology: str) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Reads a label map as uint8 ``(D, H, W)``, validating values (and mapping 3 -> 4)."""
  data, spacing = _read_canonical(path)
  where = _describe(path)
  if not np.all(np.isfinite(data)):
    raise ValueError(f"label map {where} contains NaN or inf values")
  data = np.rint(data)
  lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
  allowed = _ALLOWED_LABELS[pathology]
  if lo < 0 or hi > 255:
    raise ValueError(
        f"label map {where} has values in [{lo:g}, {hi:g}]; allowed values for "
        f"pathology={pathology!r} are {set(allowed)}")
  label = data.astype(np.uint8)
  present = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist())
  if pathology == "tumour" and 3 in present:
    if 4 in present:
      raise ValueError(
          f"label map {where} contains both 3 and 4; BraTS uses 4 (2018-2021) or 3 (2023) for "
          f"the enhancing tumour, not both")
    label[label == 3] = 4
    present = (present - {3}) | {4}
  bad = sorted(present - set(allowed))
  if bad:
    raise ValueError(
        f"label map {where} has invalid values {bad}; allowed values for pathology={pathology!r} "
        f"are {sorted(allowed)}" + (" (3 is accepted as 4)" if pathology == "tumour" else ""))
  return label, spacing


def list_cases(root: PathLike) -> list[str]:
  """Sorted names of the (non-hidden) sub-folders of `root` that contain at least one file."""
  root = pathlib.Path(root)
  if not root.exists():
    raise FileNotFoundError(f"data root not found: {_describe(root)}")
  if not root.is_dir():
    raise NotADirectoryError(f"data root is not a directory: {_describe(root)}")
  cases = []
  for entry in root.iterdir():
    if entry.name.startswith(".") or not entry.is_dir():
      continue
    if any(f.is_file() and not f.name.startswith(".") for f in entry.iterdir()):
      cases.append(entry.name)
  return sorted(cases)


def crop_or_pad(volume: np.ndarray,
                shape: Sequence[int | None],
                *,
                center: Sequence[float | None] | None = None) -> np.ndarray:
  """Crops and / or zero-pads the leading ``len(shape)`` axes of `volume` to `shape`.

  Along each axis the output window of size ``shape[i]`` is centred on ``center[i]`` (a voxel
  coordinate in `volume`, default the array centre ``(n - 1) / 2``), then shifted as little as
  needed so that a crop stays inside the volume and a pad keeps every input voxel. Trailing
  axes (e.g. channels) are kept.

  Args:
    volume: ``(D, H, W, ...)`` array.
    shape: target size per leading axis; None keeps that axis.
    center: per-axis window centre (None entries = array centre), e.g. the centre of the
      foreground bounding box.

  Returns:
    ``(*shape, ...)`` array of `volume`'s dtype, zero (False) where padded.
  """
  volume = np.asarray(volume)
  shape = tuple(shape)
  if len(shape) > volume.ndim:
    raise ValueError(f"shape={shape} has more axes than volume of shape {volume.shape}")
  if center is None:
    center = (None,) * len(shape)
  center = tuple(center)
  if len(center) != len(shape):
    raise ValueError(f"center={center} must have one entry per axis of shape={shape}")
  out_shape = list(volume.shape)
  src, dst = [], []
  for axis, (size, c) in enumerate(zip(shape, center)):
    n = volume.shape[axis]
    if size is None:
      size = n
    if isinstance(size, bool) or int(size) != size or size < 1:
      raise ValueError(f"shape entries must be positive ints or None; got shape={shape}")
    size = int(size)
    if c is None:
      c = (n - 1) / 2
    if not np.isfinite(c):
      raise ValueError(f"center entries must be finite; got center={center}")
    start = int(np.floor(float(c) - (size - 1) / 2 + 0.5))
    start = min(max(start, min(0, n - size)), max(0, n - size))
    lo, hi = max(start, 0), min(start + size, n)
    src.append(slice(lo, hi))
    dst.append(slice(lo - start, hi - start))
    out_shape[axis] = size
  out = np.zeros(out_shape, dtype=volume.dtype)
  out[tuple(dst)] = volume[tuple(src)]
  return out


def zscore_foreground(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """nnU-Net-style z-score over a foreground mask, per channel; background set to 0.

  Args:
    image: ``(D, H, W)`` or channels-last ``(D, H, W, C)`` image.
    mask: ``(D, H, W)`` bool foreground.

  Returns:
    float32 image of `image`'s shape: ``(x - mean_fg) / std_fg`` inside `mask` (std with
    ddof 0; a zero std divides by 1), 0 outside. All zeros if the mask is empty.
  """
  image = np.asarray(image)
  mask = np.asarray(mask, dtype=bool)
  if image.shape == mask.shape:
    return zscore_foreground(image[..., None], mask)[..., 0]
  if image.shape[:-1] != mask.shape:
    raise ValueError(
        f"mask shape {mask.shape} must equal image shape {image.shape} or its spatial shape")
  out = np.zeros(image.shape, dtype=np.float32)
  if not mask.any():
    return out
  for c in range(image.shape[-1]):
    values = image[..., c][mask].astype(np.float32)
    mean = float(np.mean(values, dtype=np.float64))
    std = float(np.std(values, dtype=np.float64))
    scale = 1.0 / std if std > 0 else 1.0
    out[..., c][mask] = (values - np.float32(mean)) * np.float32(scale)
  return out


def _field_names(pattern: str) -> set[str]:
  try:
    return {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
  except ValueError as e:
    raise ValueError(f"invalid filename pattern={pattern!r}: {e}") from e


def _grade_from_name(case_dir: pathlib.Path) -> int:
  """1 if the case folder (or its parent, as in BraTS 2018/2019 ``HGG/``) is tagged HGG."""
  return int(bool(_HGG.search(case_dir.name) or _HGG.search(case_dir.parent.name)))


def read_case(case_dir: PathLike,
              *,
              modalities: Sequence[str] = BRATS_MODALITIES,
              seg: str | None = "seg",
              pattern: str = "{case}_{name}.nii.gz",
              shape: Sequence[int | None] | None = None,
              normalize: bool = True,
              pathology: str = "tumour") -> Subject:
  """Reads one case folder into a `Subject`.

  Args:
    case_dir: ``<root>/<case>``; its name becomes ``subject_id``.
    modalities: channel names; file ``pattern.format(case=<case>, name=<modality>)`` each.
    seg: label file name (formatted like a modality), or None for no label.
    pattern: file name pattern with ``{name}`` (and optionally ``{case}``) fields, ending in
      ``.nii.gz`` or ``.nii``.
    shape: optional ``(D, H, W)`` output size (None entries keep an axis): image, label and
      brain mask are cropped / zero-padded around the brain bounding-box centre.
    normalize: z-score each modality over the brain mask (background 0).
    pathology: ``"tumour"`` (labels {0, 1, 2, 4}, 3 -> 4), ``"wmh"`` (labels {0, 1}),
      ``"organs"`` (0..13), ``"tissues"`` (0..7) or ``"none"`` (requires ``seg=None``).

  Returns:
    `Subject` with ``image (D, H, W, C)`` float32, ``label (D, H, W)`` uint8 or None,
    ``brain_mask (D, H, W)`` bool (any modality nonzero), spacing from the first modality and
    ``grade`` 1 if the case folder or its parent is named with an ``HGG`` token, else 0.
  """
  case_dir = pathlib.Path(case_dir)
  if not case_dir.exists():
    raise FileNotFoundError(f"case folder not found: {_describe(case_dir)}")
  if not case_dir.is_dir():
    raise NotADirectoryError(f"case folder is not a directory: {_describe(case_dir)}")
  case = case_dir.absolute().name
  if isinstance(modalities, str):
    raise ValueError(f"modalities must be a sequence of names, not a string; got {modalities!r}")
  modalities = tuple(modalities)
  if not modalities or not all(isinstance(m, str) and m for m in modalities):
    raise ValueError(f"modalities must be non-empty names; got modalities={modalities}")
  if len(set(modalities)) != len(modalities):
    raise ValueError(f"modalities must be unique; got modalities={modalities}")
  if seg is not None and seg in modalities:
    raise ValueError(f"seg={seg!r} is also listed in modalities={modalities}")
  if pathology not in PATHOLOGIES:
    raise ValueError(f"pathology must be one of {PATHOLOGIES}; got pathology={pathology!r}")
  if pathology == "none" and seg is not None:
    raise ValueError(f"pathology='none' defines no label values; pass seg=None (got seg={seg!r})")
  fields = _field_names(pattern)
  if "name" not in fields or not fields <= {"case", "name"}:
    raise ValueError(
        f"pattern must contain {{name}} and only {{case}} / {{name}} fields; got {pattern!r}")
  if shape is not None:
    shape = tuple(shape)
    if len(shape) != 3:
      raise ValueError(f"shape must be (D, H, W) with None for kept axes; got shape={shape}")

  def path_of(name: str) -> pathlib.Path:
    path = case_dir / pattern.format(case=case, name=name)
    if not path.exists():
      hint = ""
      name_str = str(path)
      other = (name_str[:-3] if name_str.endswith(".nii.gz") else
               name_str + ".gz" if name_str.endswith(".nii") else None)
      if other is not None and os.path.exists(other):
        hint = f" (found {pathlib.Path(other).name} instead; adjust pattern={pattern!r})"
      raise FileNotFoundError(f"NIfTI file not found: {_describe(path)}{hint}")
    return path

  paths = [path_of(m) for m in modalities]
  seg_path = path_of(seg) if seg is not None else None

  image, spacing = read_channels(paths, case)

  label = None
  if seg_path is not None:
    label, _ = _load_label(seg_path, pathology)
    if label.shape != image.shape[:3]:
      raise ValueError(
          f"shape mismatch in case {case}: {_describe(paths[0])} has shape {image.shape[:3]} "
          f"but {_describe(seg_path)} has shape {label.shape}")

  brain_mask = np.any(image != 0, axis=-1)
  if normalize:
    image = zscore_foreground(image, brain_mask)

  if shape is not None:
    if brain_mask.any():
      idx = np.nonzero(brain_mask)
      center = tuple((float(i.min()) + float(i.max())) / 2 for i in idx)
    else:
      center = None
    image = crop_or_pad(image, shape, center=center)
    brain_mask = crop_or_pad(brain_mask, shape, center=center)
    if label is not None:
      label = crop_or_pad(label, shape, center=center)

  return Subject(
      subject_id=case,
      image=image.astype(np.float32, copy=False),
      label=label,
      modalities=modalities,
      spacing=spacing,
      brain_mask=brain_mask,
      grade=_grade_from_name(case_dir.absolute()),
      pathology=pathology,
  )


def read_folder(root: PathLike,
                *,
                cases: Sequence[str] | None = None,
                grades: Mapping[str, int] | None = None,
                **read_case_kwargs: Any) -> list[Subject]:
  """Reads every case of a BraTS-style folder.

  Args:
    root: folder of case folders.
    cases: case folder names to read, in this order; default `list_cases(root)`.
    grades: optional ``case -> grade`` (0 or 1) overriding the name-based grade.
    **read_case_kwargs: forwarded to `read_case` (modalities, seg, pattern, shape, ...).

  Returns:
    One `Subject` per case.
  """
  root = pathlib.Path(root)
  if cases is None:
    cases = list_cases(root)
    if not cases:
      raise ValueError(f"no case folders with files found under {_describe(root)}")
  elif isinstance(cases, str):
    raise ValueError(f"cases must be a sequence of case names, not a string; got {cases!r}")
  grades = dict(grades or {})
  for case, grade in grades.items():
    if grade not in (0, 1):
      raise ValueError(f"grades[{case!r}] must be 0 or 1; got {grade!r}")
  subjects = []
  for case in cases:
    subject = read_case(root / case, **read_case_kwargs)
    if case in grades:
      subject = dataclasses.replace(subject, grade=int(grades[case]))
    subjects.append(subject)
  return subjects


def write_case(subject: Subject, root: PathLike, *, seg: str | None = "seg",
               pattern: str = "{case}_{name}.nii.gz") -> pathlib.Path:
  """Writes ``subject`` as a BraTS-style case folder that `read_case` reads back.

  One file per modality (and ``seg`` for the label map, unless None or the subject has no
  label), float32 images and uint8 labels, RAS+ affine with the subject's spacing; the
  ``(D, H, W)`` = (z, y, x) arrays are stored as (x, y, z). Useful to export phantoms and to
  exercise a NIfTI pipeline.

  Returns:
    the case folder ``root / subject.subject_id``.
  """
  case_dir = pathlib.Path(root) / subject.subject_id
  case_dir.mkdir(parents=True, exist_ok=True)
  dz, dy, dx = subject.spacing
  affine = np.diag([dx, dy, dz, 1.0])

  def save(array, name, dtype):
    data = np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(dtype))
    image = nib.Nifti1Image(data, affine)
    image.header.set_zooms((dx, dy, dz))
    nib.save(image, case_dir / pattern.format(case=subject.subject_id, name=name))

  for c, name in enumerate(subject.modalities):
    save(subject.image[..., c], name, np.float32)
  if seg is not None and subject.label is not None:
    save(subject.label, seg, np.uint8)
  return case_dir
