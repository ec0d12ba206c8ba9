"""Tests for the volume TFDS builders (jaxmed.data.tfds.{brats,wmh,btcv,feta,volumes}).

Each test writes a tiny fake copy of a dataset's official layout with nibabel, prepares it
(array_record, no TensorFlow) and reads it back with `data_source`, comparing every array
exactly with what `jaxmed.data.nifti` reads from the files written.
"""

from __future__ import annotations

import json
import pathlib
import re

import nibabel as nib
import numpy as np
import pytest

from jaxmed.data import nifti
from jaxmed.data import tfds as jtfds
from jaxmed.data.subject import Subject
from jaxmed.data.tfds import volumes

# Stored (x, y, z) shape and an anisotropic affine, with x flipped (LAS) for one layout.
XYZ = (6, 7, 5)
RAS = np.diag([1.0, 1.2, 2.5, 1.0])
LAS = np.diag([-1.0, 1.2, 2.5, 1.0])
BRATS = ("t1", "t1ce", "t2", "flair")


def _write(path, data, affine=RAS):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
  return path


def _image(rng):
  """Random float image with a zero background border (so brain masks are not all True)."""
  data = rng.normal(100.0, 30.0, XYZ).astype(np.float32)
  data[0] = 0.0
  return data


def _label(rng, values):
  return rng.choice(np.asarray(values, np.uint8), size=XYZ)


def _case(images, label=None, *, grade=0, read_label=None, subject_id):
  """What one record must hold: image files, label file and how to read it, grade."""
  return dict(subject_id=subject_id, images=[pathlib.Path(p) for p in images], label=label,
              grade=grade, read_label=read_label)


def _check_split(name, split, data_dir, expected, *, config=None, pathology):
  """Every record of ``split`` equals, in order, what nifti reads from the ``expected`` files;
  `subjects_from_source` / `record_to_subject` agree."""
  source = jtfds.data_source(name, split, data_dir=data_dir, config=config)
  assert len(source) == len(expected)
  subjects = volumes.subjects_from_source(name, split, data_dir=data_dir, config=config)
  assert len(subjects) == len(expected)
  cls = jtfds.builder_class(name)
  for i, want in enumerate(expected):
    record = source[i]
    assert record["subject_id"] == want["subject_id"].encode()
    loaded = [nifti.load_volume(p) for p in want["images"]]
    image = np.stack([v for v, _ in loaded], axis=-1)
    assert record["image"].dtype == np.float32 and record["image"].shape == image.shape
    np.testing.assert_array_equal(record["image"], image)
    np.testing.assert_array_equal(record["spacing"], np.asarray(loaded[0][1], np.float32))
    assert record["spacing"].dtype == np.float32
    assert int(record["grade"]) == want["grade"]
    assert bool(record["has_label"]) == (want["label"] is not None)
    assert record["label"].dtype == np.uint8 and record["label"].shape == image.shape[:3]
    if want["label"] is None:
      label = np.zeros(image.shape[:3], np.uint8)
    elif want["read_label"] is not None:
      label = want["read_label"](want["label"])
    else:
      label = nifti._load_label(want["label"], pathology)[0]
    np.testing.assert_array_equal(record["label"], label)

    subject = subjects[i]
    assert isinstance(subject, Subject)
    assert subject.subject_id == want["subject_id"]
    assert subject.modalities == cls.MODALITIES and subject.pathology == pathology
    assert subject.spacing == tuple(float(s) for s in np.asarray(loaded[0][1], np.float32))
    assert subject.grade == want["grade"]
    np.testing.assert_array_equal(subject.image, image)
    np.testing.assert_array_equal(subject.brain_mask, np.any(image != 0, axis=-1))
    assert not subject.brain_mask.all() and subject.brain_mask.any()
    if want["label"] is None:
      assert subject.label is None
    else:
      np.testing.assert_array_equal(subject.label, label)
  direct = volumes.record_to_subject(source[len(expected) - 1], modalities=cls.MODALITIES,
                                     pathology=pathology)
  assert direct.subject_id == subjects[-1].subject_id
  np.testing.assert_array_equal(direct.image, subjects[-1].image)
  return source


