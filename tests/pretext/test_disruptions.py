"""DAE disruptions: noise statistics, resampling against torch / scipy interpolation, exact local
masking counts, composition and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from jaxmed.pretext.disruptions import (add_noise, apply_channel_mask, disrupt,
                                        downsample_upsample, local_channel_mask)
from jaxmed.pretext.masking import channel_masking

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# Eq. 1: noise.


def test_noise_has_the_given_variance_zero_mean_and_is_fresh_per_key():
  x = jnp.asarray(RNG.uniform(size=(2, 16, 16, 16, 2)).astype(np.float32))  # 16k voxels
  for variance in (0.1, 0.05):
    d = np.asarray(add_noise(jax.random.key(0), x, variance=variance) - x, np.float64)
    # Standard errors: mean sqrt(v / n) ~ 0.002, variance v * sqrt(2 / n) ~ 0.001.
    assert abs(d.mean()) < 0.01
    np.testing.assert_allclose(d.var(), variance, rtol=0.05)
  a = add_noise(jax.random.key(1), x)
  np.testing.assert_array_equal(a, add_noise(jax.random.key(1), x))        # determinism
  b = add_noise(jax.random.key(2), x)
  assert abs(np.corrcoef(np.ravel(a - x), np.ravel(b - x))[0, 1]) < 0.05   # fresh noise
  # Fresh per voxel and sample: no two samples or channels share their noise.
  d = np.asarray(a - x)
  assert not np.allclose(d[0], d[1]) and not np.allclose(d[..., 0], d[..., 1])
  np.testing.assert_array_equal(add_noise(jax.random.key(0), x, variance=0.0), x)


# --------------------------------------------------------------------------------------------
# Eq. 2: down- then up-sampling, against torch's F.interpolate and scipy's zoom.

_TORCH_MODE = {"nearest": "nearest", "nearest-exact": "nearest-exact"}


def _torch_down_up(x, factors, method):
  """The reference code's ``F.interpolate(F.interpolate(img, size=low), size=full)``."""
  spatial = x.shape[1:-1]
  low = tuple(s // f for s, f in zip(spatial, factors))
  t = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
  if method == "linear":
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    kw = {"mode": mode, "align_corners": False}
  else:
    kw = {"mode": _TORCH_MODE[method]}
  out = F.interpolate(F.interpolate(t, size=low, **kw), size=spatial, **kw)
  return np.moveaxis(out.numpy(), 1, -1)


SHAPES = [((2, 12, 20, 3), 4), ((1, 8, 12, 20, 2), 4), ((1, 6, 9, 15, 1), 3),
          ((1, 6, 10, 4, 1), (3, 5, 2))]


@pytest.mark.parametrize("shape, factor", SHAPES)
@pytest.mark.parametrize("method", ["linear", "nearest", "nearest-exact"])
def test_downsample_upsample_equals_torch_interpolate(shape, factor, method):
  x = RNG.normal(size=shape).astype(np.float32)
  factors = (factor,) * (len(shape) - 2) if isinstance(factor, int) else factor
  out = downsample_upsample(jnp.asarray(x), factor=factor, method=method)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _torch_down_up(x, factors, method), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, factor", SHAPES[:3])
def test_linear_equals_scipy_zoom_with_half_pixel_grid(shape, factor):
  x = RNG.normal(size=shape).astype(np.float32)
  nd = len(shape) - 2
  low = ndi.zoom(x, (1, *(1 / factor,) * nd, 1), order=1, grid_mode=True, mode="nearest")
  ref = ndi.zoom(low, (1, *(factor,) * nd, 1), order=1, grid_mode=True, mode="nearest")
  np.testing.assert_allclose(downsample_upsample(jnp.asarray(x), factor=factor), ref, atol=1e-5)


def test_nearest_takes_each_cells_first_voxel_and_nearest_exact_its_centre():
  x = jnp.arange(16.0).reshape(1, 16, 1, 1)
  # linear: cells down to their middles 1.5, 5.5, 9.5, 13.5; back up a ramp, edges replicated.
  np.testing.assert_array_equal(downsample_upsample(x, factor=(4, 1))[0, :, 0, 0],
                                np.clip(np.arange(16.0), 1.5, 13.5))
  np.testing.assert_array_equal(downsample_upsample(x, factor=(4, 1), method="nearest")[0, :, 0, 0],
                                np.repeat([0.0, 4, 8, 12], 4))
  np.testing.assert_array_equal(
      downsample_upsample(x, factor=(4, 1), method="nearest-exact")[0, :, 0, 0],
      np.repeat([2.0, 6, 10, 14], 4))


def test_factor_one_is_the_identity_and_jit_and_bfloat16_equal_eager_float32():
  shape, factor = SHAPES[1]
  x = jnp.asarray(RNG.normal(size=shape).astype(np.float32))
  for method in ("linear", "nearest", "nearest-exact"):
    np.testing.assert_array_equal(downsample_upsample(x, factor=1, method=method), x)
  f = jax.jit(downsample_upsample, static_argnames=("factor", "method"))
  y = f(x.astype(jnp.bfloat16), factor=factor)
  assert y.dtype == jnp.bfloat16 and y.shape == shape
  np.testing.assert_allclose(y.astype(np.float32), downsample_upsample(x, factor=factor),
                             atol=0.05)  # bfloat16 keeps 8 bits: ~0.4% of |x| < 4


# --------------------------------------------------------------------------------------------
# Local masking.


@pytest.mark.parametrize("ratio", [0.6, 0.45, 0.0, 1.0])  # 28 (0.6 * 48 = 28.8), 21, 0, 48
def test_local_mask_zeroes_exactly_int_ratio_c_per_sample(ratio):
  n, channels = 8, 48  # one shape for the whole file: one compilation
  mask = np.asarray(local_channel_mask(jax.random.key(0), n, channels, ratio=ratio))
  assert mask.shape == (n, channels) and mask.dtype == np.float32
  assert set(np.unique(mask)) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.sum(axis=1), int(ratio * channels))
  shared = np.asarray(local_channel_mask(jax.random.key(0), n, channels, ratio=ratio,
                                         shared=True))
  np.testing.assert_array_equal(shared.sum(axis=1), int(ratio * channels))
  np.testing.assert_array_equal(shared, np.broadcast_to(shared[0], shared.shape))


