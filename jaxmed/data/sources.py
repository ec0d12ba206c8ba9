"""Random-access example sources: rows of training examples read on demand from subjects.

A source is a `grain.sources.RandomAccessDataSource` (``len(source)``, ``source[i]`` -> a dict
of numpy arrays) with ``columns``: small in-memory per-row index arrays (``subject_index``,
``slice_index``, ``labelled``, ...) that samplers read without touching the data. Subjects may
be in memory (a list of `Subject`, e.g. phantoms) or file-backed (`jaxmed.data.cache`: each
``subjects[i]`` memory-maps one preprocessed case, so a source never holds the dataset):

  * `SliceSource`: one row per axial slice with enough brain (``min_foreground``).
  * `VolumeSource`: one row per subject, the whole volume (``lazy``: memory-mapped arrays that a
    crop sampler cuts without reading the rest).
  * `ModalitySource`: every channel of another source's rows as its own single-channel row.
  * `ArraySource`: rows of a dict of equal-length in-memory arrays.

A subject sequence is anything with ``len`` and ``[i]`` -> `Subject`; it may also offer
``info(i)`` -> `SubjectInfo` (cached metadata, so that building a slice table reads no volume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from jaxmed.data.subject import Subject


@dataclasses.dataclass(frozen=True)
class SubjectInfo:
  """What the row tables need to know about a subject, without its voxels.

  Attributes:
    subject_id: the subject's name.
    shape: image shape ``(D, H, W, C)``.
    slice_foreground: ``(D,)`` float32 fraction of brain-mask voxels per axial slice.
    slice_labelled: ``(D,)`` bool, whether an axial slice holds a labelled voxel (label > 0).
    has_label: whether the subject has a label map.
  """

  subject_id: str
  shape: tuple[int, int, int, int]
  slice_foreground: np.ndarray
  slice_labelled: np.ndarray
  has_label: bool

  def to_json(self) -> dict:
    return {"subject_id": self.subject_id, "shape": list(self.shape),
            "slice_foreground": [float(f) for f in self.slice_foreground],
            "slice_labelled": [bool(b) for b in self.slice_labelled],
            "has_label": self.has_label}

  @classmethod
  def from_json(cls, data: Mapping) -> SubjectInfo:
    return cls(str(data["subject_id"]), tuple(int(s) for s in data["shape"]),
               np.asarray(data["slice_foreground"], np.float32),
               np.asarray(data["slice_labelled"], bool), bool(data["has_label"]))


def subject_info(subject: Subject) -> SubjectInfo:
  """`SubjectInfo` computed from a subject's arrays."""
  mask = np.asarray(subject.brain_mask, bool)
  foreground = mask.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
  if subject.label is None:
    labelled = np.zeros(mask.shape[0], bool)
  else:
    labelled = (np.asarray(subject.label) > 0).any(axis=(1, 2))
  return SubjectInfo(subject.subject_id, tuple(int(s) for s in subject.image.shape), foreground,
                     labelled, subject.label is not None)


def subject_infos(subjects) -> list[SubjectInfo]:
  """One `SubjectInfo` per subject: the sequence's ``info(i)`` when it has one (no voxels are
  read), else computed from each subject's arrays."""
  if hasattr(subjects, "info"):
    return [subjects.info(i) for i in range(len(subjects))]
  return [subject_info(subjects[i]) for i in range(len(subjects))]


def shard_subjects(subjects, index: int, count: int):
  """Subjects ``index::count`` (a process's share; a file-backed sequence stays file-backed)."""
  if not 0 <= index < count:
    raise ValueError(f"shard index must be in [0, {count}); got {index}")
  if len(subjects) < count:
    raise ValueError(f"{len(subjects)} subjects cannot be sharded over {count} processes")
  if hasattr(subjects, "subset"):
    return subjects.subset(range(index, len(subjects), count))
  return list(subjects)[index::count]