def _brats_case(case_dir, *, rng, tags=BRATS, sep="_", seg="seg", seg_name=None,
                label_values=(0, 1, 2, 4), ext=".nii.gz", affine=RAS, skip=()):
  """Writes one BraTS case folder; returns (image paths in channel order, label path)."""
  case_dir = pathlib.Path(case_dir)
  images = [case_dir / f"{case_dir.name}{sep}{tag}{ext}" for tag in tags]
  for path in images:
    if path.name not in skip:
      _write(path, _image(rng), affine)
  label = None
  if seg is not None:
    label = case_dir / (seg_name or f"{case_dir.name}{sep}{seg}{ext}")
    _write(label, _label(rng, label_values), affine)
  return images, label


def test_brats_2018_grades_and_validation(tmp_path):
  rng = np.random.default_rng(0)
  manual = tmp_path / "brats18"
  train_root = manual / "MICCAI_BraTS_2018_Data_Training"
  cases = {}
  for grade_dir, case in (("LGG", "Brats18_2013_0_1"), ("HGG", "Brats18_CBICA_AAA_1"),
                          ("HGG", "Brats18_2013_2_1")):
    images, label = _brats_case(train_root / grade_dir / case, rng=rng, affine=LAS)
    cases[case] = _case(images, label, grade=int(grade_dir == "HGG"), subject_id=case)
  val_images, _ = _brats_case(manual / "MICCAI_BraTS_2018_Data_Validation" / "Brats18_VAL_1",
                              rng=rng, seg=None)
  (manual / "MICCAI_BraTS_2018_Data_Training" / "survival_data.csv").write_text("x\n")

  b = jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2018")
  assert set(b.info.splits) == {"train", "validation"}
  assert b.info.metadata["pathology"] == "tumour"
  assert list(b.info.metadata["modalities"]) == list(BRATS)
  _check_split("brats", "train", tmp_path / "tfds", [cases[k] for k in sorted(cases)],
               config="2018", pathology="tumour")
  _check_split("brats", "validation", tmp_path / "tfds",
               [_case(val_images, None, subject_id="Brats18_VAL_1")], config="2018",
               pathology="tumour")
  # Prepared once: a second prepare reuses the records.
  jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2018")


def test_brats_2020_2021_2023_layouts(tmp_path):
  rng = np.random.default_rng(1)
  # 2020 (Kaggle copy: uncompressed .nii) with case 355's misnamed label, plus validation.
  manual = tmp_path / "brats20"
  root = manual / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
  want = []
  for case in ("BraTS20_Training_001", "BraTS20_Training_355"):
    seg_name = "W39_1998.09.19_Segm.nii" if case.endswith("355") else None
    images, label = _brats_case(root / case, rng=rng, ext=".nii", seg_name=seg_name)
    want.append(_case(images, label, subject_id=case))
  (root / "name_mapping.csv").write_text("Grade\n")
  val_images, _ = _brats_case(manual / "MICCAI_BraTS2020_ValidationData" / "BraTS20_Validation_001",
                              rng=rng, seg=None)
  jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2020")
  _check_split("brats", "train", tmp_path / "tfds", want, config="2020", pathology="tumour")
  _check_split("brats", "validation", tmp_path / "tfds",
               [_case(val_images, None, subject_id="BraTS20_Validation_001")], config="2020",
               pathology="tumour")

  # 2021: case folders directly under manual_dir; no validation folder -> train only.
  manual = tmp_path / "brats21"
  want = []
  for case in ("BraTS2021_00002", "BraTS2021_00000"):
    images, label = _brats_case(manual / case, rng=rng)
    want.append(_case(images, label, subject_id=case))
  b = jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2021")
  assert set(b.info.splits) == {"train"}
  _check_split("brats", "train", tmp_path / "tfds", want[::-1], config="2021",
               pathology="tumour")

  # 2023 GLI: t1n/t1c/t2w/t2f -> t1/t1ce/t2/flair, enhancing tumour 3 -> 4.
  manual = tmp_path / "brats23"
  root = manual / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
  want = []
  for case in ("BraTS-GLI-00000-000", "BraTS-GLI-00002-000"):
    images, label = _brats_case(root / case, rng=rng, tags=("t1n", "t1c", "t2w", "t2f"),
                                sep="-", label_values=(0, 1, 2, 3))
    want.append(_case(images, label, subject_id=case))
  jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2023")
  source = _check_split("brats", "train", tmp_path / "tfds", want, config="2023",
                        pathology="tumour")
  stored = np.asarray(nib.load(want[0]["label"]).dataobj)
  record = source[0]
  assert (stored == 3).any() and not (record["label"] == 3).any()
  np.testing.assert_array_equal(np.sort(np.unique(record["label"])), [0, 1, 2, 4])


