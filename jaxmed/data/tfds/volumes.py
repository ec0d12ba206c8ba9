"""What the volume builders (BraTS, WMH, BTCV, FeTA) share: record format, NIfTI reading, a base
builder, and the way back from records to `Subject`.

One record per case (``FeaturesDict``, see `features`)::

  subject_id  Text                   case folder / file id (also the record key)
  image       float32 (D, H, W, C)   raw intensities (no normalisation), one channel per modality
  label       uint8 (D, H, W)        label map; all zeros when the case has no label
  has_label   bool ()                whether ``label`` is a real label map
  spacing     float32 (3,)           voxel size in mm along (D, H, W)
  grade       int32 ()               BraTS 2018 / 2019: 1 for ``HGG/`` cases; else 0

Volumes are read with `jaxmed.data.nifti.load_volume` (canonical RAS+ orientation, transposed
to ``(D, H, W)`` = (z, y, x), float32) and label maps with `jaxmed.data.nifti._load_label`
(validated values; BraTS 2023 enhancing tumour 3 -> 4). ``image`` and ``label`` are zlib
`tfds.features.Tensor`s, so no TensorFlow is needed to write or read them (array_record).

Records are written in sorted subject-id order (``disable_shuffling=True``), so index ``i`` of a
split is the i-th subject id in sorted order, on every machine.

Usage::

  from jaxmed.data import tfds as jtfds
  from jaxmed.data.tfds import volumes
  jtfds.prepare("wmh", manual_dir="~/data/wmh", data_dir="~/tfds")
  subjects = volumes.subjects_from_source("wmh", "train", data_dir="~/tfds")
  subject = subjects[0]  # a `jaxmed.data.subject.Subject`
"""

from __future__ import annotations

import abc
import collections.abc
import dataclasses
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxmed.data import nifti
from jaxmed.data import tfds as jtfds
from jaxmed.data.subject import PATHOLOGIES, Subject

PathLike = str | os.PathLike
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Folder names never searched for cases (macOS archive leftovers; hidden folders are skipped too).
_SKIP_DIRS = frozenset({"__MACOSX"})


def features(num_channels: int) -> tfds.features.FeaturesDict:
  """The record format of every volume dataset, with ``num_channels`` image channels."""
  return tfds.features.FeaturesDict({
      "subject_id": tfds.features.Text(),
      "image": tfds.features.Tensor(
          shape=(None, None, None, num_channels), dtype=np.float32, encoding="zlib"),
      "label": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding="zlib"),
      "has_label": tfds.features.Scalar(dtype=np.bool_),
      "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "grade": tfds.features.Scalar(dtype=np.int32),
  })


def describe(path: PathLike) -> str:
  """The absolute path, for error messages."""
  return str(pathlib.Path(path).absolute())


def nifti_stem(name: str) -> str | None:
  """``"img0001.nii.gz"`` -> ``"img0001"``; None if ``name`` is not a NIfTI file name."""
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return None


def find_nifti(folder: PathLike, stem: str) -> pathlib.Path | None:
  """``folder/stem.nii.gz`` or else ``folder/stem.nii`` if it is a file; else None."""
  for suffix in NIFTI_SUFFIXES:
    path = pathlib.Path(folder) / f"{stem}{suffix}"
    if path.is_file():
      return path
  return None


def require_nifti(folder: PathLike, stem: str, what: str = "NIfTI file") -> pathlib.Path:
  """Like `find_nifti`, but a missing file raises FileNotFoundError naming the path."""
  path = find_nifti(folder, stem)
  if path is None:
    raise FileNotFoundError(
        f"{what} not found: {describe(pathlib.Path(folder) / (stem + '.nii.gz'))} (nor .nii)")
  return path


def nifti_files(folder: PathLike) -> list[pathlib.Path]:
  """Sorted non-hidden ``.nii`` / ``.nii.gz`` files directly in ``folder``."""
  return sorted(p for p in pathlib.Path(folder).iterdir()
                if p.is_file() and not p.name.startswith(".") and nifti_stem(p.name))


