"""Image metrics against scikit-image, MONAI and fastMRI's numpy formulas.

Every distinct (shape, dtype, options) compiles the SSIM kernel once (~0.4 s), so the tests
share a few shapes: 2D (2, 13, 17, 3), 3D (1, 11, 12, 13, 2) and a small (3, 9, 8, 1).
"""

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import SSIMMetric
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxmed.metrics import image, mae, mse, nmse, psnr, ssim

SHAPE_2D, SHAPE_3D, SMALL = (2, 13, 17, 3), (1, 11, 12, 13, 2), (3, 9, 8, 1)
SKIMAGE_DEFAULTS = dict(window="uniform", win_size=7, sample_covariance=True, border="reflect_crop")
SKIMAGE_GAUSSIAN = dict(sample_covariance=True, border="reflect_crop")


def _pair(shape, seed):
  """A target in [0, 1] and a noisy prediction (float64; SSIM around 0.5-0.9)."""
  rng = np.random.default_rng(seed)
  target = rng.uniform(size=shape)
  return target + 0.2 * rng.normal(size=shape), target


def _assert_matches_skimage(pred, target, data_range, value, ssim_map, **kwargs):
  for i in range(len(pred)):
    ref_value, ref_map = structural_similarity(pred[i], target[i], data_range=data_range[i],
                                               channel_axis=-1, full=True, **kwargs)
    np.testing.assert_allclose(value[i], ref_value, rtol=1e-4)
    # atol for map entries near zero, where float32 rounding dominates the relative error.
    np.testing.assert_allclose(ssim_map[i], ref_map, rtol=1e-4, atol=1e-5)


def _monai_ssim(pred, target, data_range, **kwargs):
  to_torch = lambda x: torch.from_numpy(np.moveaxis(x, -1, 1).astype(np.float32).copy())
  metric = SSIMMetric(spatial_dims=pred.ndim - 2, data_range=data_range, reduction="none", **kwargs)
  return metric(to_torch(pred), to_torch(target)).numpy()[:, 0]


@pytest.mark.parametrize("shape, ours, theirs", [
    (SHAPE_2D, SKIMAGE_DEFAULTS, {}),
    (SHAPE_3D, SKIMAGE_DEFAULTS, {}),
    (SMALL, dict(SKIMAGE_DEFAULTS, win_size=3), dict(win_size=3)),
    (SHAPE_3D, dict(SKIMAGE_DEFAULTS, win_size=5), dict(win_size=5)),
    (SHAPE_2D, SKIMAGE_GAUSSIAN, dict(gaussian_weights=True)),  # 11 taps
    (SMALL, dict(SKIMAGE_GAUSSIAN, sigma=0.8), dict(gaussian_weights=True, sigma=0.8)),  # 7 taps
])
def test_ssim_matches_skimage(shape, ours, theirs):
  for seed in range(3):
    pred, target = _pair(shape, seed)
    data_range = np.array([1.0, 2.0, 0.5])[:shape[0]]
    value, ssim_map = ssim(pred, target, data_range=data_range, return_map=True, **ours)
    assert value.shape == shape[:1] and ssim_map.shape == shape and ssim_map.dtype == np.float32
    _assert_matches_skimage(pred, target, data_range, value, ssim_map, **theirs)


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_ssim_matches_monai(shape):
  for seed in range(3):
    pred, target = _pair(shape, seed)
    np.testing.assert_allclose(ssim(pred, target, data_range=1.0),
                               _monai_ssim(pred, target, 1.0), rtol=1e-4)
  np.testing.assert_allclose(ssim(pred, target, data_range=1.0, window="uniform", win_size=7),
                             _monai_ssim(pred, target, 1.0, kernel_type="uniform", win_size=7),
                             rtol=1e-4)


