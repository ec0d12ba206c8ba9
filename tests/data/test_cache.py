"""File-backed subjects (jaxmed.data.cache): preprocessing once, reuse, corrupt cases, lazy
views and exact resume of the input pipeline over them."""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from jaxmed.config import base_config
from jaxmed.data import cache, datasets, nifti, pipeline, resample, sources, synthetic, views

SHAPE = (16, 20, 16)


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
  """5 tumour phantoms written as a BraTS-style NIfTI folder, anisotropic spacing."""
  root = tmp_path_factory.mktemp("nifti")
  for subject in synthetic.make_subjects(5, seed=3, shape=SHAPE):
    subject.spacing = (2.0, 1.0, 1.25)
    nifti.write_case(subject, root)
  return root


def _data_config(root, cache_dir, **fields):
  cfg = base_config().data
  cfg.root, cfg.cache_dir = str(root), str(cache_dir)
  cfg.update(fields)
  return cfg


def _count_reads(monkeypatch):
  reads = []
  original = nifti.read_case

  def counting(case_dir, **kwargs):
    reads.append(pathlib.Path(case_dir).name)
    return original(case_dir, **kwargs)

  monkeypatch.setattr(nifti, "read_case", counting)
  return reads


def test_cached_subjects_equal_the_in_memory_reader_and_are_reused(phantom_folder, tmp_path,
                                                                   monkeypatch):
  cfg = _data_config(phantom_folder, tmp_path, crop=(12, 16, 16))
  expected = nifti.read_folder(phantom_folder, shape=(12, 16, 16))
  reads = _count_reads(monkeypatch)
  subjects = datasets.load_subjects(cfg)
  assert isinstance(subjects, cache.CachedSubjects) and len(reads) == 5
  assert subjects.subject_ids == [s.subject_id for s in expected]
  for i, want in enumerate(expected):
    got = subjects[i]
    assert isinstance(got.image, np.memmap) and not got.image.flags.writeable
    for key in ("image", "label", "brain_mask"):
      np.testing.assert_array_equal(getattr(got, key), getattr(want, key))
    assert got.spacing == want.spacing == (2.0, 1.0, 1.25)
    assert got.modalities == want.modalities and got.pathology == "tumour"
    info = subjects.info(i)
    np.testing.assert_allclose(info.slice_foreground, want.brain_mask.mean(axis=(1, 2)))
    np.testing.assert_array_equal(info.slice_labelled, (want.label > 0).any(axis=(1, 2)))

  # A second run reads no NIfTI file; other settings get their own cache.
  again = datasets.load_subjects(cfg)
  assert len(reads) == 5 and again.directory == subjects.directory
  other = datasets.load_subjects(_data_config(phantom_folder, tmp_path, crop=(8, 16, 16)))
  assert len(reads) == 10 and other.directory != subjects.directory
  settings = json.loads((subjects.directory / "settings.json").read_text())
  assert settings["settings"]["shape"] == [12, 16, 16]

  # Splits stay file-backed and open no subject.
  splits = datasets.split_subjects(subjects, num_val=1, num_test=1, seed=0)
  assert all(isinstance(s, cache.CachedSubjects) for s in splits.values())
  assert sorted(sum((s.subject_ids for s in splits.values()), [])) == subjects.subject_ids


def test_a_changed_or_damaged_case_is_rebuilt(phantom_folder, tmp_path, monkeypatch):
  cfg = _data_config(phantom_folder, tmp_path)
  subjects = datasets.load_subjects(cfg)
  case = subjects.directory / subjects.cases[1]
  (case / "image.npy").write_bytes(b"\x93NUMPY garbage")  # cached array damaged
  with open(case.parent / subjects.cases[2] / "info.json", "w") as f:
    f.write('{"subject_id": ')  # interrupted metadata
  source = phantom_folder / subjects.cases[3] / f"{subjects.cases[3]}_t2.nii.gz"
  stat = source.stat()
  os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # source file changed
  reads = _count_reads(monkeypatch)
  again = datasets.load_subjects(cfg)
  assert sorted(reads) == sorted(subjects.cases[1:4])
  np.testing.assert_array_equal(again[1].image, nifti.read_case(
      phantom_folder / subjects.cases[1]).image)
  assert len(reads) == 4


