"""FeTA fetal brain tissue annotation (MICCAI FeTA challenge, releases 2.1 / 2.2), from the
official BIDS layout (manual download).

Each record is one super-resolution reconstructed fetal brain (one channel ``t2``) with the 7
tissue labels 0..7 of `jaxmed.data.subject.CLASS_NAMES` ``["tissues"]``
(`jaxmed.data.tfds.volumes` has the record format). Layout read from ``manual_dir`` (also
below a ``feta_2.1/`` / ``feta_2.2/`` folder)::

  sub-001/anat/sub-001_rec-mial_T2w.nii.gz
  sub-001/anat/sub-001_rec-mial_dseg.nii.gz
  sub-021/anat/sub-021_rec-irtk_T2w.nii.gz      (the reconstruction tag varies per subject:
  sub-041/anat/sub-041_rec-nmic_T2w.nii.gz       mial, irtk, nmic, ...)

A subject folder is a folder ``sub-<label>`` holding ``anat/``; it must hold exactly one
``sub-<label>[_rec-<tag>]_T2w.nii[.gz]`` and the ``..._dseg`` label map with the same tag. All
subjects form split ``"train"``; the subject id is ``sub-<label>``. ``participants.tsv`` and
the JSON sidecars are not read.
"""

from __future__ import annotations

import pathlib
import re

from jaxmed.data.tfds import volumes

_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


def _is_subject_dir(path: pathlib.Path) -> bool:
  return bool(_SUBJECT.fullmatch(path.name)) and (path / "anat").is_dir()


class Feta(volumes.VolumeBuilder):
  """FeTA fetal brain T2w: one channel, 7 tissue labels."""

  MODALITIES = ("t2",)
  PATHOLOGY = "tissues"
  DESCRIPTION = (
      "Fetal Tissue Annotation (FeTA) challenge: super-resolution reconstructed T2-weighted "
      "fetal brain MRI with labels 1 external CSF, 2 grey matter, 3 white "
      "matter, 4 ventricles, 5 cerebellum, 6 deep grey matter, 7 brainstem. Raw intensities in "
      "canonical orientation.")
  HOMEPAGE = "https://feta.grand-challenge.org"
  CITATION = """@article{payette2021feta,
  title={An automatic multi-tissue human fetal brain segmentation benchmark using the Fetal
         Tissue Annotation Dataset},
  author={Payette, Kelly and others},
  journal={Scientific Data},
  volume={8}, number={1}, pages={167}, year={2021}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Request the FeTA dataset (data access via https://feta.grand-challenge.org) and unpack it
  into manual_dir, keeping the BIDS folders, e.g.
  manual_dir/feta_2.1/sub-001/anat/sub-001_rec-mial_T2w.nii.gz and ..._rec-mial_dseg.nii.gz.
  """

  def _find_cases(self, manual_dir: pathlib.Path) -> dict[str, list[volumes.Case]]:
    cases = []
    for subject_dir in volumes.walk_dirs(manual_dir, _is_subject_dir):
      subject = subject_dir.name
      anat = subject_dir / "anat"
      t2w = re.compile(re.escape(subject) + r"(_rec-[A-Za-z0-9]+)?_T2w")
      images = [p for p in volumes.nifti_files(anat) if t2w.fullmatch(volumes.nifti_stem(p.name))]
      if not images:
        expected = anat / f"{subject}_rec-<tag>_T2w.nii.gz"
        raise FileNotFoundError(
            f"FeTA T2w file not found: {volumes.describe(expected)} (nor .nii, nor without the "
            f"rec entity)")
      if len(images) > 1:
        raise ValueError(
            f"several FeTA T2w files in {volumes.describe(anat)}: {[p.name for p in images]}; "
            f"keep one")
      rec = t2w.fullmatch(volumes.nifti_stem(images[0].name)).group(1) or ""
      label = volumes.require_nifti(anat, f"{subject}{rec}_dseg", "FeTA label file")
      cases.append(volumes.Case(subject_id=subject, images=(images[0],), label=label))
    return {"train": volumes.sort_cases(cases, manual_dir)}