def test_ssim_in_many_chunks(monkeypatch):
  """Several 3-row chunks, the last overlapping the one before: same as skimage and MONAI."""
  monkeypatch.setattr(image, "_CHUNK_ELEMENTS", 1)
  monkeypatch.setattr(image, "_MIN_CHUNK_ROWS", 3)
  image._ssim.clear_cache()  # trace again with the patched chunk size
  pred, target = _pair((2, 23, 19, 2), 1)
  value, ssim_map = ssim(pred, target, data_range=1.0, return_map=True, **SKIMAGE_DEFAULTS)
  _assert_matches_skimage(pred, target, [1.0, 1.0], value, ssim_map)
  pred, target = _pair((1, 14, 12, 13, 1), 1)
  value, ssim_map = ssim(pred, target, data_range=1.0, return_map=True)
  assert ssim_map.shape == (1, 4, 2, 3, 1)
  np.testing.assert_allclose(value, _monai_ssim(pred, target, 1.0), rtol=1e-4)
  np.testing.assert_allclose(value, ssim_map.mean(axis=(1, 2, 3, 4)), rtol=1e-5)
  image._ssim.clear_cache()


@pytest.mark.parametrize("shape", [SHAPE_3D, (4, 10)])
def test_simple_metrics_match_references(shape):
  pred, target = _pair(shape, 0)
  axes = tuple(range(1, len(shape)))
  np.testing.assert_allclose(mse(pred, target), ((pred - target)**2).mean(axes), rtol=1e-5)
  np.testing.assert_allclose(mae(pred, target), np.abs(pred - target).mean(axes), rtol=1e-5)
  # fastMRI's nmse, per item.
  ref = [np.linalg.norm(t - p)**2 / np.linalg.norm(t)**2 for p, t in zip(pred, target)]
  np.testing.assert_allclose(nmse(pred, target), ref, rtol=1e-5)
  ref = [peak_signal_noise_ratio(t, p, data_range=1.0) for p, t in zip(pred, target)]
  np.testing.assert_allclose(psnr(pred, target, data_range=1.0), ref, rtol=1e-5)
  # fastMRI's psnr: data_range = target.max() of each volume.
  maxima = target.reshape(shape[0], -1).max(axis=1)
  ref = [peak_signal_noise_ratio(t, p, data_range=r) for p, t, r in zip(pred, target, maxima)]
  np.testing.assert_allclose(psnr(pred, target, data_range=maxima), ref, rtol=1e-5)


def test_integer_images():
  rng = np.random.default_rng(0)
  target = rng.integers(0, 256, SMALL, dtype=np.uint8)
  pred = np.clip(target + rng.integers(-20, 21, SMALL), 0, 255).astype(np.uint8)
  ref = [peak_signal_noise_ratio(t, p) for p, t in zip(pred, target)]
  np.testing.assert_allclose(psnr(pred, target, data_range=255), ref, rtol=1e-5)
  ref = [structural_similarity(p, t, channel_axis=-1) for p, t in zip(pred, target)]
  np.testing.assert_allclose(ssim(pred, target, data_range=255, **SKIMAGE_DEFAULTS), ref,
                             rtol=1e-4)


def test_under_jit():
  pred, target = _pair(SHAPE_2D, 0)
  f = jax.jit(lambda a, b: ssim(a, b, data_range=1.0))
  np.testing.assert_allclose(f(pred, target), ssim(pred, target, data_range=1.0), rtol=1e-6)
  g = jax.jit(lambda a, b, r: psnr(a, b, data_range=r))
  np.testing.assert_allclose(g(pred, target, np.array([1.0, 2.0])),
                             psnr(pred, target, data_range=np.array([1.0, 2.0])), rtol=1e-6)


# One shape: the kernels are rank-agnostic, and each shape costs compilations.
_image = hnp.arrays(np.float32, SHAPE_2D, elements=st.floats(0, 1, width=32))
_image_pairs = st.tuples(_image, _image)


