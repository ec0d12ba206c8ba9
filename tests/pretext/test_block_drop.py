"""Block dropping of the Swin-UNETR SSL in-painting (``patch_rand_drop`` / ``aug_rand``): the
dropped amount against a NumPy transcription, the box sides, the [0, 1]-scaled noise, pasted
partners, untouched voxels outside the boxes, argument checks."""

import functools

import jax
import numpy as np
import pytest

from helpers import OPTIMIZED

from jaxmed.pretext.block_drop import block_sides, drop_blocks, random_block_drop

SHAPE = (24, 24, 24)


def numpy_patch_rand_drop(rng, shape, max_drop=0.3, max_block=0.25, tolerance=0.05):
  """research-contributions ``SwinUNETR/Pretrain/utils/ops.py`` ``patch_rand_drop``, its mask."""
  n_drop = rng.uniform(0, max_drop) * np.prod(shape)
  tol = [int(tolerance * s) for s in shape]
  mx = [int(max_block * s) for s in shape]
  mask, total = np.zeros(shape, bool), 0
  while total < n_drop:
    start = [rng.integers(0, s - t) for s, t in zip(shape, tol)]
    end = [min(rng.integers(t, m) + r, s) for r, t, m, s in zip(start, tol, mx, shape)]
    mask[tuple(slice(r, e) for r, e in zip(start, end))] = True
    total += np.prod([e - r for r, e in zip(start, end)])
  return mask


@functools.lru_cache(maxsize=None)
def _drop_fn(**kwargs):
  return jax.jit(lambda key, x, r: drop_blocks(key, x, r, **kwargs),
                 compiler_options=OPTIMIZED)


def test_dropped_fraction_matches_the_reference_loop():
  n = 256
  images = np.zeros((n, *SHAPE, 1), np.float32)
  out, mask = jax.jit(drop_blocks, compiler_options=OPTIMIZED)(jax.random.PRNGKey(0), images)
  frac = np.asarray(mask).mean(axis=(1, 2, 3))
  rng = np.random.default_rng(0)
  ref = np.array([numpy_patch_rand_drop(rng, SHAPE).mean() for _ in range(n)])
  se = np.sqrt(frac.var() / n + ref.var() / n)
  assert abs(frac.mean() - ref.mean()) < 4 * se, (frac.mean(), ref.mean())
  assert abs(frac.std() - ref.std()) < 0.2 * ref.std()
  assert frac.max() <= 0.3 + 0.1 and ref.mean() > 0.05  # up to 30% (+ the last box)
  # Noise in [0, 1] inside the boxes, the image untouched outside.
  out = np.asarray(out)[..., 0]
  assert out[np.asarray(mask)].min() >= 0.0 and out[np.asarray(mask)].max() <= 1.0
  np.testing.assert_array_equal(out[~np.asarray(mask)], 0.0)


def test_one_box_has_the_reference_sides_and_noise_scaled_to_0_1():
  """A tiny max_drop stops after one box: a box whose sides lie in [int(0.05 s), int(0.25 s))
  (clipped at the far edge), filled with noise whose min is 0 and max 1."""
  images = np.full((32, 40, 40, 40, 2), 5.0, np.float32)
  out, mask = _drop_fn(max_drop=1e-9)(jax.random.PRNGKey(1), images, None)
  out, mask = np.asarray(out), np.asarray(mask)
  tol, mx = block_sides((40, 40, 40))
  assert tol == (2, 2, 2) and mx == (10, 10, 10)
  for i in range(32):
    idx = np.nonzero(mask[i])
    lo, hi = [min(a) for a in idx], [max(a) + 1 for a in idx]
    assert mask[i].sum() == np.prod(np.subtract(hi, lo))  # one box
    for a in range(3):
      assert hi[a] - lo[a] < 10 and (hi[a] - lo[a] >= 2 or hi[a] == 40), (i, lo, hi)
    block = out[i][mask[i]]
    np.testing.assert_allclose([block.min(), block.max()], [0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out[i][~mask[i]], 5.0)


def test_pasted_boxes_hold_the_replacement():
  rng = np.random.default_rng(2)
  images = rng.normal(size=(4, *SHAPE, 1)).astype(np.float32)
  other = rng.normal(size=(4, *SHAPE, 1)).astype(np.float32)
  out, mask = _drop_fn()(jax.random.PRNGKey(2), images, other)
  out, mask = np.asarray(out), np.asarray(mask)[..., None]
  assert mask.any()
  np.testing.assert_array_equal(np.where(mask, out, 0), np.where(mask, other, 0))
  np.testing.assert_array_equal(np.where(mask, 0, out), np.where(mask, 0, images))


def test_aug_rand_pastes_other_samples_after_the_noise():
  """Sample i is constant 10 + i: inside its boxes a voxel is [0, 1] noise or another sample's
  value, never its own; outside it is its own. Every sample whose partner is another one (about
  7 of 8) shows pasted voxels."""
  n = 8
  images = np.broadcast_to(10.0 + np.arange(n, dtype=np.float32)[:, None, None, None, None],
                           (n, *SHAPE, 1)).copy()
  fn = jax.jit(random_block_drop, compiler_options=OPTIMIZED)
  out, mask = fn(jax.random.PRNGKey(4), images)
  out, mask = np.asarray(out)[..., 0], np.asarray(mask)
  pasted = 0
  for i in range(n):
    inside = out[i][mask[i]]
    others = np.isin(inside, 10.0 + np.delete(np.arange(n), i))
    assert np.all(others | ((inside >= 0) & (inside <= 1))), i
    np.testing.assert_array_equal(out[i][~mask[i]], 10.0 + i)
    pasted += bool(others.any())
  assert pasted >= n // 2
  again, _ = fn(jax.random.PRNGKey(4), images)
  np.testing.assert_array_equal(out, np.asarray(again)[..., 0])


@pytest.mark.parametrize("kwargs, match, error", [
    (dict(max_drop=1.5), "max_drop", ValueError),
    (dict(max_block=0.04), "max_block", ValueError),   # int(0.04 * 24) = 0 = int(0.05 * 24)
    (dict(tolerance=-0.1), "tolerance", ValueError),
    (dict(replacement=np.zeros((2, 24, 24, 24, 1), np.float32)), "replacement", ValueError),
    (dict(images=np.zeros((2, 24, 24, 24, 1), np.int32)), "images", TypeError),
    (dict(images=np.zeros((24, 24), np.float32)), "images", ValueError),
])
def test_bad_arguments_are_named(kwargs, match, error):
  args = {"images": np.zeros((4, *SHAPE, 1), np.float32), **kwargs}
  with pytest.raises(error, match=match):
    drop_blocks(jax.random.PRNGKey(0), **args)
