"""File-backed subjects: preprocess each case once into memory-mappable arrays, then read lazily.

nnU-Net style: a case is read from its source (a NIfTI case folder, a TFDS record), preprocessed
(`preprocess`: canonical orientation comes from the reader; optional resampling to a target
spacing, crop to the foreground bounding box, intensity normalisation, crop / pad) and written
as ``.npy`` arrays into a cache folder keyed by the source and the preprocessing settings.
Later runs with the same settings reuse it and read no source file. `CachedSubjects` then gives
``subjects[i]`` as a `Subject` whose arrays are memory-mapped (read-only): a training source
reads one slice or one crop of it and releases the mapping, so memory does not grow with the
dataset.

Layout::

  <cache_root>/<name>-<key>/settings.json        what the key stands for (for humans)
  <cache_root>/<name>-<key>/<case>/image.npy      (D, H, W, C) float32
                                  label.npy       (D, H, W) uint8 (absent without a label)
                                  brain_mask.npy  (D, H, W) bool
                                  info.json       SubjectInfo, spacing, grade, fingerprint

A case folder is written under a temporary name and renamed into place with ``info.json``
inside, so a crash leaves no half-written case, and concurrent processes (several hosts on a
shared file system) can build the same cache. A case whose source files changed (size or mtime)
or whose cached arrays are unreadable is rebuilt. A case whose source cannot be read fails
with the file named; the cases that could be read stay cached (``on_error="skip"`` leaves it out
of the returned subjects instead, with a warning).
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from jaxmed.data import nifti, resample
from jaxmed.data.sources import SubjectInfo, subject_info
from jaxmed.data.subject import Subject, select_modalities

CACHE_VERSION = 1
NORMALIZATIONS = ("zscore", "window", "none")
ON_ERROR = ("raise", "skip")
_ARRAYS = ("image", "label", "brain_mask")


def default_cache_root() -> pathlib.Path:
  """``$JAXMED_CACHE_DIR``, else ``~/.cache/jaxmed``."""
  return pathlib.Path(os.environ.get("JAXMED_CACHE_DIR", "~/.cache/jaxmed")).expanduser()


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What `preprocess` does to a raw case, in this order.

  Attributes:
    spacing: target voxel spacing (mm, along D, H, W), or None to keep the source's
      (`jaxmed.data.resample.resample_to_spacing`: linear for images, nearest for labels, the
      grid of MONAI ``Spacingd``).
    crop_foreground: crop to the bounding box of the foreground (nnU-Net ``crop_to_nonzero``,
      MONAI ``CropForegroundd``).
    normalize: ``"zscore"`` per channel over the foreground (background 0, nnU-Net MR),
      ``"window"`` clip to ``window`` and scale to [0, 1] (CT, e.g. BTCV HU [-175, 250]) or
      ``"none"``.
    window: ``(low, high)`` for ``normalize="window"``.
    foreground_threshold: the foreground is the voxels where some channel is ``!= 0`` (None,
      MR: the skull-stripped brain) or ``> foreground_threshold`` (CT: e.g. -500 for the body).
    shape: final ``(D, H, W)`` crop / zero pad around the foreground's centre
      (`jaxmed.data.nifti.crop_or_pad`), or None to keep the shape.
  """

  spacing: tuple[float, float, float] | None = None
  crop_foreground: bool = False
  normalize: str = "zscore"
  window: tuple[float, float] = (-175.0, 250.0)
  foreground_threshold: float | None = None
  shape: tuple[int, int, int] | None = None

  def __post_init__(self):
    if self.spacing is not None:
      spacing = tuple(float(s) for s in self.spacing)
      if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm) or None; got {self.spacing}")
      object.__setattr__(self, "spacing", spacing)
    if self.normalize not in NORMALIZATIONS:
      raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {self.normalize!r}")
    window = tuple(float(w) for w in self.window)
    if len(window) != 2 or not window[0] < window[1]:
      raise ValueError(f"window must be (low, high) with low < high; got {self.window}")
    object.__setattr__(self, "window", window)
    if self.shape is not None:
      shape = tuple(self.shape)
      if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"shape must be 3 positive ints (D, H, W) or None; got {self.shape}")
      object.__setattr__(self, "shape", tuple(int(s) for s in shape))

  @classmethod
  def from_config(cls, cfg) -> Preprocessing:
    """From ``config.data``: ``spacing`` (() = keep), ``crop_foreground``, ``normalize``,
    ``window``, ``foreground`` ("nonzero" or "threshold" at ``foreground_threshold``),
    ``crop`` (() = keep)."""
    spacing = tuple(cfg.get("spacing", ()) or ()) or None
    shape = tuple(cfg.get("crop", ()) or ()) or None
    foreground = cfg.get("foreground", "nonzero")
    if foreground not in ("nonzero", "threshold"):
      raise ValueError(f"data.foreground must be 'nonzero' or 'threshold'; got {foreground!r}")
    threshold = float(cfg.get("foreground_threshold", -500.0))
    return cls(spacing=spacing, crop_foreground=bool(cfg.get("crop_foreground", False)),
               normalize=cfg.get("normalize", "zscore"),
               window=tuple(cfg.get("window", (-175.0, 250.0))),
               foreground_threshold=threshold if foreground == "threshold" else None,
               shape=shape)

  def to_json(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def foreground_mask(image: np.ndarray, threshold: float | None = None) -> np.ndarray:
  """``(D, H, W)`` bool: some channel of the ``(D, H, W, C)`` image ``!= 0`` (threshold None)
  or ``> threshold``."""
  if threshold is None:
    return np.any(image != 0, axis=-1)
  return np.any(image > threshold, axis=-1)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
  if not mask.any():
    return tuple(slice(0, n) for n in mask.shape)
  box = []
  for axis in range(mask.ndim):
    hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    box.append(slice(int(hits[0]), int(hits[-1]) + 1))
  return tuple(box)


def preprocess(subject: Subject, settings: Preprocessing) -> Subject:
  """A raw subject (canonical orientation, raw intensities) -> the training-ready subject.

  Steps: resample to ``settings.spacing`` -> foreground mask (`foreground_mask`) -> crop to its
  bounding box -> normalise -> crop / pad to ``settings.shape`` around the foreground centre.
  The brain mask of the result is the foreground mask (False where padded).
  """
  image = np.asarray(subject.image, np.float32)
  label = None if subject.label is None else np.asarray(subject.label, np.uint8)
  spacing = tuple(subject.spacing)
  if settings.spacing is not None:
    image, new_spacing = resample.resample_to_spacing(image, spacing, settings.spacing, order=1)
    if label is not None:
      label, _ = resample.resample_to_spacing(label, spacing, settings.spacing, order=0)
    spacing = tuple(float(s) for s in new_spacing)
  mask = foreground_mask(image, settings.foreground_threshold)
  if settings.crop_foreground:
    box = _bounding_box(mask)
    image, mask = image[box], mask[box]
    label = None if label is None else label[box]
  if settings.normalize == "zscore":
    image = nifti.zscore_foreground(image, mask)
  elif settings.normalize == "window":
    low, high = settings.window
    image = (np.clip(image, low, high) - np.float32(low)) / np.float32(high - low)
  if settings.shape is not None:
    center = None
    if mask.any():
      idx = np.nonzero(mask)
      center = tuple((float(i.min()) + float(i.max())) / 2 for i in idx)
    image = nifti.crop_or_pad(image, settings.shape, center=center)
    mask = nifti.crop_or_pad(mask, settings.shape, center=center)
    label = None if label is None else nifti.crop_or_pad(label, settings.shape, center=center)
  return Subject(subject.subject_id, np.ascontiguousarray(image, np.float32), label,
                 tuple(subject.modalities), spacing, mask, subject.grade, subject.pathology)


# ----------------------------------------------------------------------------- readers


class NiftiReader:
  """Raw cases of a BraTS-style NIfTI folder (`jaxmed.data.nifti.read_case` layout).

  Args:
    root: folder of case folders.
    modalities, seg, pattern, pathology: as `jaxmed.data.nifti.read_case`.
  """

  def __init__(self, root, *, modalities: Sequence[str] = nifti.BRATS_MODALITIES,
               seg: str | None = "seg", pattern: str = "{case}_{name}.nii.gz",
               pathology: str = "tumour"):
    self.root = pathlib.Path(root).expanduser().absolute()
    self.kwargs = {"modalities": tuple(modalities), "seg": seg, "pattern": pattern,
                   "pathology": pathology}
    self.case_ids = nifti.list_cases(self.root)
    if not self.case_ids:
      raise ValueError(f"no case folders with files found under {self.root}")
    self.name = self.root.name

  def identity(self) -> dict:
    return {"reader": "nifti", "root": str(self.root), **self.kwargs}

  def fingerprint(self, case: str) -> list:
    """Name, size and mtime of every file of the case folder (a change rebuilds the case)."""
    folder = self.root / case
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                  for f in folder.iterdir() if f.is_file())

  def read(self, case: str) -> Subject:
    return nifti.read_case(self.root / case, normalize=False, shape=None, **self.kwargs)


