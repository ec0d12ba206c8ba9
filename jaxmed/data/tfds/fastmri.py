"""fastMRI knee single-coil as a TFDS dataset (manual download): one record per slice.

Official layout in ``manual_dir`` (the unpacked ``knee_singlecoil_{train,val,test_v2}``
archives from https://fastmri.med.nyu.edu/)::

  <manual_dir>/singlecoil_train/*.h5      -> split "train"
  <manual_dir>/singlecoil_val/*.h5        -> split "validation"
  <manual_dir>/singlecoil_test_v2/*.h5    -> split "test"  (or singlecoil_test/)

Absent folders are skipped (e.g. only the validation archive was downloaded); at least one must
exist. Each HDF5 file is one volume: dataset ``kspace`` ``(num_slices, H, W)`` complex (the
emulated single-coil k-space, 640 x 368 for most knee volumes, W varies), ``reconstruction_esc``
``(num_slices, 320, 320)`` float32 (train / val only), attributes ``acquisition``
(``CORPD_FBK`` / ``CORPDFS_FBK``), ``max``, ``norm``, ``patient_id``; test files instead hold
an undersampling ``mask`` ``(W,)`` and attributes ``acceleration``, ``num_low_frequency``.
``reconstruction_rss`` and ``ismrmrd_header`` are not copied.

One record per slice (files in sorted name order, slices in order; the prepared splits keep that
order, key ``<file>-<slice>``):

  ===================  =========================  =============================================
  feature              dtype, shape               value
  ===================  =========================  =============================================
  kspace               complex64 ``(H, W)``       ``kspace[slice]`` exactly as stored
  target               float32 ``(h, w)``         ``reconstruction_esc[slice]``; zeros
                                                  `TARGET_SHAPE` where the file has none (test)
  has_target           bool                       the file has ``reconstruction_esc``
  mask                 bool ``(W,)``              sampled k-space columns: the file's ``mask``
                                                  (test), else all True (fully sampled)
  file                 text                       file name, e.g. ``file1000001.h5``
  slice, num_slices    int32                      slice index, slices in the volume
  acquisition          text                       ``CORPD_FBK`` / ``CORPDFS_FBK`` ("" if absent)
  patient_id           text                       attribute ``patient_id`` ("" if absent)
  max, norm            float32                    attributes ``max``, ``norm`` (0 if absent)
  acceleration         int32                      attribute ``acceleration`` (0 if absent)
  num_low_frequency    int32                      attribute ``num_low_frequency`` (0 if absent)
  ===================  =========================  =============================================

`zero_filled` turns a record's ``kspace`` (masked for an undersampled input) into fastMRI's
zero-filled magnitude image, the baseline of ``fastmri_examples/zero_filled``.

Unreadable or corrupt HDF5 files, and files without a valid ``kspace``, raise ValueError naming
the file.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxmed.data import mri

# Split name -> folder names under manual_dir, first existing one wins.
SPLIT_FOLDERS = {
    "train": ("singlecoil_train",),
    "validation": ("singlecoil_val",),
    "test": ("singlecoil_test_v2", "singlecoil_test"),
}
# Size of the official single-coil targets (reconstruction_esc) and of the zero-filled baseline.
TARGET_SHAPE = (320, 320)
_TARGET_KEY = "reconstruction_esc"

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request access at https://fastmri.med.nyu.edu/, download knee_singlecoil_train.tar.xz,
knee_singlecoil_val.tar.xz and / or knee_singlecoil_test_v2.tar.xz, and unpack them into
manual_dir, so that it holds singlecoil_train/, singlecoil_val/ and / or singlecoil_test_v2/
(folders of file*.h5). Missing folders are skipped.
"""

_CITATION = """\
@article{zbontar2018fastmri,
  title={fastMRI: An Open Dataset and Benchmarks for Accelerated MRI},
  author={Zbontar, Jure and Knoll, Florian and Sriram, Anuroop and others},
  journal={arXiv preprint arXiv:1811.08839},
  year={2018}
}
"""


