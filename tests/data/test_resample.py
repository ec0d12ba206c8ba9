"""Tests for jaxmed.data.resample: parity with MONAI `Spacingd` and SciPy, validation, no-op."""

from __future__ import annotations

import fractions
import warnings

import numpy as np
import pytest

from jaxmed.data import resample

torch = pytest.importorskip("torch")
monai_transforms = pytest.importorskip("monai.transforms")
monai_data = pytest.importorskip("monai.data")
ndimage = pytest.importorskip("scipy.ndimage")

BRATS_VALUES = np.array([0, 1, 2, 4], np.uint8)

# (shape, spacing, target_spacing, channels): odd shapes, anisotropic spacings, down- and
# up-sampling, single-voxel axes, axes within AFFINE_TOL of the target, exact .5 ties.
CASES = [
    ((9, 11, 7), (1.0, 0.8, 2.5), (1.7, 1.3, 1.1), 3),    # mixed down / up, anisotropic
    ((7, 5, 9), (2.0, 1.5, 3.0), (0.9, 0.7, 1.3), 1),     # upsampling on every axis
    ((13, 9, 11), (1.0, 1.0, 1.0), (1.5, 0.5, 2.0), 2),   # exact ties (x = k + 0.5)
    ((7, 10, 11), (1.0, 1.0, 1.0), (1.5, 0.5, 0.75), 4),  # ties MONAI breaks off half-even
    ((1, 5, 3), (1.0, 1.0, 1.0), (0.5, 2.0, 3.0), 2),     # single-voxel axis
    ((6, 8, 5), (0.9375, 1.2, 5.0), (0.9380, 1.0, 1.5), 1),  # D within AFFINE_TOL: kept
    ((3, 4, 5), (1.0, 1.0, 1.0), (0.8, 4.0, 2.0), 3),     # far edge past the last voxel
]


def _monai_spacingd(image: np.ndarray, label: np.ndarray, spacing, target):
  """MONAI Spacingd on channels-last `image` / 3D `label`; returns channels-last float32."""
  affine = torch.from_numpy(np.diag([*map(float, spacing), 1.0]))
  data = {
      "image": monai_data.MetaTensor(torch.from_numpy(np.moveaxis(image, -1, 0).copy()),
                                     affine=affine),
      "label": monai_data.MetaTensor(torch.from_numpy(label[None].astype(np.float32)),
                                     affine=affine),
  }
  out = monai_transforms.Spacingd(keys=["image", "label"], pixdim=target,
                                  mode=("bilinear", "nearest"))(data)
  image_out = np.moveaxis(out["image"].numpy(), 0, -1)
  new_spacing = np.sqrt(np.sum(out["image"].affine.numpy()[:3, :3] ** 2, axis=0))
  return image_out, out["label"].numpy()[0], new_spacing


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_monai_spacingd(case):
  shape, spacing, target, channels = CASES[case]
  rng = np.random.default_rng(case)
  image = rng.uniform(-1.0, 2.0, size=(*shape, channels)).astype(np.float32)
  label = rng.choice(BRATS_VALUES, size=shape)
  want_image, want_label, want_spacing = _monai_spacingd(image, label, spacing, target)

  got_image, got_spacing = resample.resample_to_spacing(image, spacing, target, order=1)
  got_label, label_spacing = resample.resample_to_spacing(label, spacing, target, order=0)

  assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
  assert got_image.shape == want_image.shape
  np.testing.assert_allclose(got_image, want_image, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(got_label, want_label)
  np.testing.assert_allclose(got_spacing, want_spacing, rtol=1e-12)
  assert label_spacing == got_spacing
  assert resample.output_shape(shape, spacing, target) == got_label.shape


def test_nearest_ties_follow_monai_not_half_even():
  # 1 mm -> 1.5 / 0.5 / 0.75 mm puts output voxels exactly half-way between input voxels;
  # MONAI's choice there comes from float64 noise in its grid, which resample reproduces.
  shape, spacing, target = (7, 10, 11), (1.0, 1.0, 1.0), (1.5, 0.5, 0.75)
  probe = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)  # every voxel distinct
  _, want, _ = _monai_spacingd(np.zeros((*shape, 1), np.float32), probe, spacing, target)
  got, _ = resample.resample_to_spacing(probe, spacing, target, order=0)
  np.testing.assert_array_equal(got, want)
  # Exact rational coordinates rounded half to even pick other voxels at some ties.
  exact = [
      np.minimum([round(fractions.Fraction(t) / fractions.Fraction(s) * j) for j in range(m)],
                 n - 1)
      for n, m, s, t in zip(shape, got.shape, spacing, target)
  ]
  assert not np.array_equal(got, probe[np.ix_(*exact)])