def _prepare(name: str, data_dir, config, manual_dir) -> None:
  """Prepares TFDS dataset ``name`` from the official layout in ``manual_dir`` when given (a
  prepared dataset is reused)."""
  if manual_dir:
    from jaxmed.data import tfds as jtfds  # pylint: disable=g-import-not-at-top
    jtfds.prepare(name, manual_dir=manual_dir, data_dir=data_dir, config=config)


class TfdsReader:
  """Raw cases of a prepared TFDS volume split (`jaxmed.data.tfds.volumes`); case ``i`` is
  record ``i`` (records are in sorted subject-id order), restricted to ``modalities``.
  With ``manual_dir`` the dataset is prepared from the official layout there first (once)."""

  def __init__(self, name: str, split: str, *, data_dir, config: str | None = None,
               modalities: Sequence[str] | None = None, manual_dir=None):
    from jaxmed.data.tfds import volumes  # pylint: disable=g-import-not-at-top
    _prepare(name, data_dir, config, manual_dir)
    self.subjects = volumes.subjects_from_source(name, split, data_dir=data_dir, config=config)
    available = self.subjects.modalities
    self.modalities = tuple(modalities) if modalities else available
    missing = [m for m in self.modalities if m not in available]
    if missing:
      raise ValueError(f"data.modalities {missing} not in TFDS dataset {name!r} modalities "
                       f"{available}")
    self.case_ids = [f"{i:06d}" for i in range(len(self.subjects))]
    self.name = f"{name}{'-' + config if config else ''}-{split}"
    self._identity = {"reader": "tfds", "name": name, "split": split, "config": config,
                      "data_dir": str(pathlib.Path(data_dir).expanduser().absolute()),
                      "modalities": self.modalities, "num_records": len(self.subjects)}

  def identity(self) -> dict:
    return self._identity

  def fingerprint(self, case: str) -> list:
    return [case]

  def read(self, case: str) -> Subject:
    return select_modalities(self.subjects[int(case)], self.modalities)