def test_local_mask_subsets_differ_across_samples_unless_shared():
  mask = np.asarray(local_channel_mask(jax.random.key(3), 8, 48))
  assert len({tuple(row) for row in mask}) == 8  # C(48, 28) subsets: collisions ~ never
  np.testing.assert_array_equal(mask, local_channel_mask(jax.random.key(3), 8, 48))
  assert not np.array_equal(mask, local_channel_mask(jax.random.key(4), 8, 48))
  # Every channel is masked in some sample and kept in another: not a fixed block.
  assert np.all(mask.any(axis=0)) and not np.any(mask.all(axis=0))
  # shared=True is pretext.masking.channel_masking's subset for the same key.
  _, reference = channel_masking(jax.random.key(3), jnp.ones((1, 48)), 0.6)
  shared = local_channel_mask(jax.random.key(3), 8, 48, shared=True)
  np.testing.assert_array_equal(shared, np.broadcast_to(reference, (8, 48)))


@pytest.mark.parametrize("shape", [(8, 2, 3, 2, 48), (8, 5, 48), (8, 48)])
def test_apply_channel_mask_zeroes_those_channels_everywhere(shape):
  emb = jnp.asarray(RNG.normal(size=shape).astype(np.float32) + 5.0)  # no accidental zeros
  mask = local_channel_mask(jax.random.key(1), shape[0], shape[-1], ratio=0.6)
  out = np.asarray(jax.jit(apply_channel_mask)(emb, mask))
  assert out.shape == emb.shape and out.dtype == np.float32
  m = np.asarray(mask).astype(bool).reshape(shape[0], *(1,) * (len(shape) - 2), shape[-1])
  m = np.broadcast_to(m, shape)
  np.testing.assert_array_equal(out[m], 0.0)
  np.testing.assert_array_equal(out[~m], np.asarray(emb)[~m])
  # Per sample: the zero channels of out are the mask's (28 of 48 channels everywhere).
  np.testing.assert_array_equal((out == 0).all(axis=tuple(range(1, len(shape) - 1))),
                                np.asarray(mask).astype(bool))
  inf = apply_channel_mask(jnp.full(shape, jnp.inf, jnp.bfloat16), mask)
  assert inf.dtype == jnp.bfloat16 and int(jnp.sum(inf == 0)) == int(m.sum())


