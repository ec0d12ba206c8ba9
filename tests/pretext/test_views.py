"""Tests for jaxmed.pretext.views (random resized crops, SwAV multi-crop, SimSiam views)."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from jaxmed.data.transforms import Augment
from jaxmed.pretext import views as V

# XLA:CPU compilation dominates this file's run time; LLVM optimisations off compile faster and do
# not change what is traced.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})
KEY = jax.random.PRNGKey(0)


def _coords_image(n, spatial):
  """``(n, *spatial, nd)`` float32 whose channel k holds the voxel's coordinate along axis k."""
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"), -1)
  return jnp.asarray(np.broadcast_to(grid, (n, *spatial, len(spatial))).astype(np.float32))


def _tv_get_params(rng, height, width, scale, ratio):
  """torchvision RandomResizedCrop.get_params transcribed to NumPy: (i, j, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------- shapes, jit


def test_multi_crop_shapes_dtype_and_jit_2d():
  x = jax.random.uniform(KEY, (3, 24, 24, 2)).astype(jnp.bfloat16)
  f = _jit(lambda k, x: V.multi_crop(k, x, global_size=16, local_size=(8, 8), num_global=2,
                                     num_local=4))
  g, l = f(KEY, x)
  assert g.shape == (2, 3, 16, 16, 2) and l.shape == (4, 3, 8, 8, 2)
  assert g.dtype == jnp.bfloat16 and l.dtype == jnp.bfloat16
  # Linear interpolation of values in [0, 1) stays in [0, 1) (up to bfloat16 rounding).
  assert float(jnp.min(g)) >= 0.0 and float(jnp.max(l)) <= 1.0


def test_multi_crop_shapes_3d_and_constant_image():
  x = jnp.full((2, 16, 16, 16, 1), 3.5, jnp.float32)
  f = _jit(lambda k, x: V.multi_crop(k, x, global_size=12, local_size=6, num_local=3))
  g, l = f(KEY, x)
  assert g.shape == (2, 2, 12, 12, 12, 1) and l.shape == (3, 2, 6, 6, 6, 1)
  assert g.dtype == l.dtype == jnp.float32
  np.testing.assert_allclose(g, 3.5, atol=1e-6)
  np.testing.assert_allclose(l, 3.5, atol=1e-6)


# ----------------------------------------------------------------------------- random_resized_crop


@pytest.mark.parametrize("shape", [(2, 12, 12, 2), (2, 8, 8, 8, 1)], ids=["2d", "3d"])
def test_full_box_at_image_size_is_identity(shape):
  x = jax.random.normal(KEY, shape)
  f = _jit(lambda k, x: V.random_resized_crop(k, x, size=shape[1:-1], scale=(1, 1), ratio=(1, 1)))
  y = f(jax.random.PRNGKey(3), x)
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_views_differ_between_views_and_examples_and_are_deterministic():
  x = jnp.broadcast_to(_coords_image(1, (24, 24)), (3, 24, 24, 2))  # identical examples
  f = _jit(lambda k, x: V.multi_crop(k, x, global_size=8, local_size=4, num_local=2, flip=False))
  g, l = f(jax.random.PRNGKey(5), x)
  g2, l2 = f(jax.random.PRNGKey(5), x)
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(l, l2)
  g3, _ = f(jax.random.PRNGKey(6), x)
  assert not np.array_equal(g, g3)
  for views in (np.asarray(g), np.asarray(l)):
    for a, b in itertools.combinations(range(views.shape[0]), 2):  # between views
      assert not np.allclose(views[a], views[b])
    for v in views:  # between examples of one view (same input image, own keys)
      for a, b in itertools.combinations(range(3), 2):
        assert not np.allclose(v[a], v[b])


@pytest.mark.parametrize("spatial,size,scale,n", [((48, 48), 16, (0.25, 0.5), 256),
                                                  ((20, 20, 20), 6, (0.2, 0.5), 96)],
                         ids=["2d", "3d"])
def test_crop_of_coordinate_image_covers_a_box_in_the_requested_scale(spatial, size, scale, n):
  nd = len(spatial)
  ratio = (3 / 4, 4 / 3)
  x = _coords_image(n, spatial)
  y = np.asarray(_jit(lambda k, x: V.random_resized_crop(k, x, size=size, scale=scale))(KEY, x),
                 np.float64)
  lengths, starts = [], []
  for k in range(nd):
    line = np.moveaxis(y[..., k], k + 1, -1)  # coordinate k along output axis k
    line = line.reshape(n, -1, size)
    # Samples are evenly spaced (box length / size apart) and do not depend on other axes.
    np.testing.assert_allclose(line, np.broadcast_to(line[:, :1], line.shape), atol=1e-4)
    step = (line[:, 0, -2] - line[:, 0, 1]) / (size - 3)
    lengths.append(step * size)
    starts.append(line[:, 0, 0] - 0.5 * step + 0.5)  # first half-pixel centre, no clamping here
  lengths, starts = np.stack(lengths, 1), np.stack(starts, 1)
  # Integer boxes (torchvision rounds the sides), inside the image.
  np.testing.assert_allclose(lengths, np.round(lengths), atol=2e-3)
  np.testing.assert_allclose(starts, np.round(starts), atol=2e-3)
  lengths, starts = np.round(lengths), np.round(starts)
  assert np.all(starts >= 0) and np.all(starts + lengths <= np.asarray(spatial))
  # Some unrounded box with volume fraction in `scale` and ratios in `ratio` rounds to each box.
  volume = math.prod(spatial)
  assert np.all(np.prod(lengths - 0.5, 1) <= scale[1] * volume)
  assert np.all(np.prod(lengths + 0.5, 1) >= scale[0] * volume)
  assert np.all((lengths[:, 1:] + 0.5) / (lengths[:, :1] - 0.5) >= ratio[0])
  assert np.all((lengths[:, 1:] - 0.5) / (lengths[:, :1] + 0.5) <= ratio[1])
  # ... and the draws span the range rather than sitting at one value.
  frac = np.prod(lengths, 1) / volume
  assert frac.min() < scale[0] + 0.25 * (scale[1] - scale[0])
  assert frac.max() > scale[1] - 0.25 * (scale[1] - scale[0])


def test_crop_box_distribution_matches_torchvision_get_params():
  height, width, scale, ratio, n = 32, 20, (0.08, 1.0), (3 / 4, 4 / 3), 4000
  start, length = jax.jit(jax.vmap(lambda k: V.sample_crop_box(k, (height, width), scale=scale,
                                                               ratio=ratio)))(
                                                                   jax.random.split(KEY, n))
  ours = np.concatenate([np.asarray(start), np.asarray(length)], 1).astype(np.float64)
  rng = np.random.default_rng(0)
  ref = np.array([_tv_get_params(rng, height, width, scale, ratio) for _ in range(n)], np.float64)
  # (i, j, h, w): means agree within ~4 standard errors; rejection (not clamping) matters here,
  # as large boxes do not fit the 20-wide image.
  se = np.sqrt(ours.var(0) / n + ref.var(0) / n)
  assert np.all(np.abs(ours.mean(0) - ref.mean(0)) < 4 * se + 1e-9), (ours.mean(0), ref.mean(0))
  area_ours, area_ref = ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]
  for q in (0.1, 0.5, 0.9):
    assert abs(np.quantile(area_ours, q) - np.quantile(area_ref, q)) < 0.05 * height * width


@pytest.mark.parametrize("spatial,ratio", [((6, 8), (2.0, 2.0)), ((8, 6), (0.5, 0.5)),
                                           ((8, 6), (2.0, 3.0)), ((5, 5), (1.5, 1.5))])
def test_fallback_is_torchvision_central_crop(spatial, ratio):
  # scale (1, 1) with a ratio the image does not have: no candidate fits, so the fallback runs.
  start, length = V.sample_crop_box(KEY, spatial, scale=(1.0, 1.0), ratio=ratio)
  i, j, h, w = _tv_get_params(np.random.default_rng(0), *spatial, (1.0, 1.0), ratio)
  np.testing.assert_array_equal(start, [i, j])
  np.testing.assert_array_equal(length, [h, w])


def test_fallback_3d_is_centred_fits_and_respects_ratio():
  start, length = V.sample_crop_box(KEY, (4, 8, 6), scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3))
  np.testing.assert_array_equal(length, [4, 5, 5])
  np.testing.assert_array_equal(start, [0, 1, 0])


@pytest.mark.parametrize("spatial,start,length,size", [
    ((10, 12), (2, 3), (5, 7), (9, 4)),         # up along H, down along W
    ((7, 9, 8), (1, 0, 2), (4, 9, 5), (6, 5, 3)),
], ids=["2d", "3d"])
def test_resized_crop_matches_torch_interpolate(spatial, start, length, size):
  x = np.random.default_rng(1).normal(size=(*spatial, 2)).astype(np.float32)
  y = V.resized_crop(x, jnp.asarray(start), jnp.asarray(length), size=size)
  crop = x[tuple(slice(s, s + l) for s, l in zip(start, length))]
  mode = "bilinear" if len(spatial) == 2 else "trilinear"
  ref = torch.nn.functional.interpolate(torch.from_numpy(np.moveaxis(crop, -1, 0)[None].copy()),
                                        size=size, mode=mode, align_corners=False)
  np.testing.assert_allclose(y, np.moveaxis(ref[0].numpy(), 0, -1), atol=1e-5)


# ----------------------------------------------------------------------------- flips, augment


def test_flips_along_w_only_in_2d_and_every_axis_in_3d():
  # Full-image crops at the image size: only the flips act.
  def views(x):
    f = _jit(lambda k, x: V.multi_crop(k, x, global_size=x.shape[1:-1], local_size=2,
                                       num_global=4, num_local=0, global_scale=(1, 1),
                                       ratio=(1, 1)))
    g, l = f(KEY, x)
    assert l.shape == (0, *x.shape[:1], *(2,) * (x.ndim - 2), 1)  # num_local = 0: empty
    return np.asarray(g)

  x2 = jax.random.normal(KEY, (4, 6, 6, 1))
  g = views(x2)
  x2 = np.asarray(x2)
  seen = set()
  for v, b in itertools.product(range(4), range(4)):
    matches = [np.allclose(g[v, b], x2[b], atol=1e-5),
               np.allclose(g[v, b], x2[b, :, ::-1], atol=1e-5)]
    assert any(matches), "2D views must be the image or its W-flip"
    seen.add(matches.index(True))
  assert seen == {0, 1}
  x3 = np.asarray(jax.random.normal(KEY, (4, 4, 4, 4, 1)))
  g = views(x3)
  combos = set()
  for v, b in itertools.product(range(4), range(4)):
    found = [f for f in itertools.product([False, True], repeat=3)
             if np.allclose(g[v, b], x3[b][tuple(slice(None, None, -1 if fl else 1) for fl in f)],
                            atol=1e-5)]
    assert len(found) == 1
    combos.add(found[0])
  assert len(combos) >= 4 and any(f[0] for f in combos)  # D and other axes flipped too


def test_augment_runs_on_every_view_and_does_not_change_the_crops():
  x = jax.random.normal(KEY, (2, 12, 12, 1))
  crop = functools.partial(V.multi_crop, global_size=8, local_size=4, num_global=2, num_local=1)

  def run(k, x):
    return (crop(k, x), crop(k, x, augment=lambda k, v: (v + 1.0, None)),
            crop(k, x, augment=lambda k, v: v + jax.random.normal(k, ())))

  (g, l), (ga, la), (gr, _) = _jit(run)(KEY, x)
  np.testing.assert_allclose(ga, g + 1.0, atol=1e-6)
  np.testing.assert_allclose(la, l + 1.0, atol=1e-6)
  # Each view batch gets its own augment key: a random additive shift differs across views.
  shift = np.asarray(gr - g)[:, 0, 0, 0, 0]
  assert abs(shift[0] - shift[1]) > 1e-3


def test_two_views_with_augment_and_resizing_callable():
  x = jax.random.normal(KEY, (3, 10, 10, 1))
  aug = Augment(flip=True, noise_std=0.5, noise_p=1.0)  # Augment.batch returns (images, None)
  crop = functools.partial(V.random_resized_crop, size=6, scale=(0.2, 1.0))

  def run(k, x):
    ref = jnp.stack([aug.batch(kk, x)[0] for kk in jax.random.split(k)])
    return V.two_views(k, x, aug), ref, V.two_views(k, x, crop)

  v, ref, c = _jit(run)(jax.random.PRNGKey(2), x)
  assert v.shape == (2, 3, 10, 10, 1)
  np.testing.assert_allclose(v, ref, atol=1e-6)  # view i = augment(split(key)[i], x)
  assert not np.allclose(v[0], v[1])
  assert c.shape == (2, 3, 6, 6, 1) and not np.allclose(c[0], c[1])


# ----------------------------------------------------------------------------- config, errors


def test_multi_crop_from_config_matches_direct_call():
  cfg = ml_collections.ConfigDict(dict(num_global=2, num_local=3, global_size=[8, 8],
                                       local_size=4, global_scale=[0.3, 1.0],
                                       local_scale=[0.05, 0.3], flip=False))
  fn = V.multi_crop_from_config(cfg)
  direct = functools.partial(V.multi_crop, num_global=2, num_local=3, global_size=(8, 8),
                             local_size=4, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3),
                             flip=False)
  x = jax.random.normal(KEY, (2, 12, 12, 1))
  (g, l), (g2, l2) = _jit(lambda k, x: (fn(k, x), direct(k, x)))(KEY, x)
  assert g.shape == (2, 2, 8, 8, 1) and l.shape == (3, 2, 4, 4, 1)
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(l, l2)
  with pytest.raises(ValueError, match="unknown fields.*min_scale"):
    V.multi_crop_from_config({"global_size": 8, "local_size": 4, "min_scale": 0.1})
  with pytest.raises(ValueError, match="local_size"):
    V.multi_crop_from_config({"global_size": 8})
  with pytest.raises(ValueError, match="local_scale"):
    V.multi_crop_from_config({"global_size": 8, "local_size": 4, "local_scale": (0.2, 0.1)})
  with pytest.raises(ValueError, match="num_local"):
    V.multi_crop_from_config({"global_size": 8, "local_size": 4, "num_local": -1})


def test_bad_arguments_raise_value_error_naming_them():
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"size must have 2 entries.*\(4, 4, 4\)"):
    V.random_resized_crop(KEY, x, size=(4, 4, 4))
  with pytest.raises(ValueError, match="size entries must be positive"):
    V.random_resized_crop(KEY, x, size=(4, 0))
  for bad in [(0.0, 0.5), (0.5, 1.5), (0.6, 0.5)]:
    with pytest.raises(ValueError, match=r"scale must satisfy 0 < low <= high <= 1"):
      V.random_resized_crop(KEY, x, size=4, scale=bad)
  with pytest.raises(ValueError, match="ratio"):
    V.random_resized_crop(KEY, x, size=4, ratio=(0.0, 1.0))
  with pytest.raises(ValueError, match=r"image must be \(N, H, W, C\).*got shape \(8, 8\)"):
    V.random_resized_crop(KEY, jnp.zeros((8, 8)), size=4)
  with pytest.raises(ValueError, match=r"image must be .*got shape \(8, 8, 1\)"):
    V.multi_crop(KEY, jnp.zeros((8, 8, 1)), global_size=4, local_size=2)
  with pytest.raises(ValueError, match="global_size must have 2 entries"):
    V.multi_crop(KEY, x, global_size=(4, 4, 4), local_size=2)
  with pytest.raises(ValueError, match="local_scale"):
    V.multi_crop(KEY, x, global_size=4, local_size=2, local_scale=(0.0, 0.1))
  with pytest.raises(ValueError, match="num_global must be an int >= 1"):
    V.multi_crop(KEY, x, global_size=4, local_size=2, num_global=0)
  with pytest.raises(ValueError, match="augment must keep the view shape"):
    V.multi_crop(KEY, x, global_size=4, local_size=2, augment=lambda k, v: v[:, :2])
  with pytest.raises(TypeError, match="augment"):
    V.two_views(KEY, x, None)
  with pytest.raises(ValueError, match="spatial_shape"):
    V.sample_crop_box(KEY, (8,))