def test_missing_files_are_named(tmp_path):
  rng = np.random.default_rng(2)
  manual = tmp_path / "brats21"
  _brats_case(manual / "BraTS2021_00000", rng=rng)
  _brats_case(manual / "BraTS2021_00001", rng=rng, skip=("BraTS2021_00001_t1ce.nii.gz",))
  missing = manual / "BraTS2021_00001" / "BraTS2021_00001_t1ce.nii.gz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2021")

  manual = tmp_path / "brats21_noseg"
  _brats_case(manual / "BraTS2021_00000", rng=rng, seg=None)
  missing = manual / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2021")

  # 2018 training cases need their HGG / LGG folder (it gives the grade).
  manual = tmp_path / "brats18_flat"
  _brats_case(manual / "Brats18_2013_0_1", rng=rng)
  with pytest.raises(ValueError, match="HGG/ or LGG/"):
    jtfds.prepare("brats", manual_dir=manual, data_dir=tmp_path / "tfds", config="2018")

  manual = tmp_path / "wmh"
  case = manual / "training" / "Utrecht" / "0"
  _write(case / "pre" / "T1.nii.gz", _image(rng))
  _write(case / "wmh.nii.gz", _label(rng, (0, 1)))
  with pytest.raises(FileNotFoundError, match=re.escape(str(case / "pre" / "FLAIR.nii.gz"))):
    jtfds.prepare("wmh", manual_dir=manual, data_dir=tmp_path / "tfds")

  manual = tmp_path / "btcv"
  _write(manual / "RawData" / "Training" / "img" / "img0001.nii.gz", _image(rng))
  missing = manual / "RawData" / "Training" / "label" / "label0001.nii.gz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    jtfds.prepare("btcv", manual_dir=manual, data_dir=tmp_path / "tfds")

  # A corrupt file: nifti's ValueError naming the file propagates.
  manual = tmp_path / "feta"
  anat = manual / "sub-001" / "anat"
  _write(anat / "sub-001_rec-mial_T2w.nii.gz", _image(rng))
  anat.joinpath("sub-001_rec-mial_dseg.nii.gz").write_bytes(b"not a nifti file")
  with pytest.raises(ValueError, match="sub-001_rec-mial_dseg.nii.gz"):
    jtfds.prepare("feta", manual_dir=manual, data_dir=tmp_path / "tfds")


