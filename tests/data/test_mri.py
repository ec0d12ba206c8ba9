"""Tests for jaxmed.data.mri: centred FFTs (parity with numpy), fastMRI Cartesian masks and
zero-filled reconstructions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.data import mri


def _complex(rng, shape):
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _np_fft2c(x):
  axes = (-2, -1)
  return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)


def _np_ifft2c(k):
  axes = (-2, -1)
  return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def _centre(width, center_fraction):
  """fastMRI ``calculate_center_mask`` (numpy, float64)."""
  num_low = round(width * center_fraction)
  mask = np.zeros(width, bool)
  pad = (width - num_low + 1) // 2
  mask[pad:pad + num_low] = True
  return mask


def _fastmri_equispaced(width, acceleration, center_fraction, offset, stop):
  """fastMRI ``EquispacedMaskFractionFunc`` for a given offset; fastMRI uses stop = width - 1."""
  num_low = round(width * center_fraction)
  adjusted = acceleration * (num_low - width) / (num_low * acceleration - width)
  mask = np.zeros(width, bool)
  samples = np.around(np.arange(offset, stop, adjusted)).astype(np.uint)
  mask[samples[samples < width]] = True
  return mask | _centre(width, center_fraction), adjusted


# --- FFTs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6, 8), (3, 5, 7), (4, 9)])
def test_fft2c_matches_numpy(shape):
  x = _complex(np.random.default_rng(0), shape)
  np.testing.assert_allclose(mri.fft2c(x), _np_fft2c(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mri.ifft2c(x), _np_ifft2c(x), rtol=1e-5, atol=1e-5)
  # Jitted equals eager; a real input is promoted to complex.
  np.testing.assert_allclose(jax.jit(mri.fft2c)(x), mri.fft2c(x), rtol=1e-6, atol=1e-6)
  real = x.real
  assert mri.fft2c(real).dtype == jnp.complex64
  np.testing.assert_allclose(mri.fft2c(real), _np_fft2c(real), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 8), (1, 5, 7)])
def test_fft2c_round_trip_and_parseval(shape):
  x = _complex(np.random.default_rng(1), shape)
  k = mri.fft2c(x)
  np.testing.assert_allclose(mri.ifft2c(k), x, atol=1e-5)
  np.testing.assert_allclose(mri.fft2c(mri.ifft2c(x)), x, atol=1e-5)
  np.testing.assert_allclose(np.sum(np.abs(k) ** 2, axis=(-2, -1)),
                             np.sum(np.abs(x) ** 2, axis=(-2, -1)), rtol=1e-5)


def test_fft2c_centres_dc():
  """A constant image has all its energy at (H // 2, W // 2), the centred DC sample."""
  k = np.array(mri.fft2c(np.ones((1, 5, 6), np.float32)))
  assert np.isclose(abs(k[0, 2, 3]), np.sqrt(30), rtol=1e-6)
  k[0, 2, 3] = 0
  assert np.abs(k).max() < 1e-5


# --- masks --------------------------------------------------------------------------------------


# (acceleration, centre fraction) pairs: fastMRI's, odd widths' rounding, and no centre.
_PAIRS = ((4, 0.08), (8, 0.04), (2, 0.16), (3, 0.0))


@pytest.mark.parametrize("kind", mri.MASK_KINDS)
@pytest.mark.parametrize("width", [32, 33])
def test_centre_columns_always_sampled(kind, width):
  accs, cfs = zip(*_PAIRS)
  masks, acceleration = mri.sample_masks(jax.random.key(0), 64, width, kind=kind,
                                         accelerations=accs, center_fractions=cfs)
  assert masks.shape == (64, width) and masks.dtype == jnp.bool_
  assert acceleration.shape == (64,) and acceleration.dtype == jnp.float32
  masks, acceleration = np.asarray(masks), np.asarray(acceleration)
  for acc, cf in _PAIRS:
    rows = masks[acceleration == acc]
    assert len(rows) > 0
    assert rows[:, _centre(width, cf)].all()


@pytest.mark.parametrize("width,cf", [(33, 0.2), (32, 0.2), (32, 0.3)])
def test_random_mask_centre_only_when_centre_exceeds_budget(width, cf):
  """``num_low >= W / acceleration``: probability <= 0, exactly the num_low centre columns."""
  masks = np.asarray(mri.random_mask(jax.random.key(1), 64, width, acceleration=8,
                                     center_fraction=cf))
  num_low = round(width * cf)
  pad = (width - num_low + 1) // 2
  assert (masks.sum(axis=1) == num_low).all()
  assert masks[:, pad:pad + num_low].all()


def test_random_mask_fraction_is_one_over_acceleration():
  """W=64, cf=0.08: num_low=5, prob=(16-5)/59; the expected fraction is exactly 1/4. Over 4 keys
  x 3000 masks, the 59 random columns give 708,000 Bernoulli draws, so the mean fraction has
  std sqrt(p(1-p)/708000) * 59/64 ~ 4.3e-4; the tolerance 2.5e-3 is > 5 std."""
  fractions = [float(jnp.mean(mri.random_mask(k, 3000, 64, acceleration=4,
                                              center_fraction=0.08)))
               for k in jax.random.split(jax.random.key(2), 4)]
  assert abs(np.mean(fractions) - 0.25) < 2.5e-3
  # Per key (177,000 draws, std ~ 8.6e-4) every mean is within 5e-3 (> 5 std) too.
  assert np.all(np.abs(np.array(fractions) - 0.25) < 5e-3)


def test_sample_masks_pairs_by_index():
  """Each example's fraction follows its own pair; pairs are drawn ~ uniformly (3000 draws:
  std of a share sqrt(1/3 * 2/3 / 3000) ~ 0.0086, tolerance 0.05)."""
  accs, cfs = (2, 4, 8), (0.16, 0.08, 0.04)
  masks, acc = mri.sample_masks(jax.random.key(3), 3000, 64, kind="random", accelerations=accs,
                                center_fractions=cfs)
  masks, acc = np.asarray(masks), np.asarray(acc)
  for a, c in zip(accs, cfs):
    rows = masks[acc == a]
    assert abs(len(rows) / 3000 - 1 / 3) < 0.05
    assert rows[:, _centre(64, c)].all()
    # 1000 masks x ~59 random columns: std of the mean fraction < 2e-3.
    assert abs(rows.mean() - 1 / a) < 0.01


@pytest.mark.parametrize("width,acc,cf", [(64, 4, 0.08), (33, 4, 0.08), (320, 4, 0.08),
                                          (320, 8, 0.04), (50, 3, 0.1), (37, 6, 0.0)])
def test_equispaced_matches_fastmri(width, acc, cf):
  masks = np.asarray(mri.equispaced_mask(jax.random.key(4), 64, width, acceleration=acc,
                                         center_fraction=cf))
  refs = []
  _, adjusted = _fastmri_equispaced(width, acc, cf, 0, stop=width)
  for offset in range(round(adjusted)):
    ref, _ = _fastmri_equispaced(width, acc, cf, offset, stop=width)
    refs.append(ref)
    # Our only departure from fastMRI (stop below W, not W - 1) can only add column W - 1.
    fastmri, _ = _fastmri_equispaced(width, acc, cf, offset, stop=width - 1)
    np.testing.assert_array_equal(ref[:-1], fastmri[:-1])
  refs = np.stack(refs)
  matches = (masks[:, None, :] == refs[None]).all(axis=2)
  assert matches.any(axis=1).all()          # every mask is fastMRI's for some offset
  assert matches.any(axis=0).all()          # and every offset occurs in 64 draws
  # Constant spacing outside the centre, up to rounding: gaps are floor(a) or ceil(a).
  outside = ~_centre(width, cf)
  for mask in masks[:20]:
    cols = np.flatnonzero(mask & outside)
    for side in (cols[cols < width // 2], cols[cols > width // 2]):
      gaps = np.diff(side)
      assert set(gaps.tolist()) <= {int(np.floor(adjusted)), int(np.ceil(adjusted))}
  assert abs(masks.mean() - 1 / acc) < 1.5 / width + 0.02


@pytest.mark.parametrize("kind", mri.MASK_KINDS)
def test_masks_deterministic_per_key_and_jit(kind):
  kwargs = dict(kind=kind, accelerations=(2, 4, 8), center_fractions=(0.16, 0.08, 0.04))
  a = mri.sample_masks(jax.random.key(5), 64, 32, **kwargs)
  b = mri.sample_masks(jax.random.key(5), 64, 32, **kwargs)
  c = mri.sample_masks(jax.random.key(6), 64, 32, **kwargs)
  jitted = jax.jit(lambda k: mri.sample_masks(k, 64, 32, **kwargs))(jax.random.key(5))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(a, jitted):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kind", mri.MASK_KINDS)
def test_acceleration_one_samples_everything(kind):
  masks, _ = mri.sample_masks(jax.random.key(7), 64, 33, kind=kind, accelerations=(1,),
                              center_fractions=(0.08,))
  assert np.asarray(masks).all()
  rng = np.random.default_rng(7)
  signed = rng.normal(size=(64, 8, 33)).astype(np.float32)
  np.testing.assert_allclose(mri.zero_filled(signed, masks), np.abs(signed), atol=1e-5)
  z = _complex(rng, (64, 8, 33))
  np.testing.assert_allclose(mri.zero_filled(z, masks), np.abs(z), atol=1e-5)


# --- undersampling ------------------------------------------------------------------------------


def test_zero_filled_full_mask_is_identity_for_magnitude_images():
  image = np.random.default_rng(8).uniform(size=(64, 8, 33)).astype(np.float32)
  out = mri.zero_filled(image, np.ones((64, 33), bool))
  assert out.dtype == jnp.float32 and out.shape == image.shape
  np.testing.assert_allclose(out, image, atol=1e-5)


def test_undersample_and_zero_filled_match_numpy():
  rng = np.random.default_rng(9)
  image = rng.uniform(size=(64, 8, 32)).astype(np.float32)
  masks = np.asarray(mri.random_mask(jax.random.key(9), 64, 32, acceleration=4,
                                     center_fraction=0.125))
  k = _np_fft2c(image.astype(np.complex128))
  under = np.asarray(mri.undersample(k.astype(np.complex64), masks))
  np.testing.assert_array_equal(under[~np.broadcast_to(masks[:, None], under.shape)], 0)
  np.testing.assert_allclose(under, k * masks[:, None, :], atol=1e-5)
  expected = np.abs(_np_ifft2c(k * masks[:, None, :]))
  zf = mri.zero_filled(image, masks)
  np.testing.assert_allclose(zf, expected, atol=1e-5)
  np.testing.assert_allclose(jax.jit(mri.zero_filled)(image, masks), zf, atol=1e-6)
  assert np.abs(np.asarray(zf) - image).max() > 1e-2     # 4x undersampling changes the image
  # A constant image lives in the DC sample, which the centre always keeps.
  const = np.full((64, 8, 32), 2.5, np.float32)
  np.testing.assert_allclose(mri.zero_filled(const, masks), const, atol=1e-5)


def test_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="acceleration must be >= 1"):
    mri.random_mask(key, 2, 16, acceleration=0.5)
  with pytest.raises(ValueError, match=r"center_fraction must be in \[0, 1\)"):
    mri.random_mask(key, 2, 16, center_fraction=1.0)
  with pytest.raises(ValueError, match=r"center_fraction must be in \[0, 1\)"):
    mri.equispaced_mask(key, 2, 16, center_fraction=-0.1)
  with pytest.raises(ValueError, match="width must be an int >= 1"):
    mri.random_mask(key, 2, 0)
  with pytest.raises(ValueError, match="num must be an int >= 1"):
    mri.random_mask(key, True, 16)
  with pytest.raises(ValueError, match="finite real number"):
    mri.random_mask(key, 2, 16, acceleration=float("nan"))
  with pytest.raises(ValueError, match="kind must be one of"):
    mri.sample_masks(key, 2, 16, kind="radial")
  with pytest.raises(ValueError, match="equal length"):
    mri.sample_masks(key, 2, 16, accelerations=(4, 8), center_fractions=(0.08,))
  with pytest.raises(ValueError, match="must be sequences"):
    mri.sample_masks(key, 2, 16, accelerations=4, center_fractions=0.08)
  with pytest.raises(ValueError, match=r"num_low=4, acceleration=4"):
    mri.equispaced_mask(key, 2, 16, acceleration=4, center_fraction=0.25)
  with pytest.raises(TypeError, match="fft2c: x must be a real floating or complex"):
    mri.fft2c(np.ones((4, 4), np.int32))
  with pytest.raises(ValueError, match="ifft2c: k must be .* at least 2 axes"):
    mri.ifft2c(np.ones(4, np.complex64))
  with pytest.raises(ValueError, match=r"zero_filled: image must be \(N, H, W\)"):
    mri.zero_filled(np.ones((4, 4), np.float32), np.ones((4,), bool))
  with pytest.raises(ValueError, match=r"mask must be \(N, W\) = \(2, 8\)"):
    mri.zero_filled(np.ones((2, 4, 8), np.float32), np.ones((2, 4), bool))
  with pytest.raises(TypeError, match="undersample: mask must be bool or numeric"):
    mri.undersample(np.ones((2, 4, 8), np.complex64), np.full((2, 8), "a"))


def test_fastmri_center_fraction():
  assert mri.fastmri_center_fraction(4) == 0.08 and mri.fastmri_center_fraction(8) == 0.04
  assert mri.fastmri_center_fraction(6) == 0.0533
  with pytest.raises(ValueError, match="acceleration must be >= 1"):
    mri.fastmri_center_fraction(0.5)
