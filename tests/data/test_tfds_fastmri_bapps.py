"""Tests for the fastMRI and BAPPS TFDS builders: fake official layouts, prepared and read back."""

from __future__ import annotations

import h5py
import numpy as np
from PIL import Image
import pytest

from jaxmed.data import tfds as jtfds
from jaxmed.data.tfds import bapps, fastmri

# ------------------------------------------------------------------------------------ fastMRI


def _write_h5(path, *, num_slices, shape, seed, target_shape=(16, 16), attrs=None, mask=None,
              rss=False):
  """Writes one fake fastMRI single-coil file; returns what a record of each slice holds."""
  rng = np.random.default_rng(seed)
  kspace = (rng.normal(size=(num_slices, *shape))
            + 1j * rng.normal(size=(num_slices, *shape))).astype(np.complex64)
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as hf:
    hf.create_dataset("kspace", data=kspace)
    target = None
    if target_shape is not None:
      target = rng.uniform(size=(num_slices, *target_shape)).astype(np.float32)
      hf.create_dataset("reconstruction_esc", data=target)
    if rss:
      hf.create_dataset("reconstruction_rss", data=np.ones((num_slices, 4, 4), np.float32))
    if mask is not None:
      hf.create_dataset("mask", data=mask)
    hf.create_dataset("ismrmrd_header", data=b"<ismrmrdHeader/>")
    for k, v in (attrs or {}).items():
      hf.attrs[k] = v
  return {"kspace": kspace, "target": target, "attrs": attrs or {}, "mask": mask}


def _fastmri_layout(root):
  """2 train files, 1 val file, 1 test file (mask, no target); returns {split: [(name, w)]}."""
  written = {
      "train": [
          ("file1000002.h5", _write_h5(
              root / "singlecoil_train" / "file1000002.h5", num_slices=3, shape=(40, 24), seed=0,
              attrs={"acquisition": "CORPD_FBK", "max": 0.75, "norm": 12.5,
                     "patient_id": "abc123"}, rss=True)),
          ("file1000010.h5", _write_h5(
              root / "singlecoil_train" / "file1000010.h5", num_slices=2, shape=(40, 26), seed=1,
              attrs={"acquisition": "CORPDFS_FBK", "max": np.float32(1.5), "norm": 3.0,
                     "patient_id": "def456"})),
      ],
      "validation": [
          ("file1000100.h5", _write_h5(
              root / "singlecoil_val" / "file1000100.h5", num_slices=2, shape=(40, 24), seed=2,
              attrs={"acquisition": "CORPD_FBK", "max": 2.0, "norm": 4.0, "patient_id": "x"})),
      ],
      "test": [
          ("file1000200_v2.h5", _write_h5(
              root / "singlecoil_test_v2" / "file1000200_v2.h5", num_slices=2, shape=(40, 24),
              seed=3, target_shape=None,
              mask=np.array([0, 1] * 12, dtype=bool),
              attrs={"acquisition": "CORPDFS_FBK", "acceleration": 4, "num_low_frequency": 3,
                     "patient_id": "t1"})),
      ],
  }
  # Not an .h5 file: ignored.
  (root / "singlecoil_train" / "README.txt").write_text("not data")
  return written


def test_fastmri_roundtrip_exact(tmp_path):
  manual = tmp_path / "manual"
  written = _fastmri_layout(manual)
  data_dir = tmp_path / "tfds"
  builder = jtfds.prepare("fastmri", manual_dir=manual, data_dir=data_dir)
  assert set(builder.info.splits) == {"train", "validation", "test"}
  for split, files in written.items():
    source = jtfds.data_source("fastmri", split, data_dir=data_dir)
    expected = [(name, i, w) for name, w in files for i in range(len(w["kspace"]))]
    assert len(source) == len(expected)
    for index, (name, i, w) in enumerate(expected):
      record = source[index]
      assert set(record) == {"kspace", "target", "has_target", "mask", "file", "slice",
                             "num_slices", "acquisition", "patient_id", "max", "norm",
                             "acceleration", "num_low_frequency"}
      assert record["file"] == name.encode()
      assert int(record["slice"]) == i
      assert int(record["num_slices"]) == len(w["kspace"])
      assert record["kspace"].dtype == np.complex64
      np.testing.assert_array_equal(record["kspace"], w["kspace"][i])
      attrs = w["attrs"]
      assert record["acquisition"] == attrs["acquisition"].encode()
      assert record["patient_id"] == attrs["patient_id"].encode()
      assert record["max"] == np.float32(attrs.get("max", 0))
      assert record["norm"] == np.float32(attrs.get("norm", 0))
      assert int(record["acceleration"]) == attrs.get("acceleration", 0)
      assert int(record["num_low_frequency"]) == attrs.get("num_low_frequency", 0)
      assert record["target"].dtype == np.float32
      if w["target"] is None:
        assert not record["has_target"]
        np.testing.assert_array_equal(record["target"], np.zeros(fastmri.TARGET_SHAPE))
      else:
        assert record["has_target"]
        np.testing.assert_array_equal(record["target"], w["target"][i])
      width = w["kspace"].shape[-1]
      mask = w["mask"] if w["mask"] is not None else np.ones(width, bool)
      assert record["mask"].dtype == bool
      np.testing.assert_array_equal(record["mask"], mask)
  # Prepared once: a second prepare reuses the files.
  again = jtfds.prepare("fastmri", manual_dir=manual, data_dir=data_dir)
  assert again.info.splits["train"].num_examples == 5