def test_wmh_sites_splits_and_other_pathology(tmp_path):
  rng = np.random.default_rng(3)
  manual = tmp_path / "wmh"
  want = {}
  for split, site, case in (("training", "Utrecht", "0"), ("training", "Singapore", "50"),
                            ("training", "Amsterdam/GE3T", "100"), ("test", "Utrecht", "1"),
                            ("test", "Amsterdam/GE1T5", "150")):
    case_dir = manual / split / site / case
    images = [_write(case_dir / "pre" / f"{m}.nii.gz", _image(rng), LAS) for m in ("T1", "FLAIR")]
    _write(case_dir / "orig" / "FLAIR.nii.gz", _image(rng), LAS)
    label = None
    if case != "150":
      label = _write(case_dir / "wmh.nii.gz", _label(rng, (0, 1, 2)).astype(np.float32), LAS)
    sid = f"{pathlib.PurePath(site).name}-{case}"
    want.setdefault(split, {})[sid] = _case(images, label, subject_id=sid,
                                            read_label=_wmh_expected)
  _write(manual / "additional_annotations" / "observer_o3" / "training" / "Utrecht" / "0"
         / "result.nii.gz", _label(rng, (0, 1)))

  b = jtfds.prepare("wmh", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert set(b.info.splits) == {"train", "test"}
  train = want["training"]
  assert sorted(train) == ["GE3T-100", "Singapore-50", "Utrecht-0"]
  source = _check_split("wmh", "train", tmp_path / "tfds", [train[k] for k in sorted(train)],
                        pathology="wmh")
  _check_split("wmh", "test", tmp_path / "tfds",
               [want["test"][k] for k in sorted(want["test"])], pathology="wmh")
  # Label 2 (other pathology) was in the files and is background in the records.
  stored = nifti.load_volume(train["GE3T-100"]["label"])[0]
  record = source[0]
  assert (stored == 2).any() and (stored == 1).any()
  np.testing.assert_array_equal(record["label"], (stored == 1).astype(np.uint8))


def _wmh_expected(path):
  volume = nifti.load_volume(path)[0]
  assert set(np.unique(volume).tolist()) <= {0.0, 1.0, 2.0}
  return np.where(volume == 2, 0, volume).astype(np.uint8)


def test_btcv_and_feta(tmp_path):
  rng = np.random.default_rng(4)
  organs = tuple(range(14))
  manual = tmp_path / "btcv"
  train = []
  for n in ("0002", "0001", "0003"):
    image = _write(manual / "RawData" / "Training" / "img" / f"img{n}.nii.gz",
                   _image(rng).astype(np.int16), LAS)
    label = _write(manual / "RawData" / "Training" / "label" / f"label{n}.nii.gz",
                   _label(rng, organs), LAS)
    train.append(_case([image], label, subject_id=f"img{n}"))
  train.sort(key=lambda c: c["subject_id"])
  test_image = _write(manual / "RawData" / "Testing" / "img" / "img0061.nii.gz",
                      _image(rng), LAS)
  (manual / "dataset_0.json").write_text(json.dumps({
      "training": [{"image": "imagesTr/img0003.nii.gz", "label": "labelsTr/label0003.nii.gz"},
                   {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}],
      "validation": [{"image": "imagesTr/img0002.nii.gz",
                      "label": "labelsTr/label0002.nii.gz"}],
      "test": ["imagesTs/img0061.nii.gz"]}))
  b = jtfds.prepare("btcv", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert set(b.info.splits) == {"train", "test", "train_monai", "val_monai"}
  _check_split("btcv", "train", tmp_path / "tfds", train, pathology="organs")
  _check_split("btcv", "test", tmp_path / "tfds", [_case([test_image], subject_id="img0061")],
               pathology="organs")
  _check_split("btcv", "train_monai", tmp_path / "tfds", [train[0], train[2]],
               pathology="organs")
  _check_split("btcv", "val_monai", tmp_path / "tfds", [train[1]], pathology="organs")

  manual = tmp_path / "feta"
  want = []
  for release, subject, rec in (("feta_2.2", "sub-041", "nmic"), ("feta_2.1", "sub-001", "mial"),
                                ("feta_2.1", "sub-021", "irtk")):
    anat = manual / release / subject / "anat"
    image = _write(anat / f"{subject}_rec-{rec}_T2w.nii.gz", _image(rng))
    label = _write(anat / f"{subject}_rec-{rec}_dseg.nii.gz", _label(rng, range(8)))
    (anat / f"{subject}_rec-{rec}_T2w.json").write_text("{}")
    want.append(_case([image], label, subject_id=subject))
  (manual / "feta_2.1" / "participants.tsv").write_text("participant_id\nsub-001\nsub-021\n")
  b = jtfds.prepare("feta", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert set(b.info.splits) == {"train"}
  _check_split("feta", "train", tmp_path / "tfds", sorted(want, key=lambda c: c["subject_id"]),
               pathology="tissues")