def test_a_corrupt_case_is_named_and_the_others_stay_cached(phantom_folder, tmp_path,
                                                            monkeypatch):
  root = tmp_path / "data"
  for subject in synthetic.make_subjects(3, seed=5, shape=(16, 16, 16)):
    nifti.write_case(subject, root)
  bad = sorted(root.iterdir())[1]
  flair = bad / f"{bad.name}_flair.nii.gz"
  flair.write_bytes(gzip.compress(b"not a nifti header")[:20])
  cfg = _data_config(root, tmp_path / "cache")
  with pytest.raises(cache.CacheBuildError, match=str(flair)) as error:
    datasets.load_subjects(cfg)
  assert list(error.value.failures) == [bad.name]
  reads = _count_reads(monkeypatch)
  cfg.on_error = "skip"
  subjects = datasets.load_subjects(cfg)
  assert reads == [bad.name]  # only the corrupt case is tried again
  assert len(subjects) == 2 and bad.name not in subjects.subject_ids
  cfg.on_error = "ignore"
  with pytest.raises(ValueError, match="on_error"):
    datasets.load_subjects(cfg)


def test_preprocessing_resamples_crops_and_windows():
  subject = synthetic.make_subjects(1, seed=1, shape=(16, 18, 16))[0]
  subject.spacing = (2.0, 1.0, 1.0)
  settings = cache.Preprocessing(spacing=(1.5, 1.5, 1.5), crop_foreground=True)
  out = cache.preprocess(subject, settings)
  image, spacing = resample.resample_to_spacing(subject.image, (2.0, 1.0, 1.0),
                                                (1.5, 1.5, 1.5), order=1)
  label, _ = resample.resample_to_spacing(subject.label, (2.0, 1.0, 1.0), (1.5, 1.5, 1.5),
                                          order=0)
  mask = np.any(image != 0, axis=-1)
  box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(mask))
  assert out.spacing == tuple(spacing) == (1.5, 1.5, 1.5)
  np.testing.assert_array_equal(out.brain_mask, mask[box])
  np.testing.assert_array_equal(out.label, label[box])
  np.testing.assert_allclose(out.image, nifti.zscore_foreground(image[box], mask[box]),
                             atol=1e-6)

  ct = dataclass_subject(np.array([-1000.0, -175.0, 0.0, 250.0, 900.0]).reshape(1, 1, 5, 1))
  windowed = cache.preprocess(ct, cache.Preprocessing(normalize="window",
                                                      foreground_threshold=-500.0))
  np.testing.assert_allclose(windowed.image.ravel(), [0.0, 0.0, 175 / 425, 1.0, 1.0])
  np.testing.assert_array_equal(windowed.brain_mask.ravel(), [0, 1, 1, 1, 1])
  for bad in ({"spacing": (1.0, 0.0, 1.0)}, {"normalize": "minmax"}, {"window": (3, 1)},
              {"shape": (4, 4)}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      cache.Preprocessing(**bad)


def dataclass_subject(image):
  from jaxmed.data.subject import Subject  # pylint: disable=g-import-not-at-top
  return Subject("ct", image.astype(np.float32), None, ("ct",), (1.0, 1.0, 1.0),
                 np.ones(image.shape[:3], bool), pathology="none")


def test_views_of_file_backed_subjects_equal_in_memory_views(phantom_folder, tmp_path):
  cfg = _data_config(phantom_folder, tmp_path)
  cached = datasets.load_subjects(cfg)
  memory = [cached[i] for i in range(len(cached))]
  memory = [type(s)(s.subject_id, np.array(s.image), np.array(s.label), s.modalities,
                    s.spacing, np.array(s.brain_mask), s.grade, s.pathology) for s in memory]
  for view in ({"view": "slice", "fg_fraction": 0.5},
               {"view": "crop", "crop_size": (8, 8, 8), "fg_fraction": 0.5, "per_modality": True}):
    view = ml_collections.ConfigDict(view)
    a_source, a_transform = views.make_view(view, cached)
    b_source, b_transform = views.make_view(view, memory)
    for key, column in a_source.columns.items():
      np.testing.assert_array_equal(column, b_source.columns[key])
    a = pipeline.train_iterator(a_source, global_batch_size=4, seed=0, process_count=1,
                                process_index=0, transform=a_transform)
    b = pipeline.train_iterator(b_source, global_batch_size=4, seed=0, process_count=1,
                                process_index=0, transform=b_transform)
    for _ in range(3):
      x, y = next(a), next(b)
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("process_count", [1, 2])
def test_file_backed_iterator_resumes_exactly(phantom_folder, tmp_path, process_count):
  cached = datasets.load_subjects(_data_config(phantom_folder, tmp_path))
  view = ml_collections.ConfigDict({"view": "crop", "crop_size": (6, 8, 8), "fg_fraction": 0.5})
  seen = []
  for p in range(process_count):
    shard = sources.shard_subjects(cached, p, process_count)
    assert isinstance(shard, cache.CachedSubjects)
    seen.append(set(shard.subject_ids))

    def iterator():
      source, transform = views.make_view(view, shard)
      return pipeline.train_iterator(source, global_batch_size=2, seed=7, process_index=0,
                                     process_count=1, transform=transform, read_threads=2,
                                     prefetch=2)

    it = iterator()
    for _ in range(4):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    resumed = iterator()
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  assert set.union(*seen) == set(cached.subject_ids)
  assert sum(len(s) for s in seen) == len(cached)  # disjoint shards


def test_tfds_subjects_are_prepared_on_first_use_and_cached(phantom_folder, tmp_path,
                                                            monkeypatch):
  """BraTS 2021 layout (case folders of <case>_<modality>.nii.gz) -> TFDS -> cache, one config."""
  cfg = base_config().data
  cfg.tfds.update(name="brats", config="2021", data_dir=str(tmp_path / "tfds"),
                  manual_dir=str(phantom_folder))
  cfg.cache_dir, cfg.modalities, cfg.crop = str(tmp_path / "cache"), ("flair", "t1"), (12, 16, 16)
  assert datasets.resolve_source(cfg) == "tfds"
  subjects = datasets.load_subjects(cfg)
  expected = nifti.read_folder(phantom_folder, modalities=("flair", "t1"), shape=(12, 16, 16))
  assert subjects.subject_ids == [s.subject_id for s in expected]
  for i, want in enumerate(expected):
    for key in ("image", "label", "brain_mask"):
      np.testing.assert_array_equal(getattr(subjects[i], key), getattr(want, key))
    assert subjects[i].modalities == ("flair", "t1") and subjects[i].spacing == want.spacing
  # Reused: neither the dataset nor the cache is rebuilt.
  from jaxmed.data import tfds as jtfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cache, "preprocess", lambda *a: pytest.fail("cache rebuilt"))
  cfg.tfds.manual_dir = ""
  assert datasets.load_subjects(cfg).subject_ids == subjects.subject_ids
  assert len(jtfds.data_source("brats", "train", data_dir=cfg.tfds.data_dir, config="2021")) == 5
  cfg.modalities = ("dwi",)
  with pytest.raises(ValueError, match=r"\['dwi'\] not in TFDS dataset 'brats'"):
    datasets.load_subjects(cfg)


