"""BTCV / Synapse multi-organ abdominal CT ("Beyond the Cranial Vault", MICCAI 2015), from the
official layout (manual download).

Each record is one CT volume (one channel ``ct``, raw Hounsfield units) with the 13 organ
labels 0..13 of `jaxmed.data.subject.CLASS_NAMES` ``["organs"]`` (`jaxmed.data.tfds.volumes`
has the record format). Layouts read from ``manual_dir`` (or from its one sub-folder that holds
them, e.g. ``Abdomen/``)::

  RawData/Training/img/img0001.nii.gz   + RawData/Training/label/label0001.nii.gz  -> "train"
  RawData/Testing/img/img0061.nii.gz    (no labels)                                 -> "test"
  Training/..., Testing/...             (the same without RawData/)
  imagesTr/img0001.nii.gz + labelsTr/label0001.nii.gz, imagesTs/  (MONAI / Swin-UNETR copy)

The subject id is the image file name without extension (``img0001``); the label of
``img<N>`` is ``label<N>``. If MONAI's split file ``dataset_0.json`` is in ``manual_dir`` (or
in the layout's folder), its ``"training"`` / ``"validation"`` lists (24 / 6 cases) also become
splits ``"train_monai"`` / ``"val_monai"`` (copies of those ``"train"`` records; matched by
image file name).
"""

from __future__ import annotations

import json
import pathlib

from jaxmed.data.tfds import volumes

# (training images, training labels, test images), relative to the layout's folder.
_LAYOUTS = (
    ("RawData/Training/img", "RawData/Training/label", "RawData/Testing/img"),
    ("Training/img", "Training/label", "Testing/img"),
    ("imagesTr", "labelsTr", "imagesTs"),
)
MONAI_SPLIT_FILE = "dataset_0.json"
# MONAI list name -> split name.
MONAI_SPLITS = {"training": "train_monai", "validation": "val_monai"}


def label_stem(image_stem: str) -> str:
  """``"img0001"`` -> ``"label0001"`` (other names keep their stem)."""
  return "label" + image_stem[3:] if image_stem.startswith("img") else image_stem


class Btcv(volumes.VolumeBuilder):
  """BTCV multi-organ CT segmentation: one CT channel, 13 organ labels."""

  MODALITIES = ("ct",)
  PATHOLOGY = "organs"
  DESCRIPTION = (
      "Multi-Atlas Labeling Beyond the Cranial Vault (BTCV, Synapse): 30 labelled and 20 "
      "unlabelled abdominal contrast-enhanced CT scans; labels 1 spleen, 2 right kidney, 3 left "
      "kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, "
      "10 portal and splenic vein, 11 pancreas, 12 right adrenal, 13 left adrenal. Raw "
      "Hounsfield units in canonical orientation.")
  HOMEPAGE = "https://www.synapse.org/#!Synapse:syn3193805/wiki/217789"
  CITATION = """@inproceedings{landman2015btcv,
  title={MICCAI Multi-Atlas Labeling Beyond the Cranial Vault -- Workshop and Challenge},
  author={Landman, Bennett and Xu, Zhoubing and Iglesias, Juan Eugenio and Styner, Martin and
          Langerak, Thomas Robin and Klein, Arno},
  booktitle={MICCAI Multi-Atlas Labeling Beyond the Cranial Vault Workshop},
  year={2015}}"""
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://www.synapse.org/#!Synapse:syn3193805 and download Abdomen/RawData.zip;
  unpack it into manual_dir so that manual_dir/RawData/Training/img/img0001.nii.gz,
  manual_dir/RawData/Training/label/label0001.nii.gz and manual_dir/RawData/Testing/img/ exist
  (the MONAI copy imagesTr/, labelsTr/, imagesTs/ works too). Optionally add MONAI's
  dataset_0.json for the splits "train_monai" / "val_monai".
  """

  def _find_layout(self, manual_dir: pathlib.Path) -> tuple[pathlib.Path, tuple[str, str, str]]:
    candidates = [manual_dir] + sorted(
        p for p in manual_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for root in candidates:
      for layout in _LAYOUTS:
        if (root / layout[0]).is_dir():
          return root, layout
    expected = ", ".join(f"{volumes.describe(manual_dir / layout[0])}/" for layout in _LAYOUTS)
    raise FileNotFoundError(f"BTCV training images not found: expected one of {expected}")

  def _find_cases(self, manual_dir: pathlib.Path) -> dict[str, list[volumes.Case]]:
    root, (train_dir, label_dir, test_dir) = self._find_layout(manual_dir)
    train = []
    for path in volumes.nifti_files(root / train_dir):
      stem = volumes.nifti_stem(path.name)
      label = volumes.require_nifti(root / label_dir, label_stem(stem), "BTCV label file")
      train.append(volumes.Case(subject_id=stem, images=(path,), label=label))
    train = volumes.sort_cases(train, root / train_dir)
    test = []
    if (root / test_dir).is_dir():
      test = [volumes.Case(subject_id=volumes.nifti_stem(p.name), images=(p,))
              for p in volumes.nifti_files(root / test_dir)]
    splits = {"train": train, "test": volumes.sort_cases(test, root / test_dir)}
    for folder in dict.fromkeys((manual_dir, root)):
      split_file = folder / MONAI_SPLIT_FILE
      if split_file.is_file():
        splits.update(self._monai_splits(split_file, train))
        break
    return splits

  def _monai_splits(self, split_file: pathlib.Path,
                    train: list[volumes.Case]) -> dict[str, list[volumes.Case]]:
    """MONAI's ``training`` / ``validation`` lists as cases of ``train`` (by image file name)."""
    try:
      lists = json.loads(split_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"cannot read {volumes.describe(split_file)}: {e}") from e
    by_id = {case.subject_id: case for case in train}
    splits = {}
    for key, split in MONAI_SPLITS.items():
      entries = lists.get(key, []) if isinstance(lists, dict) else None
      if not isinstance(entries, list):
        raise ValueError(f"{volumes.describe(split_file)}: {key!r} must be a list of entries")
      cases = []
      for entry in entries:
        image = entry.get("image") if isinstance(entry, dict) else entry
        stem = volumes.nifti_stem(pathlib.PurePosixPath(str(image)).name)
        if stem not in by_id:
          raise FileNotFoundError(
              f"{volumes.describe(split_file)} lists {key} image {image!r}, which is not among "
              f"the {len(by_id)} BTCV training images found")
        cases.append(by_id[stem])
      splits[split] = volumes.sort_cases(cases, split_file)
    return splits
