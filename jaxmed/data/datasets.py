"""Subjects from a config (synthetic phantoms, a NIfTI folder, a TFDS split), subject-level splits.

Config fields (``config.data``):
  source: "auto" (the default: "nifti" when ``root`` is set, "tfds" when ``tfds.name`` is, else
    "synthetic"), "synthetic" (embedded phantoms, in memory), "nifti" (``root`` folder) or
    "tfds" (a prepared `jaxmed.data.tfds` volume dataset).
  root: NIfTI folder (BraTS layout ``<case>/<case>_<name>.nii.gz``).
  tfds: ``name`` (brats, wmh, btcv, feta; fastmri: one subject per knee volume of targets),
    ``config`` (e.g. the BraTS year), ``split``, ``data_dir`` (prepared datasets), optional
    ``manual_dir`` (the downloaded official layout, prepared into ``data_dir`` on first use).
  modalities: channel names to use, e.g. ("t1", "t1ce", "t2", "flair").
  seg: segmentation file name for NIfTI folders ("" = none). pattern: file name pattern.
  pathology: "tumour" (BraTS labels / WT-TC-ET regions), "wmh", "organs", "tissues".
  num_subjects, shape, noise: phantom count, volume shape (D, H, W), Rician noise level.
  Preprocessing of NIfTI / TFDS cases (`jaxmed.data.cache.Preprocessing`, done once per case
    into ``cache_dir``): spacing (target mm, () = keep), crop_foreground, normalize ("zscore",
    "window", "none"), window, foreground ("nonzero" / "threshold" at foreground_threshold),
    crop (final (D, H, W) crop / pad, () = keep); on_error ("raise" / "skip" unreadable cases), preprocess_workers (0 = one per CPU).
  seed: data seed (phantom generation and splits).
  num_val, num_test: held-out subjects.
  min_foreground: drop axial slices with a smaller brain fraction.

NIfTI and TFDS subjects are file-backed (`jaxmed.data.cache.CachedSubjects`): nothing but
metadata is held in memory, and splits of them stay file-backed.
"""

from __future__ import annotations

import numpy as np

from jaxmed.data import cache, sources, synthetic
from jaxmed.data.subject import Subject, select_modalities

SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "nifti", "tfds")


def load_subjects(cfg):
  """All subjects of the configured source, channels restricted to ``cfg.modalities``: a list
  of in-memory phantoms, or `jaxmed.data.cache.CachedSubjects` for NIfTI / TFDS data."""
  source = resolve_source(cfg)
  if source == "synthetic":
    subjects = synthetic.make_subjects(int(cfg.num_subjects), seed=int(cfg.seed),
                                       shape=tuple(cfg.shape), pathology=cfg.pathology,
                                       noise=float(cfg.get("noise", 0.03)))
    return [select_modalities(s, tuple(cfg.modalities)) for s in subjects]
  if source == "nifti":
    if not cfg.get("root"):
      raise ValueError("data.root must name a NIfTI folder when data.source='nifti'")
    kwargs = {"modalities": tuple(cfg.modalities), "seg": cfg.get("seg") or None,
              "pathology": cfg.pathology}
    if cfg.get("pattern"):
      kwargs["pattern"] = cfg.pattern
    reader = cache.NiftiReader(cfg.root, **kwargs)
  else:
    spec = cfg.get("tfds") or {}
    if not spec.get("name"):
      raise ValueError("data.tfds.name must name a TFDS dataset when data.source='tfds'")
    if not spec.get("data_dir"):
      raise ValueError("data.tfds.data_dir must be the folder the dataset is prepared into")
    split, manual_dir = spec.get("split") or "train", spec.get("manual_dir") or None
    if spec["name"] == "fastmri":
      if tuple(cfg.modalities) != cache.FastmriReader.modalities:
        raise ValueError(f"fastMRI subjects have one channel {cache.FastmriReader.modalities}; "
                         f"set data.modalities=magnitude (got {tuple(cfg.modalities)})")
      reader = cache.FastmriReader(split, data_dir=spec["data_dir"], manual_dir=manual_dir)
    else:
      reader = cache.TfdsReader(spec["name"], split, data_dir=spec["data_dir"],
                                config=spec.get("config") or None,
                                modalities=tuple(cfg.modalities), manual_dir=manual_dir)
  return cache.build_cache(reader, cache.Preprocessing.from_config(cfg),
                           cache_root=cfg.get("cache_dir") or None,
                           on_error=cfg.get("on_error", "raise"),
                           workers=int(cfg.get("preprocess_workers", 0)))


def resolve_source(cfg) -> str:
  """One of `SOURCES`: ``data.source``, with "auto" meaning NIfTI when ``data.root`` is set,
  TFDS when ``data.tfds.name`` is, else synthetic."""
  source = cfg.get("source", "auto")
  if source == "auto":
    if cfg.get("root"):
      return "nifti"
    return "tfds" if (cfg.get("tfds") or {}).get("name") else "synthetic"
  if source not in SOURCES:
    raise ValueError(f"data.source must be 'auto' or one of {SOURCES}; got {source!r}")
  return source


def split_subjects(subjects, *, num_val: int, num_test: int, seed: int) -> dict[str, list]:
  """Seeded subject-level split into train / val / test (no subject in two splits)."""
  n = len(subjects)
  if num_val < 0 or num_test < 0 or num_val + num_test >= n:
    raise ValueError(f"num_val={num_val} + num_test={num_test} must leave training subjects "
                     f"out of {n}")
  order = np.random.default_rng(seed).permutation(n)
  test, val, train = np.split(order, [num_test, num_test + num_val])
  return {name: take(subjects, sorted(idx))
          for name, idx in (("train", train), ("val", val), ("test", test))}


def take(subjects, indices):
  """``subjects[i] for i in indices``: a list, or a file-backed subset of a file-backed
  sequence (no subject is opened)."""
  if hasattr(subjects, "subset"):
    return subjects.subset(indices)
  return [subjects[int(i)] for i in indices]


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
  return take(subjects, index)


def slice_view(subjects, *, min_foreground: float = 0.2) -> dict[str, np.ndarray]:
  """Axial slices of ``subjects`` whose fraction of `brain_mask` voxels is >= ``min_foreground``,
  as one in-memory table (`jaxmed.data.sources.SliceSource` rows, stacked).

  Returns:
    ``{"image": (S, H, W, C) float32, "label": (S, H, W) uint8, "brain_mask": (S, H, W) bool,
    "subject_index": (S,) int32, "slice_index": (S,) int32}``, subjects in order.
  """
  return sources.materialize(sources.SliceSource(subjects, min_foreground=min_foreground))


def load_splits(cfg) -> dict[str, list[Subject]]:
  """``{"train": [...], "val": [...], "test": [...]}`` subjects from ``config.data``."""
  return split_subjects(load_subjects(cfg), num_val=int(cfg.get("num_val", 0)),
                        num_test=int(cfg.get("num_test", 0)), seed=int(cfg.seed))