def _check_subjects(subjects):
  if isinstance(subjects, Subject) or not hasattr(subjects, "__len__"):
    raise ValueError(f"subjects must be a sequence of Subject; got {type(subjects).__name__}")
  if not len(subjects):
    raise ValueError("subjects must be a non-empty sequence of Subject")
  return subjects


class ArraySource(grain.sources.RandomAccessDataSource):
  """Rows of a dict of equal-length in-memory arrays; ``columns`` are its 1-D arrays."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if not lengths:
      raise ValueError("arrays must hold at least one array")
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must have equal lengths; got {lengths}")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._len = next(iter(lengths.values()))
    if not self._len:
      raise ValueError(f"arrays hold no examples ({self!r}); e.g. no slice passed "
                       "data.min_foreground")
    self.columns = {k: v for k, v in self.arrays.items() if v.ndim == 1}
    if "label" in self.arrays and "labelled" not in self.columns:
      label = self.arrays["label"]
      self.columns["labelled"] = (label > 0).reshape(len(label), -1).any(axis=1)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __repr__(self):
    shapes = {k: v.shape for k, v in self.arrays.items()}
    return f"ArraySource({shapes})"


def as_source(data) -> grain.sources.RandomAccessDataSource:
  """``data`` as a source: a dict of arrays becomes an `ArraySource`; a source is returned."""
  if isinstance(data, Mapping):
    return ArraySource(data)
  if not (hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "columns")):
    raise ValueError(f"expected a dict of arrays or an example source (len, [i], columns); got "
                     f"{type(data).__name__}")
  return data


def _label_or_zeros(subject: Subject, index=()) -> np.ndarray:
  if subject.label is None:
    return np.zeros(np.shape(subject.image[index])[:-1], np.uint8)
  return np.asarray(subject.label[index], np.uint8)


class SliceSource(grain.sources.RandomAccessDataSource):
  """One row per axial slice whose brain fraction is >= ``min_foreground``.

  Row ``i`` is slice ``slice_index[i]`` of ``subjects[subject_index[i]]`` (subjects in order,
  slices ascending): ``{"image": (H, W, C) float32, "label": (H, W) uint8 (zeros without a
  label), "brain_mask": (H, W) bool, "subject_index": int32, "slice_index": int32}``. Only that
  slice is read (a file-backed subject is memory-mapped, then released).

  ``columns``: ``subject_index``, ``slice_index`` (S,) int32 and ``labelled`` (S,) bool.
  """

  def __init__(self, subjects, *, min_foreground: float = 0.2):
    self.subjects = _check_subjects(subjects)
    min_foreground = float(min_foreground)
    if not 0.0 <= min_foreground <= 1.0:
      raise ValueError(f"min_foreground must be in [0, 1]; got {min_foreground}")
    self.min_foreground = min_foreground
    infos = subject_infos(subjects)
    hwc = infos[0].shape[1:]
    subject_index, slice_index, labelled = [], [], []
    for i, info in enumerate(infos):
      if info.shape[1:] != hwc:
        raise ValueError(
            f"subjects must share (H, W, C); subjects[{i}] ({info.subject_id}) has "
            f"{info.shape[1:]}, subjects[0] ({infos[0].subject_id}) has {hwc}")
      keep = np.flatnonzero(info.slice_foreground >= min_foreground)
      subject_index.append(np.full(keep.shape, i, np.int32))
      slice_index.append(keep.astype(np.int32))
      labelled.append(info.slice_labelled[keep])
    self.num_channels = hwc[-1]
    self.columns = {"subject_index": np.concatenate(subject_index),
                    "slice_index": np.concatenate(slice_index),
                    "labelled": np.concatenate(labelled).astype(bool)}
    if not len(self):
      raise ValueError(f"no slice of the {len(infos)} subjects has a brain fraction >= "
                       f"min_foreground={min_foreground}")

  def __len__(self) -> int:
    return len(self.columns["subject_index"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    s, k = int(self.columns["subject_index"][index]), int(self.columns["slice_index"][index])
    subject = self.subjects[s]
    return {"image": np.array(subject.image[k], np.float32),
            "label": _label_or_zeros(subject, k).copy(),
            "brain_mask": np.array(subject.brain_mask[k], bool),
            "subject_index": np.int32(s), "slice_index": np.int32(k)}

  def __repr__(self):
    return (f"SliceSource({len(self)} slices of {len(self.subjects)} subjects, "
            f"min_foreground={self.min_foreground})")


class VolumeSource(grain.sources.RandomAccessDataSource):
  """One row per subject: ``{"image": (D, H, W, C) float32, "label": (D, H, W) uint8 (zeros
  without a label), "brain_mask": (D, H, W) bool, "subject_index": int32}``.

  Subjects must share one shape (crop / pad them with ``data.crop``), or with ``lazy`` only
  their channels. With ``lazy`` the arrays are the subject's own (memory-mapped for a
  file-backed subject), for a transform that cuts a fixed-size part of them
  (`jaxmed.data.views.CropSampler`); otherwise they are read into memory.

  ``columns``: ``subject_index`` (S,) int32 and ``labelled`` (S,) bool.
  """

  def __init__(self, subjects, *, lazy: bool = False):
    self.subjects = _check_subjects(subjects)
    self.lazy = bool(lazy)
    infos = subject_infos(subjects)
    for i, info in enumerate(infos):
      if (info.shape[-1:] if self.lazy else info.shape) != (
          infos[0].shape[-1:] if self.lazy else infos[0].shape):
        raise ValueError(
            f"a volume view needs subjects of one (D, H, W, C) shape; subjects[{i}] "
            f"({info.subject_id}) has {info.shape}, subjects[0] ({infos[0].subject_id}) has "
            f"{infos[0].shape}. Crop / pad them to a common size with data.crop (D, H, W).")
    self.num_channels = infos[0].shape[-1]
    self.columns = {"subject_index": np.arange(len(infos), dtype=np.int32),
                    "labelled": np.array([bool(i.slice_labelled.any()) for i in infos])}

  def __len__(self) -> int:
    return len(self.subjects)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    subject = self.subjects[int(index)]
    label = (np.zeros(subject.image.shape[:3], np.uint8) if subject.label is None
             else subject.label)
    arrays = {"image": subject.image, "label": label, "brain_mask": subject.brain_mask}
    if not self.lazy:
      arrays = {"image": np.array(arrays["image"], np.float32),
                "label": np.array(arrays["label"], np.uint8),
                "brain_mask": np.array(arrays["brain_mask"], bool)}
    return {**arrays, "subject_index": np.int32(index)}

  def __repr__(self):
    return f"VolumeSource({len(self)} subjects, lazy={self.lazy})"


class ModalitySource(grain.sources.RandomAccessDataSource):
  """Every channel of every row of ``source`` as its own single-channel row, for cross-modal
  objectives: row ``s * C + c`` is channel ``c`` of row ``s``, ``image`` ``(..., 1)``, plus
  ``modality`` (int32 channel index); ``columns`` repeated ``C`` times, plus ``modality``."""

  def __init__(self, source):
    if "modality" in source.columns:
      raise ValueError("the source already has 'modality' rows: per_modality applied twice")
    self.source = source
    self.num_channels = int(getattr(source, "num_channels", 0) or np.shape(source[0]["image"])[-1])
    self.columns = {k: np.repeat(v, self.num_channels, axis=0) for k, v in source.columns.items()}
    self.columns["modality"] = np.tile(np.arange(self.num_channels, dtype=np.int32), len(source))

  def __len__(self) -> int:
    return len(self.source) * self.num_channels

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row, channel = divmod(int(index), self.num_channels)
    example = self.source[row]
    return {**example, "image": example["image"][..., channel:channel + 1],
            "modality": np.int32(channel)}

  def __repr__(self):
    return f"ModalitySource({self.source!r}, {self.num_channels} channels)"


def materialize(source, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Rows of ``source`` (all by default) stacked into a dict of in-memory arrays."""
  rows = range(len(source)) if rows is None else rows
  examples = [source[int(i)] for i in rows]
  if not examples:
    raise ValueError(f"no rows to materialize from {source!r}")
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