def test_fastmri_skips_absent_split_folders(tmp_path):
  manual = tmp_path / "manual"
  w = _write_h5(manual / "singlecoil_val" / "a.h5", num_slices=1, shape=(8, 6), seed=5,
                target_shape=(4, 4), attrs={"acquisition": "CORPD_FBK"})
  jtfds.prepare("fastmri", manual_dir=manual, data_dir=tmp_path / "tfds")
  source = jtfds.data_source("fastmri", "validation", data_dir=tmp_path / "tfds")
  assert len(source) == 1
  np.testing.assert_array_equal(source[0]["kspace"], w["kspace"][0])
  with pytest.raises(ValueError, match="no split 'train'"):
    jtfds.data_source("fastmri", "train", data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("empty", [True, False])
def test_fastmri_no_split_folder_names_manual_dir(tmp_path, empty):
  manual = tmp_path / "wrong_manual"
  manual.mkdir()
  if not empty:
    (manual / "multicoil_train").mkdir()
  with pytest.raises(FileNotFoundError, match="wrong_manual"):
    jtfds.prepare("fastmri", manual_dir=manual, data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_fastmri_corrupt_h5_names_file(tmp_path, damage):
  manual = tmp_path / "manual"
  _write_h5(manual / "singlecoil_train" / "file1.h5", num_slices=1, shape=(8, 6), seed=0)
  bad = manual / "singlecoil_train" / "file2_corrupt.h5"
  if damage == "garbage":
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 50)
  else:
    _write_h5(bad, num_slices=2, shape=(64, 64), seed=1)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
  with pytest.raises(ValueError, match="file2_corrupt.h5"):
    jtfds.prepare("fastmri", manual_dir=manual, data_dir=tmp_path / "tfds")


def test_fastmri_missing_kspace_names_file(tmp_path):
  path = tmp_path / "singlecoil_val" / "nok.h5"
  path.parent.mkdir(parents=True)
  with h5py.File(path, "w") as hf:
    hf.create_dataset("reconstruction_esc", data=np.zeros((1, 4, 4), np.float32))
  with pytest.raises(ValueError, match="nok.h5.*no 'kspace'"):
    list(fastmri._read_file(path))  # pylint: disable=protected-access


def _centred_idft_matrix(n):
  """Orthonormal inverse DFT with both indices centred at n // 2 (fftshift conventions)."""
  k = np.arange(n) - n // 2
  return np.exp(2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)


@pytest.mark.parametrize("shape,crop", [((40, 24), (16, 16)), ((41, 25), (15, 20))])
def test_zero_filled_matches_direct_computation(shape, crop):
  # Phantom: two ellipses with a smooth phase, so the magnitude is not symmetric.
  y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
  magnitude = ((x / 0.7) ** 2 + (y / 0.9) ** 2 < 1) + 0.5 * (((x - 0.2) / 0.2) ** 2
                                                              + ((y + 0.3) / 0.3) ** 2 < 1)
  image = magnitude * np.exp(1j * (x + 2 * y))
  # Forward centred orthonormal FFT (fastmri.fft2c).
  kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image), norm="ortho"))
  out = fastmri.zero_filled(kspace.astype(np.complex64), crop)
  assert out.dtype == np.float32 and out.shape == crop
  top, left = (shape[0] - crop[0]) // 2, (shape[1] - crop[1]) // 2
  window = (slice(top, top + crop[0]), slice(left, left + crop[1]))
  np.testing.assert_allclose(out, np.abs(image)[window], atol=1e-5)
  direct = _centred_idft_matrix(shape[0]) @ kspace @ _centred_idft_matrix(shape[1]).T
  np.testing.assert_allclose(out, np.abs(direct)[window], atol=1e-5)
  # Batched over leading axes.
  batch = fastmri.zero_filled(np.stack([kspace, 2 * kspace]), crop)
  np.testing.assert_allclose(batch[1], 2 * out, rtol=1e-5, atol=1e-5)


