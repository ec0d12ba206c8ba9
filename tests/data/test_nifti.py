"""Tests for jaxmed.data.nifti: BraTS-style NIfTI reading, reorientation and preprocessing."""

from __future__ import annotations

import gzip
import pathlib

from hypothesis import given, settings, strategies as st
import nibabel as nib
import numpy as np
import pytest

from jaxmed.data import nifti
from jaxmed.data.subject import Subject

# Stored (x, y, z) shape of the test volumes.
XYZ = (12, 10, 8)
ZOOMS = (1.0, 1.5, 3.0)
# Left-Anterior-Superior with anisotropic zooms: x is flipped relative to RAS+.
LAS = np.diag([-ZOOMS[0], ZOOMS[1], ZOOMS[2], 1.0])


def _write(path, data, affine=LAS):
  """Writes `data` (stored (x, y, z)) to `path` with `affine`; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64)), path)
  return path


def _pattern(shape=XYZ):
  """An asymmetric pattern: value 100 * x + 10 * y + z + 1 (all distinct, all nonzero)."""
  x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  return (100 * x + 10 * y + z + 1).astype(np.float32)


def _make_case(root, case, *, modalities=nifti.BRATS_MODALITIES, seg="seg", label=None,
               ext=".nii.gz", affine=LAS, seed=0, shape=XYZ, brain=None):
  """Writes one case folder; returns {name: stored (x, y, z) array}."""
  rng = np.random.default_rng(seed)
  if brain is None:
    brain = (slice(2, 10), slice(1, 8), slice(1, 7))
  mask = np.zeros(shape, bool)
  mask[brain] = True
  arrays = {}
  for i, name in enumerate(modalities):
    data = np.where(mask, rng.uniform(10, 100, shape) * (i + 1), 0).astype(np.float32)
    arrays[name] = data
    _write(pathlib.Path(root) / case / f"{case}_{name}{ext}", data, affine)
  if seg is not None:
    if label is None:
      label = np.zeros(shape, np.uint8)
      label[4:7, 3:6, 2:5] = 2
      label[5, 4, 3] = 1
      label[5, 4, 4] = 4
    arrays[seg] = label
    _write(pathlib.Path(root) / case / f"{case}_{seg}{ext}", label, affine)
  return arrays


def _dhw(stored, affine=LAS):
  """Expected (D, H, W) array for a stored (x, y, z) array written with `affine`."""
  canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(stored), affine))
  return np.asarray(canonical.dataobj).transpose(2, 1, 0)


# ---------------------------------------------------------------------------------- load_volume


def test_load_volume_round_trip_identity_affine(tmp_path):
  data = np.random.default_rng(0).normal(size=XYZ).astype(np.float32)
  path = _write(tmp_path / "v.nii.gz", data, np.diag([*ZOOMS, 1.0]))
  volume, spacing = nifti.load_volume(path)
  assert volume.shape == (8, 10, 12)
  np.testing.assert_array_equal(volume, data.transpose(2, 1, 0))
  assert spacing == (3.0, 1.5, 1.0)
  assert all(isinstance(s, float) for s in spacing)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float64, np.float32])
def test_load_volume_dtype_is_float32(tmp_path, dtype):
  data = (_pattern() % 200).astype(dtype)
  path = _write(tmp_path / "v.nii.gz", data, np.eye(4))
  volume, _ = nifti.load_volume(path)
  assert volume.dtype == np.float32
  np.testing.assert_array_equal(volume, data.astype(np.float32).transpose(2, 1, 0))


def test_load_volume_never_reads_float64(tmp_path, monkeypatch):
  """`get_fdata` must always be called with a non-float64 dtype."""
  calls = []
  original = nib.Nifti1Image.get_fdata

  def spy(self, *args, **kwargs):
    dtype = kwargs.get("dtype", args[1] if len(args) > 1 else np.float64)
    calls.append(np.dtype(dtype))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(nib.Nifti1Image, "get_fdata", spy)
  _write(tmp_path / "v.nii.gz", _pattern().astype(np.float64), LAS)
  nifti.load_volume(tmp_path / "v.nii.gz")
  assert np.dtype(np.float64) not in calls


def test_load_volume_las_is_reoriented_to_ras(tmp_path):
  """LAS stores x right-to-left: stored voxel (0, 0, 0) is the right-most, posterior, inferior."""
  data = np.zeros(XYZ, np.float32)
  data[0, 0, 0] = 7.0  # right, posterior, inferior
  data[XYZ[0] - 1, XYZ[1] - 1, 0] = 5.0  # left, anterior, inferior
  data[0, 0, XYZ[2] - 1] = 3.0  # right, posterior, superior
  volume, spacing = nifti.load_volume(_write(tmp_path / "v.nii.gz", data, LAS))
  d, h, w = volume.shape
  assert (d, h, w) == (8, 10, 12)
  # (D, H, W) = (inferior->superior, posterior->anterior, left->right) after RAS+ canonical.
  assert volume[0, 0, w - 1] == 7.0
  assert volume[0, h - 1, 0] == 5.0
  assert volume[d - 1, 0, w - 1] == 3.0
  assert np.count_nonzero(volume) == 3
  # LAS -> RAS flips x; then (x, y, z) -> (z, y, x).
  np.testing.assert_array_equal(volume, data[::-1].transpose(2, 1, 0))
  assert spacing == (3.0, 1.5, 1.0)


def test_load_volume_permuted_axes_and_spacing_order(tmp_path):
  """Stored axis 0 is world z, axis 1 world x (flipped), axis 2 world y."""
  affine = np.array([
      [0.0, -1.5, 0.0, 0.0],
      [0.0, 0.0, 3.0, 0.0],
      [1.0, 0.0, 0.0, 0.0],
      [0.0, 0.0, 0.0, 1.0],
  ])
  data = _pattern()  # stored (12, 10, 8): 12 slices along z, 10 along x, 8 along y
  volume, spacing = nifti.load_volume(_write(tmp_path / "v.nii.gz", data, affine))
  # canonical (x, y, z) = (stored axis 1 flipped, stored axis 2, stored axis 0).
  canonical = data[:, ::-1, :].transpose(1, 2, 0)
  np.testing.assert_array_equal(volume, canonical.transpose(2, 1, 0))
  assert volume.shape == (12, 8, 10)
  assert spacing == (1.0, 3.0, 1.5)
  np.testing.assert_array_equal(volume, _dhw(data, affine))


def test_load_volume_accepts_uncompressed_and_trailing_singleton(tmp_path):
  data = _pattern()
  volume, _ = nifti.load_volume(_write(tmp_path / "v.nii", data[..., None], LAS))
  np.testing.assert_array_equal(volume, _dhw(data))


@pytest.mark.parametrize("shape", [(12, 10, 8, 2), (12, 10)])
def test_load_volume_rejects_non_3d(tmp_path, shape):
  path = _write(tmp_path / "v.nii.gz", np.ones(shape, np.float32), np.eye(4))
  with pytest.raises(ValueError, match="3D") as err:
    nifti.load_volume(path)
  assert str(path) in str(err.value)
  assert str(shape) in str(err.value)


def test_load_volume_missing_file_names_path(tmp_path):
  path = tmp_path / "nope" / "missing_t1.nii.gz"
  with pytest.raises(FileNotFoundError) as err:
    nifti.load_volume(path)
  assert str(path) in str(err.value)


def _truncated(tmp_path, name):
  data = np.random.default_rng(0).normal(size=(24, 20, 16)).astype(np.float32)
  path = _write(tmp_path / name, data, LAS)
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])
  return path


@pytest.mark.parametrize("kind", ["garbage_gz", "garbage_nii", "bad_header_gz", "truncated_gz",
                                  "truncated_nii", "empty_gz"])
def test_load_volume_corrupt_file_raises_value_error_naming_path(tmp_path, kind):
  rng = np.random.default_rng(1)
  if kind == "garbage_gz":
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
  elif kind == "garbage_nii":
    path = tmp_path / "bad.nii"
    path.write_bytes(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes())
  elif kind == "bad_header_gz":  # valid gzip stream, not a NIfTI header
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(gzip.compress(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()))
  elif kind == "truncated_gz":
    path = _truncated(tmp_path, "bad.nii.gz")
  elif kind == "truncated_nii":
    path = _truncated(tmp_path, "bad.nii")
  else:
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(b"")
  with pytest.raises(ValueError) as err:
    nifti.load_volume(path)
  assert str(path) in str(err.value)


def test_truncated_gz_fails_lazily_in_nibabel(tmp_path):
  """The truncated file loads its header fine: the error only comes when data are read."""
  path = _truncated(tmp_path, "bad.nii.gz")
  img = nib.load(path)
  assert img.shape == (24, 20, 16)
  with pytest.raises(ValueError, match="bad.nii.gz"):
    nifti.load_volume(path)


# ---------------------------------------------------------------------------------- crop_or_pad


def test_crop_or_pad_odd_shapes_centered():
  volume = _pattern()  # (12, 10, 8)
  out = nifti.crop_or_pad(volume, (7, 13, None))
  assert out.shape == (7, 13, 8)
  assert out.dtype == volume.dtype
  # Axis 0: 12 -> 7 keeps rows 3..9; axis 1: 10 -> 13 pads 1 before, 2 after.
  np.testing.assert_array_equal(out[:, 1:11], volume[3:10])
  assert not out[:, 0].any() and not out[:, 11:].any()


def test_crop_or_pad_with_center_and_clamping():
  volume = _pattern()
  out = nifti.crop_or_pad(volume, (5, 3, 8), center=(6.0, 1.0, None))
  np.testing.assert_array_equal(out, volume[4:9, 0:3])  # window [0, 3) clamped inside
  out = nifti.crop_or_pad(volume, (5, 3, 8), center=(11.0, 9.0, 3.5))
  np.testing.assert_array_equal(out, volume[7:12, 7:10])
  # Padding keeps every input voxel even for an off-centre center: the window [-7, 8) centred
  # on 0 is shifted to [-3, 12).
  out = nifti.crop_or_pad(volume, (15, 10, 8), center=(0.0, None, None))
  assert out.shape == (15, 10, 8)
  np.testing.assert_array_equal(out[3:], volume)
  assert not out[:3].any()


def test_crop_or_pad_keeps_channels_and_bool():
  volume = np.stack([_pattern(), -_pattern()], axis=-1)
  out = nifti.crop_or_pad(volume, (9, 11, 5))
  assert out.shape == (9, 11, 5, 2)
  np.testing.assert_array_equal(out[..., 0], -out[..., 1])
  mask = nifti.crop_or_pad(np.ones(XYZ, bool), (13, 9, 9))
  assert mask.dtype == bool and mask.sum() == 12 * 9 * 8


def test_crop_or_pad_rejects_bad_arguments():
  with pytest.raises(ValueError, match="shape"):
    nifti.crop_or_pad(np.zeros((4, 4)), (2, 2, 2))
  with pytest.raises(ValueError, match="shape"):
    nifti.crop_or_pad(np.zeros((4, 4, 4)), (0, 2, 2))
  with pytest.raises(ValueError, match="center"):
    nifti.crop_or_pad(np.zeros((4, 4, 4)), (2, 2, 2), center=(1.0, 1.0))


@settings(max_examples=50, deadline=None)
@given(
    in_shape=st.tuples(*[st.integers(1, 9)] * 3),
    out_shape=st.tuples(*[st.integers(1, 9)] * 3),
    center=st.tuples(*[st.floats(-5, 15)] * 3),
)
def test_crop_or_pad_properties(in_shape, out_shape, center):
  volume = np.arange(1, np.prod(in_shape) + 1, dtype=np.int64).reshape(in_shape)
  out = nifti.crop_or_pad(volume, out_shape, center=center)
  assert out.shape == out_shape
  # The kept block is contiguous: as large as possible along each axis.
  kept = out[out != 0]
  assert kept.size == np.prod([min(a, b) for a, b in zip(in_shape, out_shape)])
  assert len(np.unique(kept)) == kept.size


# ---------------------------------------------------------------------------- zscore_foreground


def test_zscore_foreground_statistics():
  rng = np.random.default_rng(0)
  image = rng.normal(50, 7, size=(8, 10, 12, 2)).astype(np.float32)
  image[..., 1] *= 3
  mask = np.zeros((8, 10, 12), bool)
  mask[1:7, 2:9, 3:11] = True
  out = nifti.zscore_foreground(image, mask)
  assert out.dtype == np.float32 and out.shape == image.shape
  for c in range(2):
    inside = out[..., c][mask]
    assert abs(inside.mean()) < 1e-5
    assert abs(inside.std() - 1) < 1e-5
    assert not out[..., c][~mask].any()
  single = nifti.zscore_foreground(image[..., 0].astype(np.float64), mask)
  assert single.dtype == np.float32
  np.testing.assert_allclose(single, out[..., 0], atol=1e-5)


def test_zscore_foreground_constant_and_empty_mask():
  image = np.full((4, 5, 6), 3.0, np.float32)
  mask = np.zeros((4, 5, 6), bool)
  mask[1:3] = True
  out = nifti.zscore_foreground(image, mask)
  assert np.isfinite(out).all() and not out.any()
  assert not nifti.zscore_foreground(image, np.zeros_like(mask)).any()
  with pytest.raises(ValueError, match="mask shape"):
    nifti.zscore_foreground(image, mask[:2])


# ------------------------------------------------------------------------------------ read_case


def test_read_case_brats(tmp_path):
  arrays = _make_case(tmp_path, "BraTS_001")
  subject = nifti.read_case(tmp_path / "BraTS_001", normalize=False)
  assert isinstance(subject, Subject)
  assert subject.subject_id == "BraTS_001"
  assert subject.modalities == ("t1", "t1ce", "t2", "flair")
  assert subject.image.shape == (8, 10, 12, 4) and subject.image.dtype == np.float32
  assert subject.spacing == (3.0, 1.5, 1.0)
  assert all(isinstance(s, float) for s in subject.spacing)
  for c, name in enumerate(subject.modalities):
    np.testing.assert_array_equal(subject.image[..., c], _dhw(arrays[name]))
  assert subject.label.dtype == np.uint8
  np.testing.assert_array_equal(subject.label, _dhw(arrays["seg"]))
  assert subject.brain_mask.dtype == bool
  np.testing.assert_array_equal(subject.brain_mask, _dhw(arrays["t1"]) != 0)
  assert subject.grade == 0 and subject.pathology == "tumour"
  assert subject.regions.shape == (8, 10, 12, 3)


def test_read_case_normalizes_over_brain(tmp_path):
  _make_case(tmp_path, "c")
  subject = nifti.read_case(tmp_path / "c")
  mask = subject.brain_mask
  assert subject.image.dtype == np.float32
  for c in range(4):
    inside = subject.image[..., c][mask]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
    assert not subject.image[..., c][~mask].any()


def test_read_case_brain_mask_is_any_modality(tmp_path):
  arrays = _make_case(tmp_path, "c", seg=None)
  # Zero out part of t1 only: those voxels stay in the mask through the other modalities.
  t1 = arrays["t1"].copy()
  t1[2:5] = 0
  _write(tmp_path / "c" / "c_t1.nii.gz", t1)
  subject = nifti.read_case(tmp_path / "c", seg=None, normalize=False)
  assert subject.label is None
  np.testing.assert_array_equal(subject.brain_mask, _dhw(arrays["t2"]) != 0)


def test_read_case_crop_and_pad_consistently(tmp_path):
  # Off-centre brain: stored x in [0, 6), i.e. canonical W in [6, 12) after the LAS flip.
  brain = (slice(0, 6), slice(2, 9), slice(1, 6))
  label = np.zeros(XYZ, np.uint8)
  label[3:6, 3:6, 2:5] = 2
  label[4, 4, 2:4] = 4
  _make_case(tmp_path, "c", brain=brain, label=label)
  full = nifti.read_case(tmp_path / "c", normalize=False)
  subject = nifti.read_case(tmp_path / "c", normalize=False, shape=(7, 9, 7))
  assert subject.image.shape == (7, 9, 7, 4)
  assert subject.label.shape == subject.brain_mask.shape == (7, 9, 7)
  # Whole brain and tumour kept, and all three arrays cut by the same window.
  assert subject.brain_mask.sum() == full.brain_mask.sum()
  assert np.count_nonzero(subject.label) == np.count_nonzero(full.label)
  np.testing.assert_array_equal(subject.brain_mask, subject.image[..., 0] != 0)
  assert np.all(subject.image[..., 0][subject.label > 0] != 0)
  np.testing.assert_array_equal(np.sort(subject.image[..., 2][subject.label == 4]),
                                np.sort(full.image[..., 2][full.label == 4]))
  # Brain W range [6, 11] (centre 8.5): the 7-wide window [6, 13) is shifted inside to [5, 12).
  w_idx = np.nonzero(subject.brain_mask.any(axis=(0, 1)))[0]
  assert (w_idx.min(), w_idx.max()) == (1, 6)
  # Padding along D (8 -> 11), H kept, W cropped to exactly the brain width.
  padded = nifti.read_case(tmp_path / "c", normalize=False, shape=(11, None, 6))
  assert padded.image.shape == (11, 10, 6, 4)
  assert padded.label.shape == (11, 10, 6)
  assert padded.brain_mask.sum() == full.brain_mask.sum()
  # Brain D range [1, 5] (centre 3): the 11-slice window centred on it starts at -2.
  np.testing.assert_array_equal(padded.label[2:10], full.label[:, :, 6:])
  np.testing.assert_array_equal(padded.image[2:10], full.image[:, :, 6:])
  assert not padded.image[[0, 1, 10]].any()


def test_read_case_maps_label_3_to_4(tmp_path):
  label = np.zeros(XYZ, np.uint8)
  label[4:6, 3:5, 2:4] = 2
  label[5, 4, 3] = 1
  label[4, 3, 2] = 3
  _make_case(tmp_path, "c", label=label)
  subject = nifti.read_case(tmp_path / "c")
  assert set(np.unique(subject.label).tolist()) == {0, 1, 2, 4}
  expected = _dhw(label)
  np.testing.assert_array_equal(subject.label == 4, expected == 3)
  assert subject.regions[..., 2].sum() == 1


@pytest.mark.parametrize("bad", [5, 255])
def test_read_case_rejects_invalid_labels(tmp_path, bad):
  label = np.zeros(XYZ, np.uint8)
  label[3, 3, 3] = bad
  _make_case(tmp_path, "c", label=label)
  with pytest.raises(ValueError, match="invalid values") as err:
    nifti.read_case(tmp_path / "c")
  assert str(tmp_path / "c" / "c_seg.nii.gz") in str(err.value)


def test_read_case_rejects_mixed_3_and_4_and_negative_labels(tmp_path):
  label = np.zeros(XYZ, np.int16)
  label[3, 3, 3], label[4, 4, 4] = 3, 4
  _make_case(tmp_path, "c", label=label)
  with pytest.raises(ValueError, match="both 3 and 4"):
    nifti.read_case(tmp_path / "c")
  label[:] = 0
  label[1, 1, 1] = -1
  _make_case(tmp_path, "d", label=label)
  with pytest.raises(ValueError, match="values") as err:
    nifti.read_case(tmp_path / "d")
  assert str(tmp_path / "d" / "d_seg.nii.gz") in str(err.value)


def test_read_case_missing_file_names_path(tmp_path):
  _make_case(tmp_path, "c")
  missing = tmp_path / "c" / "c_flair.nii.gz"
  missing.unlink()
  with pytest.raises(FileNotFoundError) as err:
    nifti.read_case(tmp_path / "c")
  assert str(missing) in str(err.value)
  with pytest.raises(FileNotFoundError, match="not found"):
    nifti.read_case(tmp_path / "no_such_case")


def test_read_case_missing_nii_gz_hints_at_nii(tmp_path):
  _make_case(tmp_path, "c", ext=".nii")
  with pytest.raises(FileNotFoundError, match=r"c_t1\.nii instead") as err:
    nifti.read_case(tmp_path / "c")
  assert str(tmp_path / "c" / "c_t1.nii.gz") in str(err.value)
  subject = nifti.read_case(tmp_path / "c", pattern="{case}_{name}.nii")
  assert subject.image.shape == (8, 10, 12, 4)


def test_read_case_corrupt_file_names_path(tmp_path):
  _make_case(tmp_path, "c")
  bad = tmp_path / "c" / "c_t2.nii.gz"
  bad.write_bytes(b"\x00garbage" * 50)
  with pytest.raises(ValueError) as err:
    nifti.read_case(tmp_path / "c")
  assert str(bad) in str(err.value)
  # A real file cut in half (the header still parses; the data do not).
  _make_case(tmp_path, "d", shape=(24, 20, 16), brain=(slice(2, 20),) * 3)
  bad = tmp_path / "d" / "d_seg.nii.gz"
  raw = bad.read_bytes()
  bad.write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError) as err:
    nifti.read_case(tmp_path / "d")
  assert str(bad) in str(err.value)


def test_read_case_shape_mismatch_names_both_files(tmp_path):
  _make_case(tmp_path, "c")
  t2 = tmp_path / "c" / "c_t2.nii.gz"
  _write(t2, np.ones((12, 10, 9), np.float32))
  with pytest.raises(ValueError, match="shape mismatch") as err:
    nifti.read_case(tmp_path / "c")
  message = str(err.value)
  assert str(tmp_path / "c" / "c_t1.nii.gz") in message and str(t2) in message
  assert "(8, 10, 12)" in message and "(9, 10, 12)" in message


def test_read_case_seg_shape_mismatch_names_both_files(tmp_path):
  _make_case(tmp_path, "c")
  seg = tmp_path / "c" / "c_seg.nii.gz"
  _write(seg, np.zeros((11, 10, 8), np.uint8))
  with pytest.raises(ValueError, match="shape mismatch") as err:
    nifti.read_case(tmp_path / "c")
  assert str(seg) in str(err.value) and str(tmp_path / "c" / "c_t1.nii.gz") in str(err.value)


def test_read_case_same_grid_different_orientation_is_fine(tmp_path):
  """A modality stored RAS while the others are LAS lands on the same (D, H, W) grid."""
  arrays = _make_case(tmp_path, "c", seg=None)
  ras = np.diag([*ZOOMS, 1.0])
  _write(tmp_path / "c" / "c_t2.nii.gz", arrays["t2"][::-1], ras)
  subject = nifti.read_case(tmp_path / "c", seg=None, normalize=False)
  np.testing.assert_array_equal(subject.image[..., 2], _dhw(arrays["t2"]))


def test_read_case_argument_errors(tmp_path):
  _make_case(tmp_path, "c")
  with pytest.raises(ValueError, match="pattern"):
    nifti.read_case(tmp_path / "c", pattern="{case}_t1.nii.gz")
  with pytest.raises(ValueError, match="pattern"):
    nifti.read_case(tmp_path / "c", pattern="{case}_{name}_{site}.nii.gz")
  with pytest.raises(ValueError, match="pathology"):
    nifti.read_case(tmp_path / "c", pathology="glioma")
  with pytest.raises(ValueError, match="modalities"):
    nifti.read_case(tmp_path / "c", modalities="t1")
  with pytest.raises(ValueError, match="modalities"):
    nifti.read_case(tmp_path / "c", modalities=("t1", "t1"))
  with pytest.raises(ValueError, match="shape"):
    nifti.read_case(tmp_path / "c", shape=(8, 8))


def test_read_case_wmh_configuration(tmp_path):
  label = np.zeros(XYZ, np.uint8)
  label[4:6, 3:5, 2:4] = 1
  arrays = _make_case(tmp_path, "wmh_07", modalities=("t1", "flair"), seg="wmh", label=label,
                      ext=".nii")
  subject = nifti.read_case(tmp_path / "wmh_07", modalities=("t1", "flair"), seg="wmh",
                            pattern="{case}_{name}.nii", pathology="wmh", normalize=False)
  assert subject.modalities == ("t1", "flair")
  assert subject.image.shape == (8, 10, 12, 2)
  np.testing.assert_array_equal(subject.image[..., 1], _dhw(arrays["flair"]))
  np.testing.assert_array_equal(subject.label, _dhw(label))
  assert subject.pathology == "wmh"
  assert subject.regions.shape == (8, 10, 12, 1)
  # A BraTS-valued label (4) is not a valid WMH label.
  label[1, 1, 1] = 4
  _write(tmp_path / "wmh_07" / "wmh_07_wmh.nii", label)
  with pytest.raises(ValueError, match="wmh_07_wmh.nii"):
    nifti.read_case(tmp_path / "wmh_07", modalities=("t1", "flair"), seg="wmh",
                    pattern="{case}_{name}.nii", pathology="wmh")


# ------------------------------------------------------------------------ list_cases / folders


def test_list_cases_and_read_folder(tmp_path):
  for seed, case in enumerate(["case_b", "case_a", "case_c"]):
    _make_case(tmp_path, case, seed=seed)
  (tmp_path / "empty_case").mkdir()
  (tmp_path / ".hidden").mkdir()
  (tmp_path / ".hidden" / "x.nii.gz").write_bytes(b"")
  (tmp_path / "README.txt").write_text("not a case")
  assert nifti.list_cases(tmp_path) == ["case_a", "case_b", "case_c"]
  subjects = nifti.read_folder(tmp_path, grades={"case_b": 1, "not_read": 0})
  assert [s.subject_id for s in subjects] == ["case_a", "case_b", "case_c"]
  assert [s.grade for s in subjects] == [0, 1, 0]
  assert all(s.image.shape == (8, 10, 12, 4) for s in subjects)
  # Different seeds -> different data, in the right order.
  a_t1 = nifti.read_case(tmp_path / "case_a", normalize=False).image[..., 0]
  assert not np.array_equal(a_t1, nifti.read_case(tmp_path / "case_b",
                                                  normalize=False).image[..., 0])
  subset = nifti.read_folder(tmp_path, cases=["case_c", "case_a"], shape=(6, 6, 6),
                             normalize=False)
  assert [s.subject_id for s in subset] == ["case_c", "case_a"]
  assert subset[0].image.shape == (6, 6, 6, 4)


def test_read_folder_grade_from_names_and_errors(tmp_path):
  _make_case(tmp_path / "HGG", "Brats18_1")
  _make_case(tmp_path / "LGG", "Brats18_2")
  _make_case(tmp_path / "mixed", "HGG_003")
  assert [s.grade for s in nifti.read_folder(tmp_path / "HGG")] == [1]
  assert [s.grade for s in nifti.read_folder(tmp_path / "LGG")] == [0]
  assert [s.grade for s in nifti.read_folder(tmp_path / "mixed")] == [1]
  assert [s.grade for s in nifti.read_folder(tmp_path / "HGG", grades={"Brats18_1": 0})] == [0]
  with pytest.raises(ValueError, match="grades"):
    nifti.read_folder(tmp_path / "HGG", grades={"Brats18_1": 2})
  (tmp_path / "nothing").mkdir()
  with pytest.raises(ValueError, match="no case folders"):
    nifti.read_folder(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="data root"):
    nifti.list_cases(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="Brats18_9"):
    nifti.read_folder(tmp_path / "HGG", cases=["Brats18_9"])


def test_write_case_round_trip_and_training_from_a_nifti_config(tmp_path):
  from helpers import config_for  # pylint: disable=g-import-not-at-top
  from jaxmed.data import datasets, synthetic
  from jaxmed.train import trainer

  subjects = synthetic.make_subjects(4, seed=3, shape=(16, 24, 20))
  for s in subjects:
    nifti.write_case(s, tmp_path / "brats")
  back = nifti.read_case(tmp_path / "brats" / subjects[0].subject_id, normalize=False)
  np.testing.assert_array_equal(back.image, subjects[0].image)
  np.testing.assert_array_equal(back.label, subjects[0].label)
  assert back.modalities == synthetic.MODALITIES and back.spacing == (1.0, 1.0, 1.0)

  config = config_for("restoration", {
      "data.root": str(tmp_path / "brats"), "data.crop": (16, 16, 16),  # source "auto": NIfTI
      "data.cache_dir": str(tmp_path / "cache"),
      "data.modalities": ("flair", "t1ce"), "data.num_val": 0, "data.num_test": 1,
      "model.features": (4, 8), "batch_size": 4, "total_steps": 2, "log_every": 1,
      "tensorboard": False, "checkpoint.every": 0})
  splits = datasets.load_splits(config.data)
  assert [len(splits[k]) for k in ("train", "val", "test")] == [3, 0, 1]
  s = splits["train"][0]
  assert s.image.shape == (16, 16, 16, 2) and s.modalities == ("flair", "t1ce")
  assert np.isfinite(s.image).all() and s.image.std() > 0.5  # z-scored, not raw phantom values
  result = trainer.train(config, str(tmp_path / "run"), progress=False)
  assert int(result.state.step) == 2 and np.isfinite(result.last_metrics["loss"])
  # An explicit source wins over the root; an unknown one is named.
  config.data.update(source="synthetic", num_subjects=3, shape=(16, 16, 16))
  assert datasets.load_subjects(config.data)[0].subject_id.startswith("phantom")
  config.data.source = "dicom"
  with pytest.raises(ValueError, match=r"data.source must be 'auto' or one of \('synthetic', "
                     r"'nifti', 'tfds'\); got 'dicom'"):
    datasets.load_subjects(config.data)
