"""BraTS 2018 / 2019 / 2020 / 2021 / 2023 (GLI) brain tumour segmentation, from the official
layouts (manual download).

Builder configs are the challenge years. Each record is one case with channels
``(t1, t1ce, t2, flair)`` and the tumour labels in the 2018 values {0, 1, 2, 4}
(`jaxmed.data.tfds.volumes` has the record format):

  ======  ====================================================================================
  config  case folder (anywhere under ``manual_dir``) and files
  ======  ====================================================================================
  2018    ``[MICCAI_BraTS_2018_Data_Training/]{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}``
  2019    ``[MICCAI_BraTS_2019_Data_Training/]{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair,seg}``
  2020    ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/BraTS20_Training_001_{...,seg}``
  2021    ``[BraTS2021_Training_Data/]BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}``
  2023    ``[...-GLI-Challenge-TrainingData/]BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,
          t2w,t2f,seg}``
  ======  ====================================================================================

Files are ``.nii.gz`` or ``.nii``. A case folder is any folder ``<case>`` holding a file
``<case>_<name>`` (``<case>-<name>`` for 2023) for one of the names above; it must hold every
modality. Case folders below a folder whose name contains ``validation`` (any case, e.g.
``MICCAI_BraTS2020_ValidationData``; ``manual_dir`` itself counts) form split
``"validation"``, where the label is optional (``has_label`` false without one); all others form
split ``"train"`` and need a label.

Quirks handled:
  * 2020: ``BraTS20_Training_355`` ships its label as ``W39_1998.09.19_Segm.nii``. A training
    case without ``<case>_seg`` but with exactly one other NIfTI file (not a modality) uses it.
  * 2023: modalities t1n, t1c, t2w, t2f are stored as t1, t1ce, t2, flair, and the enhancing
    tumour label 3 is stored as 4 (`jaxmed.data.nifti._load_label`).
  * 2018 / 2019: ``grade`` is 1 for cases under ``HGG/``, 0 under ``LGG/``; a training case in
    neither raises ValueError. Other years: grade 0 (their releases have no grade folders).
"""

from __future__ import annotations

import dataclasses
import pathlib

import tensorflow_datasets as tfds

from jaxmed.data.tfds import volumes


@dataclasses.dataclass
class BratsConfig(tfds.core.BuilderConfig):
  """One BraTS year.

  Attributes:
    file_modalities: file name tags of the channels t1, t1ce, t2, flair.
    separator: between the case name and a tag in a file name.
    grade_folders: training cases sit in ``HGG/`` / ``LGG/`` folders that give the grade.
  """

  file_modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
  separator: str = "_"
  grade_folders: bool = False


_SEG = "seg"