# --------------------------------------------------------------------------------------------
# Composition.


def test_disrupt_kinds_compose_noise_then_resampling_and_keep_the_dtype():
  x = jnp.asarray(RNG.uniform(size=(2, 8, 8, 1)), jnp.bfloat16)
  key = jax.random.key(7)
  f32 = lambda a: np.asarray(a, np.float32)
  noisy = disrupt(key, x, kind="noise")
  assert noisy.dtype == jnp.bfloat16 and noisy.shape == x.shape
  np.testing.assert_array_equal(f32(noisy), f32(add_noise(key, x)))
  np.testing.assert_array_equal(f32(disrupt(key, x, kind="none")), f32(x))
  np.testing.assert_array_equal(f32(disrupt(key, x, kind="downsample", resample="nearest")),
                                f32(downsample_upsample(x, method="nearest")))
  both = disrupt(key, x, kind="noise+downsample", noise_variance=0.2, factor=2)
  np.testing.assert_array_equal(
      f32(both), f32(downsample_upsample(add_noise(key, x, variance=0.2), factor=2)))


# --------------------------------------------------------------------------------------------
# Errors.


def test_bad_arguments():
  key = jax.random.key(0)
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError,
                     match=r"add_noise: x must be .*\(N, D, H, W, C\); got shape \(8, 8\)"):
    add_noise(key, jnp.zeros((8, 8)))
  with pytest.raises(TypeError, match="add_noise: x must be a floating array; got dtype int32"):
    add_noise(key, jnp.zeros((1, 8, 8, 1), jnp.int32))
  with pytest.raises(ValueError, match="variance must be a finite number >= 0; got variance=-0.1"):
    add_noise(key, x, variance=-0.1)
  with pytest.raises(ValueError, match=r"divisible by its factor; got spatial shape \(8, 6\) "
                                       r"and factor \(4, 4\)"):
    downsample_upsample(jnp.zeros((1, 8, 6, 1)))
  with pytest.raises(ValueError, match=r"factor must be an int >= 1 or one per spatial axis of "
                                       r"\(8, 8\); got factor=\(2, 2, 2\)"):
    downsample_upsample(x, factor=(2, 2, 2))
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="factor must be an int >= 1"):
      downsample_upsample(x, factor=bad)
  with pytest.raises(ValueError, match=r"method must be one of .*got method='cubic'"):
    downsample_upsample(x, method="cubic")
  with pytest.raises(TypeError, match="downsample_upsample: x must be a floating array"):
    downsample_upsample(jnp.zeros((1, 8, 8, 1), jnp.uint8))
  with pytest.raises(ValueError, match="local_channel_mask: n must be an int >= 1; got n=0"):
    local_channel_mask(key, 0, 8)
  with pytest.raises(ValueError, match="channels must be an int >= 1; got channels=4.0"):
    local_channel_mask(key, 2, 4.0)
  with pytest.raises(ValueError, match=r"local_channel_mask: ratio must be in \[0, 1\]; got 1.5"):
    local_channel_mask(key, 2, 8, ratio=1.5)
  with pytest.raises(ValueError, match=r"mask must have shape \(N, C\) = \(2, 8\) for embeddings "
                                       r"of shape \(2, 3, 8\); got \(8,\)"):
    apply_channel_mask(jnp.zeros((2, 3, 8)), jnp.zeros((8,)))
  with pytest.raises(ValueError, match=r"embeddings must be \(N, \*spatial, C\); got shape \(8,\)"):
    apply_channel_mask(jnp.zeros((8,)), jnp.zeros((8,)))
  with pytest.raises(ValueError, match=r"disrupt: kind must be one of .*got kind='all'"):
    disrupt(key, x, kind="all")
  with pytest.raises(ValueError, match=r"disrupt: every spatial size must be divisible"):
    disrupt(key, jnp.zeros((1, 6, 8, 1)), kind="noise+downsample")
  with pytest.raises(ValueError, match=r"disrupt: resample must be one of .*got resample='area'"):
    disrupt(key, x, kind="downsample", resample="area")