def test_3d_image_equals_single_channel():
  rng = np.random.default_rng(3)
  image = rng.normal(size=(9, 6, 8)).astype(np.float32)
  args = ((1.1, 0.7, 2.0), (1.4, 1.0, 1.2))
  got3, spacing3 = resample.resample_to_spacing(image, *args, order=1)
  got4, spacing4 = resample.resample_to_spacing(image[..., None], *args, order=1)
  np.testing.assert_array_equal(got3, got4[..., 0])
  assert spacing3 == spacing4


def test_output_shape_matches_monai():
  rng = np.random.default_rng(7)
  cases = [((240, 240, 155), (1.0, 1.0, 1.0), (1.5, 1.5, 2.0)),
           ((4, 5, 3), (1.0, 1.0, 1.0), (2.0, 4.0, 0.8)),  # (n - 1) * s / t + 1 = 2.5: to 2
           ((1, 1, 1), (1.0, 2.0, 3.0), (0.1, 0.2, 0.3))]
  cases += [(tuple(int(n) for n in rng.integers(1, 300, 3)), tuple(rng.uniform(0.2, 5.0, 3)),
             tuple(rng.uniform(0.2, 5.0, 3))) for _ in range(30)]
  cases += [(tuple(int(n) for n in rng.integers(1, 64, 3)),
             tuple(rng.choice([0.5, 0.8, 1.0, 1.5, 2.0], 3)),
             tuple(rng.choice([0.5, 0.75, 1.0, 1.5, 2.0, 4.0], 3))) for _ in range(30)]
  for shape, spacing, target in cases:
    image = monai_data.MetaTensor(
        torch.zeros((1, *shape)), affine=torch.from_numpy(np.diag([*spacing, 1.0])))
    lazy = monai_transforms.Spacing(pixdim=target, lazy=True)(image)
    want = tuple(int(n) for n in lazy.peek_pending_shape())
    assert resample.output_shape(shape, spacing, target) == want, (shape, spacing, target)
  assert resample.output_shape((240, 240, 155), (1, 1, 1), (1.5, 1.5, 2)) == (160, 160, 78)


def test_grid_equation_and_far_edge():
  # x_j = j * t / s = 0, 0.8, 1.6, 2.4; 2.4 is past the last voxel and clips to 2 (border).
  volume = np.array([0.0, 10.0, 20.0], np.float32).reshape(3, 1, 1)
  got, spacing = resample.resample_to_spacing(volume, (1, 1, 1), (0.8, 1, 1), order=1)
  np.testing.assert_allclose(got[:, 0, 0], [0.0, 8.0, 16.0, 20.0], atol=1e-5)
  assert spacing == (0.8, 1.0, 1.0)
  labels = np.array([3, 5, 7], np.int16).reshape(3, 1, 1)
  got, _ = resample.resample_to_spacing(labels, (1, 1, 1), (0.8, 1, 1), order=0)
  np.testing.assert_array_equal(got[:, 0, 0], [3, 5, 7, 7])  # rint(0, .8, 1.6, 2)