class FastmriReader:
  """fastMRI knee single-coil volumes (`jaxmed.data.tfds.fastmri`, one record per slice) as
  subjects: case = one HDF5 file, ``image`` its ``reconstruction_esc`` targets stacked
  ``(num_slices, 320, 320, 1)`` (channel ``"magnitude"``), no label, spacing unknown in the
  records and set to 1 mm. For training on fully sampled knee images (the k-space is simulated
  by the method, `jaxmed.data.mri`); the test split has no targets and is refused.
  """

  modalities = ("magnitude",)

  def __init__(self, split: str, *, data_dir, manual_dir=None):
    from jaxmed.data import tfds as jtfds  # pylint: disable=g-import-not-at-top
    _prepare("fastmri", data_dir, None, manual_dir)
    self.source = jtfds.data_source("fastmri", split, data_dir=data_dir)
    self._start = {}
    index = 0
    while index < len(self.source):  # records are in file order: one read per file
      record = self.source[index]
      if not bool(record["has_target"]):
        raise ValueError(f"fastMRI split {split!r} has no reconstruction targets (the test "
                         f"split); train on 'train' or 'validation'")
      file = record["file"].decode() if isinstance(record["file"], bytes) else str(record["file"])
      self._start[file] = (index, int(record["num_slices"]))
      index += int(record["num_slices"])
    self.case_ids = list(self._start)
    self.name = f"fastmri-{split}"
    self._identity = {"reader": "fastmri", "split": split, "num_records": len(self.source),
                      "data_dir": str(pathlib.Path(data_dir).expanduser().absolute())}

  def identity(self) -> dict:
    return self._identity

  def fingerprint(self, case: str) -> list:
    return [case, *self._start[case]]

  def read(self, case: str) -> Subject:
    start, count = self._start[case]
    image = np.stack([np.asarray(self.source[i]["target"], np.float32)
                      for i in range(start, start + count)])[..., None]
    return Subject(case, image, None, self.modalities, (1.0, 1.0, 1.0),
                   np.any(image != 0, axis=-1), pathology="none")