def test_fastmri_volumes_become_subjects(tmp_path):
  import h5py  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  folder = tmp_path / "knee" / "singlecoil_val"
  folder.mkdir(parents=True)
  targets = {}
  for name, slices in (("file1000002.h5", 3), ("file1000001.h5", 2)):
    targets[name] = rng.uniform(0.1, 1.0, (slices, 16, 16)).astype(np.float32)
    with h5py.File(folder / name, "w") as f:
      f["kspace"] = (rng.normal(size=(slices, 20, 12)) + 1j).astype(np.complex64)
      f["reconstruction_esc"] = targets[name]
      f.attrs["acquisition"], f.attrs["max"] = "CORPD_FBK", float(targets[name].max())
  cfg = base_config().data
  cfg.tfds.update(name="fastmri", split="validation", data_dir=str(tmp_path / "tfds"),
                  manual_dir=str(tmp_path / "knee"))
  cfg.cache_dir, cfg.normalize = str(tmp_path / "cache"), "none"
  with pytest.raises(ValueError, match="data.modalities=magnitude"):
    datasets.load_subjects(cfg)
  cfg.modalities = ("magnitude",)
  subjects = datasets.load_subjects(cfg)
  assert subjects.subject_ids == ["file1000001.h5", "file1000002.h5"]
  for i, name in enumerate(subjects.subject_ids):
    np.testing.assert_array_equal(subjects[i].image[..., 0], targets[name])
    assert subjects[i].label is None
  source, _ = views.make_view({"view": "slice", "min_foreground": 0.0}, subjects)
  assert len(source) == 5 and source[4]["image"].shape == (16, 16, 1)