def _scipy_grid(shape, out_shape, spacing, target):
  """Per-axis input coordinates j * t / s of the output voxels."""
  return [np.arange(m) * (t / s) for m, s, t in zip(out_shape, spacing, target)]


@pytest.mark.parametrize("seed", range(4))
def test_linear_matches_scipy_map_coordinates(seed):
  rng = np.random.default_rng(100 + seed)
  shape = tuple(int(n) for n in rng.integers(2, 12, 3))
  spacing = tuple(rng.uniform(0.5, 3.0, 3))
  target = tuple(rng.uniform(0.5, 3.0, 3))
  image = rng.uniform(size=(*shape, 2)).astype(np.float32)
  got, _ = resample.resample_to_spacing(image, spacing, target, order=1)
  grid = np.meshgrid(*_scipy_grid(shape, got.shape[:3], spacing, target), indexing="ij")
  for c in range(image.shape[-1]):
    want = ndimage.map_coordinates(image[..., c].astype(np.float64), grid, order=1,
                                   mode="nearest")
    np.testing.assert_allclose(got[..., c], want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_nearest_matches_scipy_map_coordinates_off_ties(seed):
  rng = np.random.default_rng(200 + seed)
  shape = tuple(int(n) for n in rng.integers(2, 12, 3))
  spacing = tuple(rng.uniform(0.5, 3.0, 3))
  target = tuple(rng.uniform(0.5, 3.0, 3))
  out_shape = resample.output_shape(shape, spacing, target)
  axes = _scipy_grid(shape, out_shape, spacing, target)
  # SciPy rounds ties up, torch / resample half to even: only compare away from ties.
  assert min(np.min(np.abs(x % 1.0 - 0.5)) for x in axes) > 1e-6
  label = rng.choice(BRATS_VALUES, size=shape)
  got, _ = resample.resample_to_spacing(label, spacing, target, order=0)
  want = ndimage.map_coordinates(label, np.meshgrid(*axes, indexing="ij"), order=0,
                                 mode="nearest")
  np.testing.assert_array_equal(got, want)


def test_scipy_zoom_grid_mode_false_only_when_corners_align():
  rng = np.random.default_rng(5)
  image = rng.uniform(size=(9, 7, 5)).astype(np.float32)
  # (m - 1) * t / s == n - 1 on every axis: 9 -> 5 (t = 2), 7 -> 4 (t = 2), 5 -> 9 (t = .5).
  got, _ = resample.resample_to_spacing(image, (1, 1, 1), (2.0, 2.0, 0.5), order=1)
  want = ndimage.zoom(image.astype(np.float64), np.divide(got.shape, image.shape), order=1,
                      mode="nearest", grid_mode=False)
  assert want.shape == got.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  # 9 -> round(8 / 1.5 + 1) = 6 voxels: zoom spreads them over 0..8 (step 1.6), not step 1.5.
  got, _ = resample.resample_to_spacing(image, (1, 1, 1), (1.5, 1, 1), order=1)
  want = ndimage.zoom(image.astype(np.float64), np.divide(got.shape, image.shape), order=1,
                      mode="nearest", grid_mode=False)
  assert want.shape == got.shape and np.max(np.abs(got - want)) > 1e-2


@pytest.mark.parametrize("order", [0, 1])
def test_no_op_returns_a_copy(order):
  rng = np.random.default_rng(9)
  volume = (rng.integers(0, 5, size=(5, 6, 7, 2)).astype(np.uint8) if order == 0 else
            rng.normal(size=(5, 6, 7, 2)))
  for target in [(1.0, 2.0, 3.0), (1.0004, 1.9996, 3.0)]:  # equal, and within AFFINE_TOL
    got, spacing = resample.resample_to_spacing(volume, (1.0, 2.0, 3.0), target, order=order)
    assert spacing == (1.0, 2.0, 3.0)
    assert got.dtype == (np.uint8 if order == 0 else np.float32)
    np.testing.assert_array_equal(got, volume.astype(got.dtype))
    assert not np.shares_memory(got, volume)
  # An axis that is resampled always gives a new array, even if another is the identity.
  got, _ = resample.resample_to_spacing(volume.astype(np.float32), (1, 2, 3), (1, 2, 1.5),
                                        order=order)
  assert got.shape == (5, 6, 13, 2) and not np.shares_memory(got, volume)
  # MONAI does not resample within AFFINE_TOL either.
  label = rng.choice(BRATS_VALUES, size=(5, 6, 7))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _, want_label, _ = _monai_spacingd(np.zeros((5, 6, 7, 1), np.float32), label, (1, 2, 3),
                                       (1.0004, 1.9996, 3.0))
  np.testing.assert_array_equal(want_label, label)


@pytest.mark.parametrize("kwargs, match", [
    (dict(volume=np.zeros((4, 4))), r"volume must be \(D, H, W\).*got shape \(4, 4\)"),
    (dict(volume=np.zeros((2, 2, 2, 2, 2))), r"got shape \(2, 2, 2, 2, 2\) \(ndim 5\)"),
    (dict(volume=np.zeros((0, 3, 3))), r"empty axis; got shape \(0, 3, 3\)"),
    (dict(spacing=(1.0, 0.0, 1.0)), r"spacing must be positive; got \(1.0, 0.0, 1.0\)"),
    (dict(target_spacing=(1.0, -2.0, 1.0)), r"target_spacing must be positive.*-2.0"),
    (dict(spacing=(1.0, float("nan"), 1.0)), r"spacing must be finite; got \(1.0, nan, 1.0\)"),
    (dict(target_spacing=(1.0, 1.0, float("inf"))), r"target_spacing must be finite.*inf"),
    (dict(spacing=(1.0, 1.0)), r"spacing must be 3 numbers.*shape \(2,\)"),
    (dict(target_spacing="abc"), r"target_spacing must be 3 numbers"),
    (dict(order=2), r"order must be 0 \(nearest\) or 1 \(linear\); got 2"),
    (dict(order=True), r"order must be 0 .* got True"),
    (dict(order=1.0), r"order must be 0 .* got 1.0"),
    (dict(volume=np.full((3, 3, 3), np.nan)), r"27 non-finite \(NaN / inf\) values"),
    (dict(volume=np.zeros((3, 3, 3), np.complex64)), r"real numeric volume; got dtype complex64"),
])
def test_errors(kwargs, match):
  args = dict(volume=np.zeros((3, 3, 3), np.float32), spacing=(1.0, 1.0, 1.0),
              target_spacing=(2.0, 2.0, 2.0), order=1)
  args.update(kwargs)
  order = args.pop("order")
  with pytest.raises(ValueError, match=match):
    resample.resample_to_spacing(**args, order=order)


def test_nearest_accepts_non_finite_and_output_shape_errors():
  volume = np.full((3, 3, 3), np.nan, np.float32)  # no value mixing: NaN stays where it was
  got, _ = resample.resample_to_spacing(volume, (1, 1, 1), (2, 2, 2), order=0)
  assert got.shape == (2, 2, 2) and np.isnan(got).all()
  with pytest.raises(ValueError, match=r"shape must be 3 positive integers.*\(3, 0, 3\)"):
    resample.output_shape((3, 0, 3), (1, 1, 1), (1, 1, 1))
  with pytest.raises(ValueError, match=r"shape must be 3 positive integers.*\(3, 3\)"):
    resample.output_shape((3, 3), (1, 1, 1), (1, 1, 1))
  with pytest.raises(ValueError, match=r"target_spacing must be positive"):
    resample.output_shape((3, 3, 3), (1, 1, 1), (1, 0, 1))


def test_torch_linspace_replica():
  for m in range(1, 400):
    want = torch.linspace(-1, 1, m, dtype=torch.float64).numpy()
    np.testing.assert_array_equal(resample._torch_linspace(m), want, err_msg=f"m={m}")
