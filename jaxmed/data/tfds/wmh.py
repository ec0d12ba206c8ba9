"""MICCAI 2017 White Matter Hyperintensities (WMH) segmentation challenge, from the official
layout (manual download).

Each record is one case with channels ``(t1, flair)`` (the organisers' preprocessed ``pre/``
images: bias-corrected, T1 registered to the FLAIR) and the WMH label map in {0, 1}
(`jaxmed.data.tfds.volumes` has the record format). Layouts read from ``manual_dir``::

  training/{Utrecht,Singapore,GE3T}/<id>/pre/{T1,FLAIR}.nii.gz + <id>/wmh.nii.gz   (2017)
  {Utrecht,Singapore,GE3T}/<id>/...                         (site archives unpacked directly)
  training/{Utrecht,Singapore,Amsterdam/GE3T}/<id>/...      (2022 full release, DataverseNL)
  test/{Utrecht,Singapore,Amsterdam/{GE3T,GE1T5,...}}/<id>/...

A case folder is any folder holding a ``pre/`` folder; ``.nii`` files are accepted as well.
Cases below a ``test`` folder form split ``"test"`` (label optional: ``has_label`` is false
without ``wmh.nii.gz``); all others form split ``"train"`` and need ``wmh.nii.gz``. The subject
id is ``<site>-<id>`` with ``<site>`` the folder holding the case folder (``GE3T-100``,
``Utrecht-0``, ...), the same in the 2017 and 2022 layouts.

Labels: the challenge's ``wmh.nii.gz`` holds 0 background, 1 WMH and 2 "other pathology" (a
rough, dilated mask of other lesions that the challenge ignores in evaluation). Records keep
WMH as 1 and store label 2 as 0 (background), so label maps are binary as for
``pathology="wmh"``; any other value raises ValueError naming the file.
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxmed.data import nifti
from jaxmed.data.tfds import volumes

# Values of the challenge's label maps: 0 background, 1 WMH, 2 other pathology (-> 0).
WMH_LABEL = 1
OTHER_PATHOLOGY_LABEL = 2


def load_wmh_label(path: pathlib.Path) -> np.ndarray:
  """Reads a challenge ``wmh.nii.gz`` as uint8 ``(D, H, W)`` in {0, 1}: 1 WMH, 0 background and
  "other pathology" (2). Values other than 0, 1, 2 raise ValueError naming the file."""
  data, _ = nifti.load_volume(path)
  if not np.all(np.isfinite(data)):
    raise ValueError(f"label map {volumes.describe(path)} contains NaN or inf values")
  data = np.rint(data)
  bad = sorted(set(np.unique(data).tolist()) - {0.0, WMH_LABEL, OTHER_PATHOLOGY_LABEL})
  if bad:
    raise ValueError(
        f"label map {volumes.describe(path)} has invalid values "
        f"{', '.join(f'{v:g}' for v in bad[:10])}; WMH challenge labels are 0 background, "
        f"1 WMH, 2 other pathology")
  return (data == WMH_LABEL).astype(np.uint8)


class Wmh(volumes.VolumeBuilder):
  """WMH segmentation challenge (MICCAI 2017): T1 + FLAIR, binary WMH labels."""

  MODALITIES = ("t1", "flair")
  PATHOLOGY = "wmh"
  DESCRIPTION = (
      "White Matter Hyperintensities segmentation challenge (MICCAI 2017): T1 and FLAIR brain "
      "MRI of 60 training (and 110 test) subjects from three (five) scanners with manual WMH "
      "labels (1); the challenge's 'other pathology' label 2 is stored as background 0. Raw "
      "intensities of the 'pre' images in canonical orientation.")
  HOMEPAGE = "https://wmh.isi.uu.nl"
  CITATION = """@article{kuijf2019wmh,
  title={Standardized Assessment of Automatic Segmentation of White Matter Hyperintensities
         and Results of the WMH Segmentation Challenge},
  author={Kuijf, Hugo J and others},
  journal={IEEE Transactions on Medical Imaging},
  volume={38}, number={11}, pages={2556--2568}, year={2019}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download the WMH challenge data (https://doi.org/10.34894/AECRSD, or the 2017 training
  archives Utrecht.zip, Singapore.zip, GE3T.zip) and unpack into manual_dir, keeping the
  folders, e.g. manual_dir/training/Utrecht/0/pre/FLAIR.nii.gz, .../pre/T1.nii.gz and
  manual_dir/training/Utrecht/0/wmh.nii.gz. Cases under a "test" folder become the "test"
  split.
  """

  def _read_label(self, path: pathlib.Path) -> np.ndarray:
    return load_wmh_label(path)

  def _find_cases(self, manual_dir: pathlib.Path) -> dict[str, list[volumes.Case]]:
    splits = {"train": [], "test": []}
    for case_dir in volumes.walk_dirs(manual_dir, lambda p: (p / "pre").is_dir()):
      test = volumes.has_folder(case_dir, manual_dir.parent, lambda n: n.lower() == "test")
      images = tuple(volumes.require_nifti(case_dir / "pre", name, f"WMH {name} file")
                     for name in ("T1", "FLAIR"))
      if test:
        label = volumes.find_nifti(case_dir, "wmh")
      else:
        label = volumes.require_nifti(case_dir, "wmh", "WMH label file")
      splits["test" if test else "train"].append(volumes.Case(
          subject_id=f"{case_dir.parent.name}-{case_dir.name}", images=images, label=label))
    return {name: volumes.sort_cases(cases, manual_dir) for name, cases in splits.items()}