def zero_filled(kspace: np.ndarray,
                shape: Sequence[int] = TARGET_SHAPE) -> np.ndarray:
  """fastMRI's zero-filled reconstruction: |centred orthonormal 2D inverse FFT|, centre-cropped.

  Matches ``fastmri.complex_abs(transforms.complex_center_crop(fastmri.ifft2c(k), shape))``:
  ``ifftshift`` over the last two axes, ``ifft2`` with ``norm="ortho"``, ``fftshift``, then a
  crop starting at ``(H - h) // 2, (W - w) // 2``, then the magnitude.

  Args:
    kspace: complex ``(..., H, W)`` k-space (a record's ``kspace``; masked k-space for an
      undersampled reconstruction).
    shape: ``(h, w)`` of the crop, ``0 < h <= H``, ``0 < w <= W``.

  Returns:
    float32 ``(..., h, w)`` magnitude image.

  Raises:
    TypeError: `kspace` is not complex.
    ValueError: `kspace` has fewer than 2 axes, or `shape` does not fit.
  """
  kspace = np.asarray(kspace)
  if not np.iscomplexobj(kspace):
    raise TypeError(f"kspace must be a complex array; got dtype {kspace.dtype} (for a real "
                    f"(..., H, W, 2) array pass kspace[..., 0] + 1j * kspace[..., 1])")
  if kspace.ndim < 2:
    raise ValueError(f"kspace must have at least 2 axes (..., H, W); got shape {kspace.shape}")
  shape = tuple(int(s) for s in shape)
  height, width = kspace.shape[-2:]
  if len(shape) != 2 or not (0 < shape[0] <= height and 0 < shape[1] <= width):
    raise ValueError(f"crop shape {shape} must be 2 positive sizes no larger than the k-space "
                     f"size {(height, width)}")
  image = np.asarray(mri.ifft2c(kspace))
  top, left = (height - shape[0]) // 2, (width - shape[1]) // 2
  return np.abs(image[..., top:top + shape[0], left:left + shape[1]]).astype(np.float32)


def _h5py():
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading fastMRI needs h5py: pip install 'jaxmed[datasets]'") from e
  return h5py


def _attr_text(attrs, name: str, where: str) -> str:
  """Attribute ``name`` as text ("" if absent)."""
  if name not in attrs:
    return ""
  value = attrs[name]
  if isinstance(value, np.ndarray):
    if value.size != 1:
      raise ValueError(f"attribute {name!r} of {where} is not a single value: {value!r}")
    value = value.reshape(()).item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return str(value)


def _attr_number(attrs, name: str, where: str, dtype) -> Any:
  """Attribute ``name`` as a ``dtype`` scalar (0 if absent)."""
  if name not in attrs:
    return dtype(0)
  value = np.asarray(attrs[name])
  if value.size != 1 or not np.issubdtype(value.dtype, np.number):
    raise ValueError(f"attribute {name!r} of {where} is not a single number: {value!r}")
  value = value.reshape(())
  if not np.isfinite(value):
    raise ValueError(f"attribute {name!r} of {where} is not finite: {value!r}")
  if np.issubdtype(dtype, np.integer) and value != np.round(value):
    raise ValueError(f"attribute {name!r} of {where} is not an integer: {value!r}")
  return dtype(value)


