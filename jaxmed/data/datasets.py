"""Subjects from a config (synthetic phantoms or a NIfTI folder), subject-level splits, 2D slices.

Config fields (``config.data``):
  source: "auto" (the default: "nifti" when ``root`` is set, else "synthetic"), "synthetic"
    (embedded phantoms) or "nifti" (``root`` folder).
  root: NIfTI folder (BraTS layout ``<case>/<case>_<name>.nii.gz``).
  modalities: channel names to use, e.g. ("t1", "t1ce", "t2", "flair").
  seg: segmentation file name for NIfTI folders ("" = none). pattern: file name pattern.
  pathology: "tumour" (BraTS labels / WT-TC-ET regions) or "wmh".
  num_subjects, shape, noise: phantom count, volume shape (D, H, W), Rician noise level.
  crop: NIfTI crop/pad size (D, H, W), () = keep.
  seed: data seed (phantom generation and splits).
  num_val, num_test: held-out subjects.
  min_foreground: drop axial slices with a smaller brain fraction.
"""

from __future__ import annotations

import numpy as np

from jaxmed.data import nifti, synthetic
from jaxmed.data.subject import Subject

SPLITS = ("train", "val", "test")


def load_subjects(cfg) -> list[Subject]:
  """All subjects of the configured source, channels restricted to ``cfg.modalities``."""
  source = resolve_source(cfg)
  if source == "synthetic":
    subjects = synthetic.make_subjects(int(cfg.num_subjects), seed=int(cfg.seed),
                                       shape=tuple(cfg.shape), pathology=cfg.pathology,
                                       noise=float(cfg.get("noise", 0.03)))
  else:
    if not cfg.get("root"):
      raise ValueError("data.root must name a NIfTI folder when data.source='nifti'")
    kwargs = {"modalities": tuple(cfg.modalities), "seg": cfg.get("seg") or None,
              "pathology": cfg.pathology, "shape": tuple(cfg.get("crop", ())) or None}
    if cfg.get("pattern"):
      kwargs["pattern"] = cfg.pattern
    subjects = nifti.read_folder(cfg.root, **kwargs)
  return [select_modalities(s, tuple(cfg.modalities)) for s in subjects]


def resolve_source(cfg) -> str:
  """``"synthetic"`` or ``"nifti"``: ``data.source``, with "auto" meaning NIfTI when
  ``data.root`` is set."""
  source = cfg.get("source", "auto")
  if source == "auto":
    return "nifti" if cfg.get("root") else "synthetic"
  if source not in ("synthetic", "nifti"):
    raise ValueError(f"data.source must be 'auto', 'synthetic' or 'nifti'; got {source!r}")
  return source


def select_modalities(subject: Subject, modalities: tuple[str, ...]) -> Subject:
  """The subject with only the named channels, in the given order."""
  if tuple(subject.modalities) == modalities:
    return subject
  missing = [m for m in modalities if m not in subject.modalities]
  if missing:
    raise ValueError(f"data.modalities {missing} not in subject {subject.subject_id} "
                     f"modalities {subject.modalities}")
  index = [subject.modalities.index(m) for m in modalities]
  return Subject(subject.subject_id, subject.image[..., index], subject.label, modalities,
                 subject.spacing, subject.brain_mask, subject.grade, subject.pathology)


def split_subjects(subjects, *, num_val: int, num_test: int, seed: int) -> dict[str, list]:
  """Seeded subject-level split into train / val / test (no subject in two splits)."""
  n = len(subjects)
  if num_val < 0 or num_test < 0 or num_val + num_test >= n:
    raise ValueError(f"num_val={num_val} + num_test={num_test} must leave training subjects "
                     f"out of {n}")
  order = np.random.default_rng(seed).permutation(n)
  test, val, train = np.split(order, [num_test, num_test + num_val])
  return {name: [subjects[i] for i in sorted(idx)]
          for name, idx in (("train", train), ("val", val), ("test", test))}


def repeated_splits(subjects, *, repeats: int, num_val: int, num_test: int,
                    seed: int) -> list[dict[str, list]]:
  """``repeats`` random subject-level splits (seeds ``seed``, ``seed + 1``, ...), for repeating
  an experiment over splits (source_identification Tables 1-2: 3 random splits)."""
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1; got {repeats}")
  return [split_subjects(subjects, num_val=num_val, num_test=num_test, seed=seed + r)
          for r in range(repeats)]


def labeled_subset(subjects, *, num_labeled: int = 0, label_fraction: float = 1.0,
                   seed: int = 0) -> list:
  """The subjects whose labels fine-tuning may use: ``num_labeled`` of them if > 0, else
  ``round(label_fraction * n)`` (at least 1), chosen with ``seed``."""
  n = len(subjects)
  if num_labeled:
    if not 0 < num_labeled <= n:
      raise ValueError(f"num_labeled must be in [1, {n}]; got {num_labeled}")
    k = num_labeled
  else:
    if not 0.0 < label_fraction <= 1.0:
      raise ValueError(f"label_fraction must be in (0, 1]; got {label_fraction}")
    k = max(1, round(label_fraction * n))
  index = np.sort(np.random.default_rng(seed).permutation(n)[:k])
  return [subjects[i] for i in index]


def slice_view(subjects, *, min_foreground: float = 0.2) -> dict[str, np.ndarray]:
  """Axial slices of ``subjects`` whose fraction of `brain_mask` voxels is >= ``min_foreground``.

  Returns:
    ``{"image": (S, H, W, C) float32, "label": (S, H, W) uint8, "brain_mask": (S, H, W) bool,
    "subject_index": (S,) int32, "slice_index": (S,) int32}``, subjects in order.
  """
  subjects = list(subjects)
  if not subjects:
    raise ValueError("subjects must be a non-empty sequence of Subject")
  min_foreground = float(min_foreground)
  if not 0.0 <= min_foreground <= 1.0:
    raise ValueError(f"min_foreground must be in [0, 1]; got {min_foreground}")
  hwc = subjects[0].image.shape[1:]
  images, labels, masks, subject_index, slice_index = [], [], [], [], []
  for i, subject in enumerate(subjects):
    if subject.image.shape[1:] != hwc:
      raise ValueError(
          f"subjects must share (H, W, C); subjects[{i}] ({subject.subject_id}) has "
          f"{subject.image.shape[1:]}, subjects[0] has {hwc}")
    keep = np.flatnonzero(subject.brain_mask.mean(axis=(1, 2)) >= min_foreground)
    label = subject.label if subject.label is not None else np.zeros(subject.image.shape[:3])
    images.append(subject.image[keep].astype(np.float32, copy=False))
    labels.append(label[keep].astype(np.uint8, copy=False))
    masks.append(subject.brain_mask[keep].astype(bool, copy=False))
    subject_index.append(np.full(keep.shape, i, np.int32))
    slice_index.append(keep.astype(np.int32))
  return {
      "image": np.concatenate(images),
      "label": np.concatenate(labels),
      "brain_mask": np.concatenate(masks),
      "subject_index": np.concatenate(subject_index),
      "slice_index": np.concatenate(slice_index),
  }


def load_splits(cfg) -> dict[str, list[Subject]]:
  """``{"train": [...], "val": [...], "test": [...]}`` subjects from ``config.data``."""
  return split_subjects(load_subjects(cfg), num_val=int(cfg.get("num_val", 0)),
                        num_test=int(cfg.get("num_test", 0)), seed=int(cfg.seed))