# ----------------------------------------------------------------------------- the cache


# np.load parses a .npy header with ast.literal_eval, and CPython 3.11 can fail ("AST
# constructor recursion depth mismatch", a SystemError) when several threads parse at once, as
# the input pipeline's reader threads do: headers are read one thread at a time.
_HEADER_LOCK = threading.Lock()


def _open_memmap(path) -> np.ndarray:
  """``np.load(path, mmap_mode="r")``, thread-safe (see `_HEADER_LOCK`)."""
  with _HEADER_LOCK:
    return np.load(path, mmap_mode="r")


class CachedSubjects(collections.abc.Sequence):
  """Preprocessed subjects in a cache folder; ``subjects[i]`` memory-maps case ``i``.

  ``info(i)`` returns the case's `SubjectInfo` without touching its arrays; ``subset(indices)``
  is another `CachedSubjects` over those cases. Picklable (paths only).
  """

  def __init__(self, directory, cases: Sequence[str], infos: Sequence[dict] | None = None):
    self.directory = pathlib.Path(directory)
    self.cases = list(cases)
    if infos is None:
      infos = [_read_info(self.directory / case) for case in self.cases]
    self._infos = list(infos)

  def __len__(self) -> int:
    return len(self.cases)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.subset(range(*index.indices(len(self))))
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"subject index {index} out of range for {n} subjects")
    index %= n
    folder, meta = self.directory / self.cases[index], self._infos[index]
    load = lambda name: _open_memmap(folder / f"{name}.npy")
    return Subject(meta["subject_id"], load("image"),
                   load("label") if meta["has_label"] else None, tuple(meta["modalities"]),
                   tuple(meta["spacing"]), load("brain_mask"), int(meta["grade"]),
                   meta["pathology"])

  def info(self, index: int) -> SubjectInfo:
    return SubjectInfo.from_json(self._infos[int(index)])

  def subset(self, indices) -> CachedSubjects:
    indices = [int(i) for i in indices]
    return CachedSubjects(self.directory, [self.cases[i] for i in indices],
                          [self._infos[i] for i in indices])

  @property
  def subject_ids(self) -> list[str]:
    return [m["subject_id"] for m in self._infos]

  def __repr__(self):
    return f"CachedSubjects({len(self)} cases in {self.directory})"


def _read_info(folder: pathlib.Path) -> dict:
  with open(folder / "info.json") as f:
    return json.load(f)


def _valid_case(folder: pathlib.Path, fingerprint) -> dict | None:
  """The case's info when its folder is complete, current and readable, else None."""
  try:
    meta = _read_info(folder)
  except (OSError, ValueError):
    return None
  if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
    return None
  shape = tuple(meta["shape"])
  expected = {"image": (shape, np.float32), "brain_mask": (shape[:3], np.bool_)}
  if meta["has_label"]:
    expected["label"] = (shape[:3], np.uint8)
  for name, (array_shape, dtype) in expected.items():
    try:
      array = _open_memmap(folder / f"{name}.npy")
    except (OSError, ValueError, EOFError) as e:
      logging.warning("cache: unreadable %s (%s); rebuilding the case", folder / name, e)
      return None
    if array.shape != array_shape or array.dtype != dtype:
      logging.warning("cache: %s.npy has %s %s, expected %s %s; rebuilding the case",
                      folder / name, array.shape, array.dtype, array_shape, np.dtype(dtype))
      return None
  return meta


