"""Tests for jaxmed.data.transforms."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxmed.data import transforms as T

SHAPE_2D = (12, 10, 2)
SHAPE_3D = (6, 8, 10, 1)
SHAPES = pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D], ids=["2d", "3d"])

# XLA:CPU compilation dominates this file's run time; compiling with LLVM optimisations off
# makes it several times faster and does not change what is traced.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


def _image(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _label(image, t=0.3):
  """Integer label tied to the image: label == (image[..., 0] > t) (numpy)."""
  return (np.asarray(image, np.float32)[..., 0] > t).astype(np.int32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# Jitted once at module level so that tests sharing shapes share compilations.
SPATIAL_FNS = {
    "flip": lambda k, x, y: T.random_flip(k, x, y),
    "crop": lambda k, x, y: T.random_crop(k, x, y, size=tuple(s - 2 for s in x.shape[:-1])),
    "affine": lambda k, x, y: T.random_affine(k, x, y, max_rotation=30.0),
    "elastic": lambda k, x, y: T.elastic_deform(k, x, y, alpha=2.0, sigma=2.0),
}
SPATIAL = {name: _jit(fn) for name, fn in SPATIAL_FNS.items()}
INTENSITY = {
    "gamma": _jit(lambda k, x: T.random_gamma(k, x)),
    "noise": _jit(lambda k, x: T.gaussian_noise(k, x)),
    "scale": _jit(lambda k, x: T.random_scale_intensity(k, x)),
    "shift": _jit(lambda k, x: T.random_shift_intensity(k, x)),
}
AFFINE = _jit(T.affine_transform)


def _out_spatial(name, shape):
  return tuple(s - 2 for s in shape[:-1]) if name == "crop" else shape[:-1]


# --------------------------------------------------------------------------------------------
# Determinism, shapes, dtypes, jit and vmap.


@SHAPES
@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_spatial_shape_dtype_and_determinism(name, shape):
  fn = SPATIAL[name]
  x = _image(shape)
  y = _label(x)
  k0, k1, k2 = _keys(3)
  a = fn(k0, x, y)
  spatial = _out_spatial(name, shape)
  assert a[0].shape == (*spatial, shape[-1]) and a[0].dtype == jnp.float32
  assert a[1].shape == spatial and a[1].dtype == jnp.int32
  b = fn(k0, x, y)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  outs = [np.asarray(fn(k, x, y)[0]) for k in (k1, k2)]
  assert any(not np.array_equal(a[0], o) for o in outs)


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_spatial_without_label_passes_none(name):
  x = _image(SHAPE_2D)
  k = _keys(1)[0]
  out_x, none = SPATIAL[name](k, x, None)
  assert none is None
  np.testing.assert_allclose(out_x, SPATIAL[name](k, x, _label(x))[0], atol=1e-5)


@pytest.mark.parametrize("name,dtype,label_dtype", [("affine", jnp.bfloat16, jnp.bool_),
                                                    ("affine", jnp.float32, jnp.uint8),
                                                    ("elastic", jnp.bfloat16, jnp.uint8)])
def test_resampling_preserves_dtypes(name, dtype, label_dtype):
  x = _image(SHAPE_2D).astype(dtype)
  y = _label(x).astype(label_dtype)
  out_x, out_y = SPATIAL[name](_keys(1)[0], x, y)
  assert out_x.shape == SHAPE_2D and out_x.dtype == dtype
  assert out_y.shape == SHAPE_2D[:-1] and out_y.dtype == label_dtype


@SHAPES
@pytest.mark.parametrize("name", sorted(INTENSITY))
def test_intensity_shape_dtype_and_determinism(name, shape):
  fn = INTENSITY[name]
  x = _image(shape)
  k0, k1 = _keys(2)
  out = fn(k0, x)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, fn(k0, x))
  assert not np.array_equal(out, fn(k1, x))
  if len(shape) == 3:
    out16 = fn(k0, x.astype(jnp.bfloat16))
    assert out16.shape == shape and out16.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", sorted(SPATIAL))
def test_spatial_vmap_matches_per_example(name):
  xs = _image((3, *SHAPE_2D))
  ys = _label(xs)
  keys = jax.random.split(jax.random.key(5), 3)
  bx, by = _jit(jax.vmap(SPATIAL_FNS[name]))(keys, xs, ys)
  for i in range(3):
    ex, ey = SPATIAL[name](keys[i], xs[i], ys[i])
    np.testing.assert_allclose(bx[i], ex, atol=1e-5)
    np.testing.assert_array_equal(by[i], ey)


# --------------------------------------------------------------------------------------------
# Flip, rot90 and crop are exact permutations / slices that move the label with the image.


@SHAPES
def test_flip_is_one_of_the_numpy_flips(shape):
  x = _image(shape)
  y = _label(x)
  nd = len(shape) - 1
  xn = np.asarray(x)
  candidates = []
  for mask in itertools.product([False, True], repeat=nd):
    axes = tuple(a for a, m in zip(range(nd), mask) if m)
    candidates.append(np.flip(xn, axes) if axes else xn)
  fn = SPATIAL["flip"]
  seen = set()
  for k in _keys(24):
    out_x, out_y = fn(k, x, y)
    out_x = np.asarray(out_x)
    matches = [i for i, c in enumerate(candidates) if np.array_equal(out_x, c)]
    assert len(matches) == 1
    seen.add(matches[0])
    np.testing.assert_array_equal(np.sort(out_x, axis=None), np.sort(xn, axis=None))
    np.testing.assert_array_equal(out_y, _label(out_x))
  assert len(seen) > 1


def test_flip_axes_subset_and_p():
  x = _image(SHAPE_3D)
  fn = _jit(lambda k, x: (T.random_flip(k, x, axes=(0,), p=1.0)[0],
                          T.random_flip(k, x, axes=(-2,), p=1.0)[0],  # last spatial axis (W)
                          T.random_flip(k, x, p=0.0)[0]))
  first, last, none = fn(_keys(1)[0], x)
  np.testing.assert_array_equal(first, np.flip(x, 0))
  np.testing.assert_array_equal(last, np.flip(x, 2))
  np.testing.assert_array_equal(none, x)


@pytest.mark.parametrize("shape,axes,np_axes", [
    ((10, 10, 2), (-3, -2), (0, 1)),
    ((10, 10, 2), (0, 1), (0, 1)),
    ((6, 8, 8, 1), (-3, -2), (1, 2)),
    ((8, 6, 8, 1), (0, 2), (0, 2)),
])
def test_rot90_is_one_of_the_numpy_rotations(shape, axes, np_axes):
  x = _image(shape)
  y = _label(x)
  xn = np.asarray(x)
  candidates = [np.rot90(xn, k, axes=np_axes) for k in range(4)]
  fn = _jit(lambda k, x, y: T.random_rot90(k, x, y, axes=axes))
  seen = set()
  for k in _keys(24):
    out_x, out_y = fn(k, x, y)
    out_x = np.asarray(out_x)
    matches = [i for i, c in enumerate(candidates) if np.array_equal(out_x, c)]
    assert len(matches) == 1
    seen.add(matches[0])
    np.testing.assert_array_equal(out_y, _label(out_x))
  assert seen == {0, 1, 2, 3}


@SHAPES
def test_crop_is_a_slice_and_moves_label(shape):
  x = _image(shape)
  y = _label(x)
  xn = np.asarray(x)
  size = _out_spatial("crop", shape)
  fn = SPATIAL["crop"]
  starts = set()
  for k in _keys(40):
    out_x, out_y = fn(k, x, y)
    assert out_x.shape == (*size, shape[-1])
    found = [o for o in itertools.product(*[range(n - s + 1) for n, s in zip(shape, size)])
             if np.array_equal(out_x, xn[tuple(slice(a, a + s) for a, s in zip(o, size))])]
    assert len(found) == 1
    starts.add(found[0])
    np.testing.assert_array_equal(out_y, _label(out_x))
  # Every axis visits both extreme offsets (offsets are uniform over [0, n - s]).
  for a, (n, s) in enumerate(zip(shape, size)):
    assert {o[a] for o in starts} >= {0, n - s}


def test_crop_full_size_is_identity():
  x = _image(SHAPE_2D)
  out, _ = _jit(lambda k, x: T.random_crop(k, x, size=SHAPE_2D[:-1]))(_keys(1)[0], x)
  np.testing.assert_array_equal(out, x)


# --------------------------------------------------------------------------------------------
# Affine: identity, known rotations, parity with SciPy.


def _np_rotation(angles_deg):
  """Reference rotation matrix (documented convention of `affine_transform`)."""
  angles = np.deg2rad(np.atleast_1d(np.asarray(angles_deg, np.float64)))
  nd = 2 if angles.size == 1 else 3
  planes = [(0, 1)] if nd == 2 else [(1, 2), (0, 2), (0, 1)]
  r = np.eye(nd)
  for theta, (p, q) in zip(angles, planes):
    m = np.eye(nd)
    m[p, p] = m[q, q] = np.cos(theta)
    m[p, q], m[q, p] = -np.sin(theta), np.sin(theta)
    r = r @ m
  return r


def _scipy_affine(image, angles, scale, order=1):
  nd = image.ndim - 1
  m = _np_rotation(angles).T / scale
  c = (np.asarray(image.shape[:nd], np.float64) - 1) / 2
  offset = c - m @ c
  return np.stack([ndi.affine_transform(np.asarray(image[..., ch], np.float64), m, offset=offset,
                                        order=order, mode="grid-constant", cval=0.0)
                   for ch in range(image.shape[-1])], axis=-1)


@SHAPES
def test_random_affine_without_rotation_and_scaling_is_identity(shape):
  x = _image(shape)
  y = _label(x)
  out_x, out_y = _jit(lambda k, x, y: T.random_affine(k, x, y, max_rotation=0.0,
                                                         scale_range=(1.0, 1.0)))(
                                                             _keys(1)[0], x, y)
  np.testing.assert_array_equal(out_x, x)
  np.testing.assert_array_equal(out_y, y)


@pytest.mark.parametrize("shape,angles,np_axes", [
    ((9, 9, 2), 90.0, (0, 1)),
    ((10, 10, 1), -90.0, (1, 0)),
    ((8, 8, 8, 1), (90.0, 0.0, 0.0), (1, 2)),
    ((8, 8, 8, 1), (0.0, 90.0, 0.0), (0, 2)),
    ((8, 8, 8, 1), (0.0, 0.0, 90.0), (0, 1)),
])
def test_affine_90_degrees_matches_rot90(shape, angles, np_axes):
  x = _image(shape)
  y = _label(x)
  out_x, out_y = AFFINE(x, y, angles=angles, scale=1.0)
  ref = np.rot90(np.asarray(x), 1, axes=np_axes)
  interior = tuple(slice(1, -1) for _ in shape[:-1])
  np.testing.assert_allclose(np.asarray(out_x)[interior], ref[interior], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_y)[interior], _label(ref)[interior])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(12, 10, 2), (7, 16, 1), (6, 8, 10, 1), (9, 5, 7, 2)],
                         ids=["2d", "2d-wide", "3d", "3d-odd"])
def test_affine_transform_parity_with_scipy(shape, seed):
  rng = np.random.default_rng(seed)
  x = _image(shape, seed)
  nd = len(shape) - 1
  angles = rng.uniform(-40, 40, size=1 if nd == 2 else 3)
  scale = rng.uniform(0.7, 1.4)
  out, _ = AFFINE(x, None, angles=angles, scale=scale)
  ref = _scipy_affine(np.asarray(x), angles, scale)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


def test_affine_parity_under_default_jit():
  # The rest of the file compiles without LLVM optimisations; check the default pipeline too.
  x = _image((11, 9, 8, 2), seed=7)
  angles, scale = np.array([12.0, -33.0, 25.0]), 0.9
  out, _ = jax.jit(T.affine_transform)(x, angles=angles, scale=scale)
  np.testing.assert_allclose(np.asarray(out), _scipy_affine(x, angles, scale), atol=1e-4)


@SHAPES
def test_affine_label_nearest_and_subset(shape):
  x = _image(shape)
  y = np.random.default_rng(1).choice([0, 3, 7], size=shape[:-1]).astype(np.int32)
  angles = 23.0 if len(shape) == 3 else (23.0, -11.0, 31.0)
  _, out_y = AFFINE(x, y, angles=angles, scale=1.1)
  assert set(np.unique(out_y)) <= {0, 3, 7}
  ref = ndi.affine_transform(np.asarray(y), _np_rotation(angles).T / 1.1,
                             offset=(lambda c, m: c - m @ c)(
                                 (np.asarray(shape[:-1]) - 1) / 2, _np_rotation(angles).T / 1.1),
                             order=0, mode="grid-constant", cval=0)
  # Nearest-neighbour rounding can differ only at exact .5 ties; almost all voxels agree.
  assert np.mean(np.asarray(out_y) == ref) > 0.97


def test_random_affine_labels_subset_and_p_gate():
  shape = SHAPE_2D
  x = _image(shape)
  y = np.random.default_rng(2).choice([0, 1, 2, 4], size=shape[:-1]).astype(np.uint8)
  fn = _jit(jax.vmap(lambda k, x, y: T.random_affine(k, x, y, max_rotation=45.0, p=0.5),
                        in_axes=(0, None, None)))
  out_x, out_y = (np.asarray(a) for a in fn(_keys(16), x, y))
  assert set(np.unique(out_y)) <= {0, 1, 2, 4}
  unchanged = [np.array_equal(out_x[i], x) and np.array_equal(out_y[i], y) for i in range(16)]
  assert 0 < sum(unchanged) < 16


# --------------------------------------------------------------------------------------------
# Elastic deformation and Gaussian smoothing.


@SHAPES
def test_elastic_zero_alpha_is_identity(shape):
  x = _image(shape)
  y = _label(x)
  out_x, out_y = _jit(lambda k, x, y: T.elastic_deform(k, x, y, alpha=0.0))(_keys(1)[0], x, y)
  np.testing.assert_array_equal(out_x, x)
  np.testing.assert_array_equal(out_y, y)


@SHAPES
def test_elastic_labels_subset_and_deforms(shape):
  x = _image(shape)
  y = np.random.default_rng(3).choice([0, 2, 5], size=shape[:-1]).astype(np.int32)
  out_x, out_y = SPATIAL["elastic"](_keys(1)[0], x, y)
  assert set(np.unique(out_y)) <= {0, 2, 5}
  assert not np.array_equal(out_x, x)
  assert np.all(np.isfinite(out_x))


def test_elastic_displacement_magnitude():
  # On a linear ramp, linear interpolation is exact, so out - grid is the displacement.
  n = 48
  grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).astype(np.float32)
  x = jnp.asarray(grid + 100.0)  # offset so that outside (0) is distinguishable
  out, _ = _jit(lambda k, x: T.elastic_deform(k, x, alpha=1.5, sigma=4.0))(_keys(1)[0], x)
  disp = np.asarray(out) - np.asarray(x)
  inner = disp[8:-8, 8:-8]
  rms = np.sqrt(np.mean(inner ** 2))
  assert 0.5 * 1.5 < rms < 1.5 * 1.5
  # Smooth: neighbouring displacements differ much less than the displacement itself.
  assert np.abs(np.diff(inner, axis=0)).mean() < 0.5 * np.abs(inner).mean()


@pytest.mark.parametrize("shape,sigma", [((20, 17), 2.0), ((5, 9, 7), 3.0), ((4, 30), 1.3)])
def test_gaussian_smooth_parity_with_scipy(shape, sigma):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  out = _jit(lambda x: T.gaussian_smooth(x, sigma))(x)
  ref = ndi.gaussian_filter(x.astype(np.float64), sigma, mode="reflect", truncate=4.0)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Intensity transforms.


@SHAPES
def test_gamma_keeps_range_and_is_monotone(shape):
  x = _image(shape)
  x[..., 0] *= 3.0
  fn = _jit(lambda k, x: T.random_gamma(k, x, gamma_range=(0.5, 2.0)))
  xn = np.asarray(x).reshape(-1, shape[-1])
  for k in _keys(4):
    out = np.asarray(fn(k, x)).reshape(-1, shape[-1])
    assert not np.allclose(out, xn)
    np.testing.assert_allclose(out.min(0), xn.min(0), atol=1e-6)
    np.testing.assert_allclose(out.max(0), xn.max(0), atol=1e-5)
    for c in range(shape[-1]):
      order = np.argsort(xn[:, c], kind="stable")
      assert np.all(np.diff(out[order, c]) >= -1e-6)


def test_gamma_constant_channel_unchanged():
  x = _image(SHAPE_2D)
  x[..., 1] = 0.7
  out = np.asarray(INTENSITY["gamma"](_keys(1)[0], x))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[..., 1], x[..., 1])


def test_gamma_is_log_uniform():
  keys = _keys(2000)
  x = np.linspace(0.0, 1.0, 8 * 4, dtype=np.float32).reshape(8, 4, 1)
  outs = _jit(jax.vmap(lambda k: T.random_gamma(k, x, gamma_range=(0.5, 2.0))))(keys)
  # Recover gamma from a mid-range voxel: out = x ** gamma on [0, 1] data.
  v = float(x[4, 0, 0])
  gammas = np.log(np.asarray(outs[:, 4, 0, 0])) / np.log(v)
  assert gammas.min() >= 0.5 - 1e-4 and gammas.max() <= 2.0 + 1e-4
  assert abs(np.mean(gammas < 1.0) - 0.5) < 0.05


def test_noise_std_roughly_matches():
  x = np.zeros((64, 64, 2), np.float32)
  fixed, stds = _jit(lambda k, ks: (
      T.gaussian_noise(k, x, std=0.05),
      jax.vmap(lambda k: jnp.std(T.gaussian_noise(k, x, std=(0.0, 0.1))))(ks)))(
          _keys(1)[0], _keys(64, seed=1))
  fixed, stds = np.asarray(fixed), np.asarray(stds)
  assert abs(fixed.std() - 0.05) < 0.003 and abs(fixed.mean()) < 0.003
  assert stds.min() >= 0.0 and stds.max() <= 0.105
  assert 0.035 < stds.mean() < 0.065


@SHAPES
def test_p_zero_gates_are_identity(shape):
  x = _image(shape)
  y = _label(x)
  k = _keys(1)[0]
  outs = _jit(lambda k, x, y: (T.random_affine(k, x, y, max_rotation=30.0, p=0.0),
                               T.elastic_deform(k, x, y, alpha=5.0, p=0.0),
                               T.random_flip(k, x, y, p=0.0),
                               (T.random_gamma(k, x, p=0.0), y),
                               (T.gaussian_noise(k, x, p=0.0), y)))(k, x, y)
  for out_x, out_y in outs:
    np.testing.assert_array_equal(out_x, x)
    np.testing.assert_array_equal(out_y, y)


def test_intensity_p_gate_under_vmap():
  x = _image(SHAPE_2D)
  keys = _keys(32)
  both = _jit(jax.vmap(lambda k: (T.random_gamma(k, x, p=0.5), T.gaussian_noise(k, x, p=0.5))))
  for outs in both(keys):
    same = [np.array_equal(o, x) for o in np.asarray(outs)]
    assert 0 < sum(same) < 32


# --------------------------------------------------------------------------------------------
# Intensity scale and shift (MONAI RandScaleIntensity / RandShiftIntensity).


@pytest.mark.parametrize("shape", [(6, 5, 3), (3, 4, 5, 2)], ids=["2d", "3d"])
def test_scale_and_shift_intensity_use_one_u_for_all_channels(shape):
  x = _image(shape)
  keys = _keys(64, seed=2)
  fn = _jit(jax.vmap(lambda k: (T.random_scale_intensity(k, x, factor=0.2),
                                T.random_shift_intensity(k, x, offset=0.3),
                                T.random_scale_intensity(k, x, factor=0.2, p=0.5))))
  scaled, shifted, gated = (np.asarray(a) for a in fn(keys))
  us = scaled.reshape(64, -1)[:, 0] / x.reshape(-1)[0] - 1.0
  vs = shifted.reshape(64, -1)[:, 0] - x.reshape(-1)[0]
  for u, v, a, b in zip(us, vs, scaled, shifted):
    np.testing.assert_allclose(a, x * (1.0 + u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, x + v, rtol=0, atol=1e-5)
  assert np.all(np.abs(us) <= 0.2 + 1e-5) and np.all(np.abs(vs) <= 0.3 + 1e-5)
  assert us.min() < -0.1 and us.max() > 0.1 and vs.min() < -0.15 and vs.max() > 0.15
  same = [np.array_equal(g, x) for g in gated]
  assert 0 < sum(same) < 64


def test_scale_and_shift_intensity_off_are_identity():
  x = _image(SHAPE_2D)
  k = _keys(1)[0]
  outs = _jit(lambda k, x: (T.random_scale_intensity(k, x, factor=0.5, p=0.0),
                            T.random_shift_intensity(k, x, offset=0.5, p=0.0),
                            T.random_scale_intensity(k, x, factor=0.0),
                            T.random_shift_intensity(k, x, offset=0.0)))(k, x)
  for out in outs:
    np.testing.assert_array_equal(out, x)
  x16 = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(T.random_scale_intensity(k, x16, factor=0.0), x16)
  assert T.random_shift_intensity(k, x16, offset=0.0).dtype == jnp.bfloat16


def test_augment_scales_and_shifts_the_image_only():
  images = _image((3, 6, 6, 2))
  labels = _label(images)
  scale = dict(intensity_scale=0.1, intensity_scale_p=1.0)
  shift = dict(intensity_shift=0.1, intensity_shift_p=1.0)
  k = jax.random.key(4)
  fn = _jit(lambda k, x, y: tuple(T.Augment(flip=True, **extra).batch(k, x, y)
                                  for extra in ({}, scale, shift, {**scale, **shift})))
  (x0, y0), *rest = ((np.asarray(x), np.asarray(y)) for x, y in fn(k, images, labels))
  (x1, y1), (x2, y2), (x3, y3) = rest
  # The flips keep their randomness; the label is untouched; one u per example.
  assert not np.array_equal(y0, labels)
  for y in (y1, y2, y3):
    np.testing.assert_array_equal(y, y0)
  us = x1[:, 0, 0, 0] / x0[:, 0, 0, 0] - 1.0
  vs = x2[:, 0, 0, 0] - x0[:, 0, 0, 0]
  for i in range(3):
    np.testing.assert_allclose(x1[i], x0[i] * (1.0 + us[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x2[i], x0[i] + vs[i], rtol=0, atol=1e-5)
    np.testing.assert_allclose(x3[i], x1[i] + vs[i], rtol=0, atol=1e-5)  # scale, then shift
  assert np.all(np.abs(us) <= 0.1 + 1e-5) and np.all(np.abs(vs) <= 0.1 + 1e-5)
  assert len(set(np.round(us, 6))) == 3 and len(set(np.round(vs, 6))) == 3


def test_intensity_scale_and_shift_config_and_bad_values():
  from jaxmed import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config().data.augment
  assert (cfg.intensity_scale, cfg.intensity_scale_p, cfg.intensity_shift,
          cfg.intensity_shift_p) == (0.0, 0.1, 0.0, 0.1)
  aug = T.Augment.from_config({k: v for k, v in cfg.items() if k != "enabled"})
  assert aug.intensity_scale == 0.0 and aug.intensity_shift_p == 0.1
  aug = T.Augment.from_config({"intensity_scale": 0.1, "intensity_shift": 0.1})  # MONAI BTCV
  assert (aug.intensity_scale_p, aug.intensity_shift_p) == (0.1, 0.1)
  for field, value in [("intensity_scale", -0.1), ("intensity_scale", "big"),
                       ("intensity_shift", float("nan")), ("intensity_shift", -1.0),
                       ("intensity_scale_p", 1.5), ("intensity_shift_p", -0.1),
                       ("intensity_shift_p", "often")]:
    with pytest.raises(ValueError, match=field):
      T.Augment(**{field: value})
  k = _keys(1)[0]
  with pytest.raises(ValueError, match="factor"):
    T.random_scale_intensity(k, _image(SHAPE_2D), factor=-0.5)
  with pytest.raises(ValueError, match="offset"):
    T.random_shift_intensity(k, _image(SHAPE_2D), offset=float("inf"))
  with pytest.raises(ValueError, match="floating"):
    T.random_shift_intensity(k, jnp.zeros(SHAPE_2D, jnp.int32))


# --------------------------------------------------------------------------------------------
# Augment.


def test_from_config_mapping_and_config_dict():
  aug = T.Augment.from_config({"crop_size": [8, 8], "gamma": [0.7, 1.5], "rot90": True})
  assert aug.crop_size == (8, 8) and aug.gamma == (0.7, 1.5) and aug.rot90
  assert aug.flip  # default kept
  cfg = ml_collections.ConfigDict({"scale": [0.9, 1.1], "rotation": 10.0, "noise_std": 0.1})
  aug = T.Augment.from_config(cfg)
  assert aug.scale == (0.9, 1.1) and aug.rotation == 10.0 and aug.noise_std == 0.1
  hash(aug)


def test_from_config_rejects_unknown_keys():
  with pytest.raises(ValueError, match="bogus.*zzz|zzz.*bogus"):
    T.Augment.from_config({"flip": True, "bogus": 1, "zzz": 2})


def test_augment_rejects_bad_values():
  with pytest.raises(ValueError, match="affine_p"):
    T.Augment(affine_p=1.5)
  with pytest.raises(ValueError, match="scale"):
    T.Augment(scale=(1.2, 0.8))


def test_augment_batch_under_jit():
  images = _image((4, 16, 16, 2))
  labels = np.random.default_rng(0).integers(0, 4, size=(4, 16, 16)).astype(np.int32)
  aug = T.Augment(flip=True, rot90=True, crop_size=(12, 12), rotation=15.0, scale=(0.9, 1.1),
                  affine_p=0.5, elastic_alpha=2.0, elastic_p=0.5, gamma=(0.7, 1.5), gamma_p=0.5,
                  noise_std=0.1, noise_p=0.5)
  fn = _jit(aug.batch)
  out_x, out_y = (np.asarray(a) for a in fn(jax.random.key(0), images, labels))
  assert out_x.shape == (4, 12, 12, 2) and out_x.dtype == jnp.float32
  assert out_y.shape == (4, 12, 12) and out_y.dtype == jnp.int32
  assert set(np.unique(out_y)) <= {0, 1, 2, 3}
  assert np.all(np.isfinite(out_x))
  again = fn(jax.random.key(0), images, labels)
  np.testing.assert_array_equal(out_x, again[0])
  np.testing.assert_array_equal(out_y, again[1])
  assert not np.array_equal(out_x, fn(jax.random.key(1), images, labels)[0])
  # Examples get different keys.
  assert not np.array_equal(out_x[0], out_x[1])
  imgs_only, none = _jit(T.Augment(crop_size=(12, 12)).batch)(jax.random.key(0), images)
  assert none is None and imgs_only.shape == (4, 12, 12, 2)


def test_augment_permutations_keep_label_tied_to_image():
  images = _image((3, *SHAPE_3D[:1], 8, 8, 1))
  labels = _label(images)
  aug = T.Augment(flip=True, rot90=True, crop_size=(4, 6, 6))
  out_x, out_y = _jit(aug.batch)(jax.random.key(3), images, labels)
  assert out_x.shape == (3, 4, 6, 6, 1)
  np.testing.assert_array_equal(out_y, _label(out_x))


def test_augment_default_call_single_example():
  x = _image(SHAPE_2D)
  out_x, out_y = _jit(T.Augment())(jax.random.key(0), x)
  assert out_y is None and out_x.shape == SHAPE_2D


# --------------------------------------------------------------------------------------------
# Errors, raised from static shapes.


@pytest.mark.parametrize("fn", [
    lambda k, x, y: T.random_flip(k, x, y),
    lambda k, x, y: T.random_rot90(k, x, y, axes=(0, 1)),
    lambda k, x, y: T.random_crop(k, x, y, size=(4, 4)),
    lambda k, x, y: T.random_affine(k, x, y),
    lambda k, x, y: T.elastic_deform(k, x, y),
    lambda k, x, y: T.Augment()(k, x, y),
])
def test_mismatched_label_shape_raises(fn):
  x = _image((10, 10, 2))
  y = jnp.zeros((10, 9), jnp.int32)
  with pytest.raises(ValueError, match=r"\(10, 9\).*\(10, 10\)"):
    fn(_keys(1)[0], x, y)


def test_bad_rot90_axes_raise():
  k = _keys(1)[0]
  with pytest.raises(ValueError, match="equal size"):
    T.random_rot90(k, _image((12, 10, 2)))
  with pytest.raises(ValueError, match="equal size"):
    T.random_rot90(k, _image((6, 8, 10, 1)), axes=(1, 2))
  with pytest.raises(ValueError, match="not a spatial axis"):
    T.random_rot90(k, _image((8, 8, 2)), axes=(0, -1))  # channel axis
  with pytest.raises(ValueError, match="not a spatial axis"):
    T.random_rot90(k, _image((8, 8, 2)), axes=(0, 2))
  with pytest.raises(ValueError, match="distinct"):
    T.random_rot90(k, _image((8, 8, 2)), axes=(1, 1))
  with pytest.raises(ValueError, match="two spatial axes"):
    T.random_rot90(k, _image((8, 8, 8, 2)), axes=(0, 1, 2))


def test_other_bad_arguments_raise():
  k = _keys(1)[0]
  with pytest.raises(ValueError, match=r"image must be.*\(5, 5\)"):
    T.random_flip(k, jnp.zeros((5, 5)))
  with pytest.raises(ValueError, match="size"):
    T.random_crop(k, _image(SHAPE_2D), size=(13, 4))
  with pytest.raises(ValueError, match="size"):
    T.random_crop(k, _image(SHAPE_2D), size=(4, 4, 4))
  with pytest.raises(ValueError, match="angle"):
    T.affine_transform(_image(SHAPE_3D), angles=10.0)
  with pytest.raises(ValueError, match="p must be"):
    T.random_affine(k, _image(SHAPE_2D), p=2.0)
  with pytest.raises(ValueError, match="gamma_range"):
    T.random_gamma(k, _image(SHAPE_2D), gamma_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="floating"):
    T.gaussian_noise(k, jnp.zeros(SHAPE_2D, jnp.int32))
  with pytest.raises(ValueError, match=r"labels shape"):
    T.Augment().batch(k, _image((2, 8, 8, 1)), jnp.zeros((2, 8, 7), jnp.int32))