@settings(max_examples=20, deadline=None)
@given(_image_pairs, st.sampled_from([{}, SKIMAGE_DEFAULTS]))
def test_symmetry(images, options):
  a, b = images
  # SSIM in [-1, 1] from float32 variances E[x^2] - mu^2, which cancel on flat images: their
  # rounding residue (~eps mu^2 = 1.2e-7) against C2 = (0.03)^2 moves SSIM by up to ~eps / C2 =
  # 1.3e-4, differently in the two orders (hypothesis found 6.5e-5 on flat 1.0 against flat
  # 0.8125). A swapped term would differ by far more.
  np.testing.assert_allclose(ssim(a, b, data_range=1.0, **options),
                             ssim(b, a, data_range=1.0, **options), rtol=1e-6, atol=2e-4)
  np.testing.assert_allclose(mse(a, b), mse(b, a), rtol=1e-6)
  np.testing.assert_allclose(mae(a, b), mae(b, a), rtol=1e-6)
  np.testing.assert_allclose(psnr(a, b, data_range=1.0), psnr(b, a, data_range=1.0), rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(_image_pairs, st.sampled_from([{}, SKIMAGE_DEFAULTS]))
def test_identical_inputs_give_ideal_values(images, options):
  a, _ = images
  # 1 up to float32 rounding of the variances: eps * mean^2 / C2 ~ 1e-4 at worst.
  np.testing.assert_allclose(ssim(a, a, data_range=1.0, **options), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(mse(a, a), 0.0)
  np.testing.assert_array_equal(mae(a, a), 0.0)
  assert np.all(np.isposinf(psnr(a, a, data_range=1.0)))


def test_bad_input():
  x = np.zeros((2, 12, 12, 1), np.float32)
  with pytest.raises(ValueError, match=r"ssim: pred shape \(2, 12, 12, 1\) != target shape"):
    ssim(x, x[:, :11], data_range=1.0)
  with pytest.raises(ValueError, match=r"ssim: pred must be \(N, H, W, C\) or \(N, D, H, W, C\)"):
    ssim(x[..., 0], x[..., 0], data_range=1.0)
  with pytest.raises(ValueError, match=r"mse: pred must be \(N, \.\.\.\)"):
    mse(np.zeros(3), np.zeros(3))
  nan = x.copy()
  nan[0, 1, 1, 0] = np.nan
  with pytest.raises(ValueError, match="psnr: target contains NaN or Inf"):
    psnr(x, nan, data_range=1.0)
  with pytest.raises(ValueError, match="nmse: pred must be real; got dtype complex64"):
    nmse(x.astype(np.complex64), x)
  with pytest.raises(ValueError, match="mae: pred must be numeric or bool; got dtype <U5"):
    mae("image", x)
  for bad in (0.0, -1.0, np.inf, np.array([1.0, 0.0])):
    with pytest.raises(ValueError, match="ssim: data_range must be positive and finite"):
      ssim(x, x, data_range=bad)
  with pytest.raises(ValueError, match=r"psnr: data_range must be a number or have shape \(2,\)"):
    psnr(x, x, data_range=np.ones(3))
  with pytest.raises(ValueError, match="ssim: window must be one of"):
    ssim(x, x, data_range=1.0, window="box")
  with pytest.raises(ValueError, match="ssim: border must be one of"):
    ssim(x, x, data_range=1.0, border="same")
  with pytest.raises(ValueError, match="ssim: win_size must be an odd integer >= 3; got 4"):
    ssim(x, x, data_range=1.0, win_size=4)
  with pytest.raises(ValueError, match=r"ssim: win_size 13 exceeds the spatial shape \(12, 12\)"):
    ssim(x, x, data_range=1.0, win_size=13)
  with pytest.raises(ValueError, match="ssim: sigma must be positive"):
    ssim(x, x, data_range=1.0, sigma=0.0)
  with pytest.raises(ValueError, match="ssim: k1 and k2 must be non-negative"):
    ssim(x, x, data_range=1.0, k2=-0.1)