class Brats(volumes.VolumeBuilder):
  """BraTS multimodal brain tumour segmentation (one builder config per challenge year)."""

  MODALITIES = ("t1", "t1ce", "t2", "flair")
  PATHOLOGY = "tumour"
  BUILDER_CONFIGS = [
      BratsConfig(name="2018", description="BraTS 2018 (HGG / LGG folders; 285 training cases).",
                  grade_folders=True),
      BratsConfig(name="2019", description="BraTS 2019 (HGG / LGG folders; 335 training cases).",
                  grade_folders=True),
      BratsConfig(name="2020", description="BraTS 2020 (369 training cases)."),
      BratsConfig(name="2021", description="BraTS 2021 / RSNA-ASNR-MICCAI (1251 training cases)."),
      BratsConfig(name="2023", description="BraTS 2023 adult glioma (GLI; 1251 training cases).",
                  file_modalities=("t1n", "t1c", "t2w", "t2f"), separator="-"),
  ]
  DESCRIPTION = (
      "Multimodal Brain Tumor Segmentation (BraTS) challenge: skull-stripped, co-registered "
      "T1, T1ce, T2 and FLAIR MRI (1 mm isotropic) with labels 1 necrotic / non-enhancing "
      "core, 2 edema, 4 enhancing tumour. Raw intensities in canonical orientation.")
  HOMEPAGE = "https://www.synapse.org/brats"
  CITATION = """@article{menze2015brats,
  title={The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)},
  author={Menze, Bjoern H and others},
  journal={IEEE Transactions on Medical Imaging},
  volume={34}, number={10}, pages={1993--2024}, year={2015}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register for the BraTS challenge of the year (CBICA IPP for 2018-2020, Synapse for 2021 and
  2023) and unpack its training (and optionally validation) archive into manual_dir, keeping
  the case folders, e.g.:
    2018/2019: manual_dir/MICCAI_BraTS_2019_Data_Training/HGG/<case>/<case>_t1.nii.gz, ...
    2020:      manual_dir/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/..._flair.nii.gz
    2021:      manual_dir/BraTS2021_Training_Data/BraTS2021_00000/BraTS2021_00000_seg.nii.gz
    2023:      manual_dir/<...>-GLI-Challenge-TrainingData/BraTS-GLI-00000-000/...-t1c.nii.gz
  Validation folders (a name containing "Validation") become the "validation" split.
  """

  def _file_stem(self, case: str, tag: str) -> str:
    return f"{case}{self.builder_config.separator}{tag}"

  def _is_case_dir(self, path: pathlib.Path) -> bool:
    tags = (*self.builder_config.file_modalities, _SEG)
    names = {self._file_stem(path.name, t) + s for t in tags for s in volumes.NIFTI_SUFFIXES}
    try:
      return any(entry.name in names for entry in path.iterdir())
    except OSError:
      return False

  def _find_cases(self, manual_dir: pathlib.Path) -> dict[str, list[volumes.Case]]:
    config = self.builder_config
    splits = {"train": [], "validation": []}
    for case_dir in volumes.walk_dirs(manual_dir, self._is_case_dir):
      case = case_dir.name
      # manual_dir itself may be the validation folder.
      validation = volumes.has_folder(case_dir, manual_dir.parent,
                                      lambda n: "validation" in n.lower())
      images = tuple(
          volumes.require_nifti(case_dir, self._file_stem(case, tag), f"BraTS {tag} file")
          for tag in config.file_modalities)
      label = volumes.find_nifti(case_dir, self._file_stem(case, _SEG))
      if label is None and not validation:
        label = self._misnamed_label(case_dir, images)
      grade = 0
      if config.grade_folders and not validation:
        parent = case_dir.parent.name.upper() if case_dir != manual_dir else ""
        if parent not in ("HGG", "LGG"):
          raise ValueError(
              f"BraTS {config.name} training case {volumes.describe(case_dir)} is not in an HGG/ "
              f"or LGG/ folder, which give its grade; keep the release's folders")
        grade = int(parent == "HGG")
      splits["validation" if validation else "train"].append(
          volumes.Case(subject_id=case, images=images, label=label, grade=grade))
    return {name: volumes.sort_cases(cases, manual_dir) for name, cases in splits.items()}

  def _misnamed_label(self, case_dir: pathlib.Path,
                      images: tuple[pathlib.Path, ...]) -> pathlib.Path:
    """The one non-modality NIfTI file of a training case without ``<case>_seg`` (BraTS 2020
    case 355 ships ``W39_1998.09.19_Segm.nii``); else FileNotFoundError naming the seg file."""
    modality_stems = {volumes.nifti_stem(p.name) for p in images}
    others = [p for p in volumes.nifti_files(case_dir)
              if volumes.nifti_stem(p.name) not in modality_stems]
    if len(others) == 1:
      return others[0]
    expected = case_dir / (self._file_stem(case_dir.name, _SEG) + ".nii.gz")
    found = f"; other NIfTI files there: {[p.name for p in others]}" if others else ""
    raise FileNotFoundError(
        f"BraTS label file not found: {volumes.describe(expected)} (nor .nii){found}")