def walk_dirs(root: PathLike, is_leaf: Callable[[pathlib.Path], bool]) -> list[pathlib.Path]:
  """The folders under ``root`` (``root`` included) for which ``is_leaf`` is true, sorted.

  Hidden and ``__MACOSX`` folders are skipped, and the search does not descend into a folder
  once ``is_leaf`` accepts it (e.g. a case folder).
  """
  found = []
  for dirpath, dirnames, _ in os.walk(root, followlinks=True):
    path = pathlib.Path(dirpath)
    if is_leaf(path):
      found.append(path)
      dirnames[:] = []
      continue
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
  return sorted(found)


def has_folder(path: pathlib.Path, root: pathlib.Path, predicate: Callable[[str], bool]) -> bool:
  """Whether a folder between ``root`` (excluded) and ``path`` (excluded) satisfies
  ``predicate(name)``, e.g. a ``validation`` folder above a case folder."""
  return any(predicate(part) for part in path.relative_to(root).parts[:-1])


@dataclasses.dataclass(frozen=True)
class Case:
  """One case found in ``manual_dir``: where its files are, before anything is read.

  Attributes:
    subject_id: the record's ``subject_id`` and key.
    images: one file per channel, in channel order.
    label: the label map file, or None for an unlabelled case.
    grade: the record's ``grade``.
  """

  subject_id: str
  images: tuple[pathlib.Path, ...]
  label: pathlib.Path | None = None
  grade: int = 0


def sort_cases(cases: Sequence[Case], where: PathLike) -> list[Case]:
  """``cases`` sorted by subject id; two cases with one id raise ValueError naming both."""
  by_id: dict[str, Case] = {}
  for case in cases:
    other = by_id.setdefault(case.subject_id, case)
    if other is not case:
      raise ValueError(
          f"two cases with subject id {case.subject_id!r} under {describe(where)}: "
          f"{describe(other.images[0].parent)} and {describe(case.images[0].parent)}; keep one")
  return [by_id[k] for k in sorted(by_id)]


def read_example(case: Case, *, pathology: str,
                 read_label: Callable[[pathlib.Path], np.ndarray] | None = None
                 ) -> dict[str, Any]:
  """Reads one case into a record (the dict `features` encodes).

  Args:
    case: the files.
    pathology: `jaxmed.data.subject.PATHOLOGIES` entry the label map is validated against.
    read_label: ``path -> uint8 (D, H, W)`` label reader; default
      ``nifti._load_label(path, pathology)``.

  Returns:
    ``{"subject_id", "image" (D, H, W, C) float32, "label" (D, H, W) uint8, "has_label",
    "spacing" (3,) float32, "grade"}``; spacing is the first channel's.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: a file is unreadable, a volume holds NaN / inf, shapes differ, or a label map
      holds values not allowed for ``pathology``.
  """
  image, spacing = nifti.read_channels(case.images, case.subject_id)
  if case.label is None:
    label = np.zeros(image.shape[:3], np.uint8)
  else:
    label = (read_label(case.label) if read_label is not None else
             nifti._load_label(case.label, pathology)[0])  # pylint: disable=protected-access
    if label.shape != image.shape[:3]:
      raise ValueError(
          f"shape mismatch in case {case.subject_id}: {describe(case.images[0])} has shape "
          f"{image.shape[:3]} but {describe(case.label)} has shape {label.shape}")
  return {
      "subject_id": case.subject_id,
      "image": image,
      "label": np.asarray(label, np.uint8),
      "has_label": case.label is not None,
      "spacing": np.asarray(spacing, np.float32),
      "grade": int(case.grade),
  }


class VolumeBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the volume builders: one record per `Case` that `_find_cases` lists.

  Subclasses set `MODALITIES`, `PATHOLOGY`, the DatasetInfo texts and
  ``MANUAL_DOWNLOAD_INSTRUCTIONS``, and implement `_find_cases`; they may override
  `_read_label`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Channel names, in channel order of the records' ``image``.
  MODALITIES: tuple[str, ...] = ()
  # What the label values mean (`jaxmed.data.subject.PATHOLOGIES`).
  PATHOLOGY: str = "none"
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=features(len(self.MODALITIES)),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(modalities=list(self.MODALITIES),
                                        pathology=self.PATHOLOGY),
        disable_shuffling=True,
    )

  @abc.abstractmethod
  def _find_cases(self, manual_dir: pathlib.Path) -> Mapping[str, Sequence[Case]]:
    """Split name -> cases (sorted by subject id) found in ``manual_dir``; empty splits are
    dropped. Raises FileNotFoundError naming the path when a required file is missing."""

  def _read_label(self, path: pathlib.Path) -> np.ndarray:
    """Reads one label map as uint8 ``(D, H, W)``."""
    return nifti._load_label(path, self.PATHOLOGY)[0]  # pylint: disable=protected-access

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(os.path.abspath(os.fspath(dl_manager.manual_dir)))
    splits = {name: list(cases) for name, cases in self._find_cases(manual_dir).items() if cases}
    if not splits:
      what = self.name + (f" {self.builder_config.name}" if self.builder_config else "")
      raise FileNotFoundError(
          f"no {what} cases found under {describe(manual_dir)}; expected layout:\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {name: self._generate_examples(cases) for name, cases in splits.items()}

  def _generate_examples(self, cases: Sequence[Case]) -> Iterator[tuple[str, dict[str, Any]]]:
    for case in cases:
      yield case.subject_id, read_example(case, pathology=self.PATHOLOGY,
                                          read_label=self._read_label)


def record_to_subject(record: Mapping[str, Any], *, modalities: Sequence[str],
                      pathology: str) -> Subject:
  """One record (``data_source(...)[i]``) -> `Subject`.

  Args:
    record: dict with the keys of `features`.
    modalities: channel names (the builder's ``MODALITIES``).
    pathology: the builder's ``PATHOLOGY``.

  Returns:
    `Subject` with the raw ``image (D, H, W, C)`` float32, ``label (D, H, W)`` uint8 (None
    when ``has_label`` is false), ``brain_mask`` = any channel nonzero (as
    `jaxmed.data.nifti.read_case`), spacing, grade and the decoded subject id.
  """
  if pathology not in PATHOLOGIES:
    raise ValueError(f"pathology must be one of {PATHOLOGIES}; got pathology={pathology!r}")
  subject_id = record["subject_id"]
  if isinstance(subject_id, (bytes, np.bytes_)):
    subject_id = subject_id.decode("utf-8")
  image = np.asarray(record["image"], dtype=np.float32)
  label = np.asarray(record["label"], dtype=np.uint8) if bool(record["has_label"]) else None
  return Subject(
      subject_id=str(subject_id),
      image=image,
      label=label,
      modalities=tuple(modalities),
      spacing=tuple(float(s) for s in np.asarray(record["spacing"]).reshape(3)),
      brain_mask=np.any(image != 0, axis=-1),
      grade=int(record["grade"]),
      pathology=pathology,
  )


class SubjectSequence(collections.abc.Sequence):
  """Lazy `Subject` view of a random-access record source: a record is read and converted on
  each ``seq[i]`` (a slice returns a list)."""

  def __init__(self, source: Any, *, modalities: Sequence[str], pathology: str):
    self.source = source
    self.modalities = tuple(modalities)
    self.pathology = pathology

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f"subject index {index} out of range for {n} subjects")
    return record_to_subject(self.source[index % n], modalities=self.modalities,
                             pathology=self.pathology)


def subjects_from_source(name: str, split: str, *, data_dir: PathLike,
                         config: str | None = None) -> SubjectSequence:
  """Lazy `Subject` sequence over a prepared split of volume dataset ``name``.

  Args:
    name: a volume dataset of `jaxmed.data.tfds.BUILDERS` (``"brats"``, ``"wmh"``,
      ``"btcv"``, ``"feta"``).
    split: e.g. ``"train"``.
    data_dir: where it was prepared.
    config: builder config (BraTS year).

  Returns:
    `SubjectSequence` with the dataset's modalities and pathology.
  """
  cls = jtfds.builder_class(name)
  if not issubclass(cls, VolumeBuilder):
    raise ValueError(f"{name!r} is not a volume dataset (its records are not subjects)")
  source = jtfds.data_source(name, split, data_dir=data_dir, config=config)
  return SubjectSequence(source, modalities=cls.MODALITIES, pathology=cls.PATHOLOGY)