def _write_case(folder: pathlib.Path, subject: Subject, fingerprint) -> dict:
  """Writes ``subject`` into ``folder`` atomically (temporary folder + rename)."""
  meta = {**subject_info(subject).to_json(), "version": CACHE_VERSION,
          "fingerprint": fingerprint, "spacing": list(subject.spacing),
          "modalities": list(subject.modalities), "grade": int(subject.grade),
          "pathology": subject.pathology}
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
  try:
    np.save(tmp / "image.npy", np.ascontiguousarray(subject.image, np.float32))
    np.save(tmp / "brain_mask.npy", np.ascontiguousarray(subject.brain_mask, bool))
    if subject.label is not None:
      np.save(tmp / "label.npy", np.ascontiguousarray(subject.label, np.uint8))
    with open(tmp / "info.json", "w") as f:
      json.dump(meta, f)
    if folder.exists():  # stale (or being replaced by a concurrent writer)
      shutil.rmtree(folder, ignore_errors=True)
    try:
      os.replace(tmp, folder)
    except OSError:
      if _valid_case(folder, fingerprint) is None:  # another process won with a valid case
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def cache_directory(reader, settings: Preprocessing, cache_root=None) -> pathlib.Path:
  """``<cache_root>/<reader name>-<key>``, the key a hash of the reader's identity, the
  settings and `CACHE_VERSION`."""
  root = pathlib.Path(cache_root).expanduser() if cache_root else default_cache_root()
  spec = {"version": CACHE_VERSION, "source": reader.identity(), "settings": settings.to_json()}
  key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]
  return root / f"{reader.name}-{key}"


class CacheBuildError(ValueError):
  """Some cases could not be read; ``failures`` maps case -> error message."""

  def __init__(self, failures: dict[str, str], directory):
    self.failures = failures
    lines = "\n".join(f"  {case}: {msg}" for case, msg in failures.items())
    super().__init__(f"{len(failures)} case(s) could not be preprocessed (the others are cached "
                     f"in {directory}; set data.on_error='skip' to train without them):\n{lines}")


def build_cache(reader, settings: Preprocessing, *, cache_root=None, on_error: str = "raise",
                workers: int = 0,
                progress: Callable[[int, int], None] | None = None) -> CachedSubjects:
  """Preprocesses every case of ``reader`` that is not yet cached; returns all cached cases.

  Args:
    reader: `NiftiReader`, `TfdsReader` or anything with ``name``, ``case_ids``,
      ``identity()``, ``fingerprint(case)`` and ``read(case) -> Subject`` (raw).
    settings: the `Preprocessing`.
    cache_root: parent folder of the cache (default `default_cache_root`).
    on_error: ``"raise"`` (`CacheBuildError` naming every unreadable case after caching the
      others) or ``"skip"`` (leave them out, with a warning).
    workers: threads preprocessing cases in parallel (0: one per CPU).
    progress: optional ``progress(done, total)`` callback.

  Returns:
    `CachedSubjects` in ``reader.case_ids`` order.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}; got {on_error!r}")
  directory = cache_directory(reader, settings, cache_root)
  directory.mkdir(parents=True, exist_ok=True)
  settings_file = directory / "settings.json"
  if not settings_file.exists():
    with open(settings_file, "w") as f:
      json.dump({"source": reader.identity(), "settings": settings.to_json(),
                 "version": CACHE_VERSION}, f, indent=1, default=list)

  def build(case: str) -> dict:
    folder = directory / case
    fingerprint = reader.fingerprint(case)
    meta = _valid_case(folder, fingerprint)
    if meta is None:
      meta = _write_case(folder, preprocess(reader.read(case), settings), fingerprint)
    return meta

  cases = list(reader.case_ids)
  infos, failures = {}, {}
  workers = int(workers) or os.cpu_count() or 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(build, case): case for case in cases}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      case = futures[future]
      try:
        infos[case] = future.result()
      except (OSError, ValueError) as e:
        failures[case] = f"{type(e).__name__}: {e}"
      if progress is not None:
        progress(done, len(cases))
  failures = {c: failures[c] for c in cases if c in failures}
  if failures:
    if on_error == "raise":
      raise CacheBuildError(failures, directory)
    for case, msg in failures.items():
      logging.warning("skipping case %s: %s", case, msg)
  kept = [c for c in cases if c in infos]
  if not kept:
    raise ValueError(f"no case of {reader.name} could be preprocessed into {directory}")
  return CachedSubjects(directory, kept, [infos[c] for c in kept])