def _read_file(path: pathlib.Path) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields ``(key, record)`` for every slice of one fastMRI HDF5 file, in order."""
  h5py = _h5py()
  where = str(path.absolute())
  # h5py raises OSError for unreadable files / corrupt chunks, KeyError / TypeError / ValueError
  # for broken objects, RuntimeError for some library failures.
  errors = (OSError, KeyError, TypeError, ValueError, RuntimeError)
  try:
    hf = h5py.File(path, "r")
  except errors as e:
    raise ValueError(f"cannot read fastMRI HDF5 file {where}: {type(e).__name__}: {e}") from e
  with hf:
    try:
      if "kspace" not in hf or not isinstance(hf["kspace"], h5py.Dataset):
        raise ValueError(f"fastMRI HDF5 file {where} has no 'kspace' dataset; "
                         f"it holds {sorted(hf.keys())}")
      kspace = hf["kspace"]
      if kspace.ndim != 3 or not np.issubdtype(kspace.dtype, np.complexfloating):
        raise ValueError(f"'kspace' in {where} must be complex (num_slices, H, W); got "
                         f"{kspace.dtype} {kspace.shape} (multi-coil k-space is not supported)")
      num_slices, _, num_cols = kspace.shape
      target = hf[_TARGET_KEY] if _TARGET_KEY in hf else None
      if target is not None and (target.ndim != 3 or target.shape[0] != num_slices
                                 or not np.issubdtype(target.dtype, np.number)):
        raise ValueError(f"{_TARGET_KEY!r} in {where} must be real (num_slices={num_slices}, "
                         f"h, w); got {target.dtype} {target.shape}")
      if "mask" in hf:
        mask = np.asarray(hf["mask"][()])
        if mask.shape != (num_cols,):
          raise ValueError(f"'mask' in {where} must have shape ({num_cols},) (one entry per "
                           f"k-space column); got {mask.shape}")
        mask = mask != 0
      else:
        mask = np.ones((num_cols,), dtype=bool)
      attrs = hf.attrs
      meta = {
          "file": path.name,
          "num_slices": np.int32(num_slices),
          "acquisition": _attr_text(attrs, "acquisition", where),
          "patient_id": _attr_text(attrs, "patient_id", where),
          "max": _attr_number(attrs, "max", where, np.float32),
          "norm": _attr_number(attrs, "norm", where, np.float32),
          "acceleration": _attr_number(attrs, "acceleration", where, np.int32),
          "num_low_frequency": _attr_number(attrs, "num_low_frequency", where, np.int32),
          "has_target": target is not None,
          "mask": mask,
      }
      for i in range(num_slices):
        record = dict(meta)
        record["slice"] = np.int32(i)
        record["kspace"] = np.ascontiguousarray(kspace[i], dtype=np.complex64)
        record["target"] = (np.ascontiguousarray(target[i], dtype=np.float32)
                            if target is not None else np.zeros(TARGET_SHAPE, np.float32))
        yield f"{path.name}-{i}", record
    except errors as e:
      if str(where) in str(e):
        raise
      raise ValueError(f"cannot read fastMRI HDF5 file {where}: {type(e).__name__}: {e}") from e


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
  """``dl_manager.manual_dir``; FileNotFoundError (not TFDS's AssertionError) if empty."""
  try:
    return pathlib.Path(os.fspath(dl_manager.manual_dir))
  except AssertionError as e:
    raise FileNotFoundError(str(e)) from e


def split_folders(manual_dir: str | os.PathLike) -> dict[str, pathlib.Path]:
  """The split folders present in ``manual_dir``: ``{"train": .../singlecoil_train, ...}``.

  Raises:
    FileNotFoundError: none of the split folders exists.
  """
  root = pathlib.Path(os.fspath(manual_dir))
  found = {}
  for split, names in SPLIT_FOLDERS.items():
    for name in names:
      if (root / name).is_dir():
        found[split] = root / name
        break
  if not found:
    expected = sorted(n for names in SPLIT_FOLDERS.values() for n in names)
    raise FileNotFoundError(f"no fastMRI single-coil folder in manual_dir {root.absolute()}: "
                            f"expected at least one of {expected}")
  return found


def list_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Sorted ``*.h5`` files (not hidden) of one split folder.

  Raises:
    FileNotFoundError: the folder holds no ``.h5`` file.
  """
  files = sorted(p for p in folder.iterdir()
                 if p.suffix == ".h5" and not p.name.startswith(".") and p.is_file())
  if not files:
    raise FileNotFoundError(f"no .h5 files in fastMRI folder {folder.absolute()}")
  return files


class Fastmri(tfds.core.GeneratorBasedBuilder):
  """fastMRI knee single-coil: one record per slice (k-space, ESC target, attributes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Single-coil knee train / val / test_v2, one record per slice."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = tfds.features.Scalar
    return self.dataset_info_from_configs(
        description="fastMRI knee single-coil k-space slices with ESC reconstruction targets.",
        features=tfds.features.FeaturesDict({
            "kspace": tfds.features.Tensor(shape=(None, None), dtype=np.complex64,
                                           encoding="zlib"),
            "target": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                           encoding="zlib"),
            "has_target": scalar(dtype=np.bool_),
            "mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "file": tfds.features.Text(),
            "slice": scalar(dtype=np.int32),
            "num_slices": scalar(dtype=np.int32),
            "acquisition": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "max": scalar(dtype=np.float32),
            "norm": scalar(dtype=np.float32),
            "acceleration": scalar(dtype=np.int32),
            "num_low_frequency": scalar(dtype=np.int32),
        }),
        homepage="https://fastmri.med.nyu.edu/",
        citation=_CITATION,
        # Records keep the file / slice order (neighbouring slices stay neighbours).
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    folders = split_folders(_manual_dir(dl_manager))
    return {split: self._generate_examples(folder) for split, folder in folders.items()}

  def _generate_examples(self, folder: pathlib.Path):
    for path in list_files(folder):
      yield from _read_file(path)