def test_zero_filled_rejects_bad_input():
  with pytest.raises(TypeError, match="complex"):
    fastmri.zero_filled(np.zeros((8, 8, 2), np.float32))
  with pytest.raises(ValueError, match="crop shape"):
    fastmri.zero_filled(np.zeros((8, 8), np.complex64), (16, 16))


# -------------------------------------------------------------------------------------- BAPPS


def _png(path, rng, size=8):
  path.parent.mkdir(parents=True, exist_ok=True)
  array = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
  Image.fromarray(array).save(path)
  return array


def _npy(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, np.array([value], dtype=np.float32))
  return np.float32(value)


def _bapps_layout(root, rng):
  """Fake 2afc (train: traditional, cnn; val: superres) and jnd (val: traditional, cnn)."""
  layout = {
      ("2afc", "train"): [("traditional", ["000000", "000001"], 8), ("cnn", ["000000"], 8)],
      ("2afc", "val"): [("superres", ["000003", "000010"], 12)],
      ("jnd", "val"): [("traditional", ["000000", "000002"], 8), ("cnn", ["000001"], 8)],
  }
  written = {}
  for (config, split), categories in layout.items():
    images, judge = bapps.FOLDERS[config]
    records = []
    for category, ids, size in categories:
      folder = root / config / split / category
      for i, patch_id in enumerate(ids):
        record = {name: _png(folder / name / f"{patch_id}.png", rng, size) for name in images}
        record[judge] = _npy(folder / judge / f"{patch_id}.npy", (i + 1) / 5)
        record["category"], record["id"] = category, patch_id
        records.append(record)
    written[(config, split)] = records
  return written


@pytest.mark.parametrize("nested", [False, True])
def test_bapps_roundtrip_exact(tmp_path, nested):
  manual = tmp_path / "manual"
  written = _bapps_layout(manual / "dataset" if nested else manual, np.random.default_rng(0))
  data_dir = tmp_path / "tfds"
  for config in ("2afc", "jnd"):
    builder = jtfds.prepare("bapps", manual_dir=manual, data_dir=data_dir, config=config)
    splits = {s for c, s in written if c == config}
    assert set(builder.info.splits) == splits
    for split in splits:
      source = jtfds.data_source("bapps", split, data_dir=data_dir, config=config)
      expected = written[(config, split)]
      assert len(source) == len(expected)
      for index, want in enumerate(expected):
        record = source[index]
        assert set(record) == set(want)
        for key, value in want.items():
          if isinstance(value, np.ndarray):
            assert record[key].dtype == np.uint8
            np.testing.assert_array_equal(record[key], value)
          elif isinstance(value, str):
            assert record[key] == value.encode()
          else:
            assert np.float32(record[key]) == value


def test_bapps_missing_partner_names_path(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / "manual" / "2afc" / "val" / "cnn"
  for name in ("ref", "p0", "p1"):
    _png(folder / name / "000000.png", rng)
  _npy(folder / "judge" / "000000.npy", 0.4)
  _png(folder / "ref" / "000001.png", rng)
  _png(folder / "p0" / "000001.png", rng)
  _npy(folder / "judge" / "000001.npy", 0.6)
  missing = folder / "p1" / "000001.png"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    jtfds.prepare("bapps", manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds",
                  config="2afc")


def test_bapps_bad_files_named(tmp_path):
  folder = tmp_path / "jnd" / "val" / "cnn"
  rng = np.random.default_rng(2)
  _png(folder / "p0" / "a.png", rng)
  (folder / "p1").mkdir(parents=True)
  (folder / "p1" / "a.png").write_bytes(b"not a png")
  _npy(folder / "same" / "a.npy", 0.5)
  with pytest.raises(ValueError, match=str(folder / "p1" / "a.png")):
    list(bapps._generate([("cnn", folder)], "jnd"))  # pylint: disable=protected-access
  _npy(folder / "same" / "a.npy", 1.5)
  with pytest.raises(ValueError, match=r"a\.npy must be in \[0, 1\]"):
    bapps.read_judgement(folder / "same" / "a.npy")


def test_bapps_missing_config_folder_names_manual_dir(tmp_path):
  (tmp_path / "only_2afc" / "2afc").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="only_2afc"):
    jtfds.prepare("bapps", manual_dir=tmp_path / "only_2afc", data_dir=tmp_path / "tfds",
                  config="jnd")
