"""Poisson-disc context masks (SSFD Sec. 2.2): non-overlap, coverage, dart-throwing parity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext.context_mask import (MAX_COVERAGE, _dart_throw, context_inpaint,
                                         context_mask, poisson_disc_corners)

SIZES = [(64, 64), (128, 128), (80, 112)]


@functools.lru_cache(maxsize=None)
def _batched(h, w, patch, coverage, num_candidates=None):
  """Jitted corners of many images (vmapped over keys) for one static configuration."""
  fn = functools.partial(poisson_disc_corners, image_shape=(h, w), patch=patch,
                         coverage=coverage, num_candidates=num_candidates)
  return jax.jit(jax.vmap(lambda key: fn(key)))


def _draws(h, w, n, patch=16, coverage=0.25, seed=0, num_candidates=None):
  keys = jax.random.split(jax.random.key(seed), n)
  corners, valid = _batched(h, w, patch, coverage, num_candidates)(keys)
  return np.asarray(corners), np.asarray(valid)


def _k(h, w, patch=16, coverage=0.25):
  return int(np.floor(coverage * h * w / patch**2 + 0.5))


def _render(corners, valid, shape, patch):
  """Reference mask: paint each valid square (counting overlaps)."""
  out = np.zeros(shape, np.int32)
  for (r, c), v in zip(corners, valid):
    if v:
      out[r:r + patch, c:c + patch] += 1
  return out


def _reference_dart_throw(candidates, k, patch):
  accepted = []
  for cand in candidates:
    if len(accepted) == k:
      break
    if all(max(abs(cand[0] - a[0]), abs(cand[1] - a[1])) >= patch for a in accepted):
      accepted.append(tuple(int(v) for v in cand))
  return accepted


@pytest.mark.parametrize("h,w", SIZES)
def test_squares_inside_disjoint_and_cover_a_quarter(h, w):
  n, patch = 2000, 16
  corners, valid = _draws(h, w, n)
  k = _k(h, w)
  assert corners.shape == (n, k, 2) and corners.dtype == np.int32 and valid.shape == (n, k)
  # At 25% coverage every draw places all K squares (the docstring's rate).
  assert valid.all()
  assert corners.min() >= 0
  assert corners[..., 0].max() <= h - patch and corners[..., 1].max() <= w - patch
  # The whole range of top-left corners is used (uniform candidates, not a lattice).
  assert corners[..., 0].min() == 0 and corners[..., 0].max() == h - patch
  assert corners[..., 1].min() == 0 and corners[..., 1].max() == w - patch
  assert len(np.unique(corners[:, 0, 0] % patch)) == patch
  # Poisson-disc property: pairwise Chebyshev distance >= patch, i.e. disjoint squares.
  cheb = np.abs(corners[:, :, None, :] - corners[:, None, :, :]).max(-1)
  off_diag = ~np.eye(k, dtype=bool)
  assert cheb[:, off_diag].min() >= patch
  # ... and the minimum distance is attained (squares may touch), so the bound is tight.
  assert cheb[:, off_diag].min() == patch
  # Rendered: K * patch^2 pixels, no pixel twice, coverage 25% up to the rounding of K.
  painted = np.stack([_render(c, v, (h, w), patch) for c, v in zip(corners[:200], valid)])
  assert painted.max() == 1
  np.testing.assert_array_equal(painted.sum((1, 2)), k * patch**2)
  assert abs(painted.mean() - 0.25) <= patch**2 / (2 * h * w)


def test_mask_is_the_union_of_the_sampled_squares():
  key, shape, patch = jax.random.key(7), (5, 80, 112), 16
  mask = np.asarray(context_mask(key, shape, patch=patch))
  for n, sub in enumerate(jax.random.split(key, shape[0])):
    corners, valid = poisson_disc_corners(sub, shape[1:], patch=patch)
    painted = _render(np.asarray(corners), np.asarray(valid), shape[1:], patch)
    assert painted.max() == 1  # no pixel in two squares
    np.testing.assert_array_equal(mask[n], painted.astype(bool))


@pytest.mark.parametrize("k,patch,m", [(4, 16, 128), (9, 5, 60), (30, 3, 40)])
def test_dart_throwing_matches_a_sequential_reference(k, patch, m):
  rng = np.random.default_rng(k)
  candidates = rng.integers(0, 40, size=(m, 2)).astype(np.int32)
  corners, valid = _dart_throw(jnp.asarray(candidates), k, patch)
  corners, valid = np.asarray(corners), np.asarray(valid)
  expected = _reference_dart_throw(candidates, k, patch)
  assert valid.sum() == len(expected)
  # Accepted corners in acceptance order, then the empty (invalid) slots.
  np.testing.assert_array_equal(valid, np.arange(k) < len(expected))
  assert [tuple(c) for c in corners[valid]] == expected
  assert (corners[~valid] == 0).all()


def test_too_few_darts_leave_invalid_slots():
  # K darts for K squares: often some conflict, so some slots stay empty.
  h = w = 64
  k = _k(h, w, coverage=0.4)
  corners, valid = _draws(h, w, 500, coverage=0.4, num_candidates=k)
  counts = valid.sum(1)
  assert counts.min() >= 1 and counts.min() < k and counts.max() == k
  np.testing.assert_array_equal(valid, np.arange(k)[None] < counts[:, None])  # a prefix
  for c, v in zip(corners[:50], valid):
    painted = _render(c, v, (h, w), 16)
    assert painted.max() == 1 and painted.sum() == v.sum() * 256


def test_determinism_keys_jit_and_vmap():
  key = jax.random.key(7)
  a = poisson_disc_corners(key, (128, 128))
  b = poisson_disc_corners(key, (128, 128))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  c = poisson_disc_corners(jax.random.key(8), (128, 128))
  assert not np.array_equal(a[0], c[0])
  # vmap over keys (as in _draws) == one call per key.
  keys = jax.random.split(jax.random.key(0), 3)
  batched, _ = _batched(128, 128, 16, 0.25)(keys)
  for i in range(3):
    np.testing.assert_array_equal(batched[i], poisson_disc_corners(keys[i], (128, 128))[0])
  # Masks: per-image independent, deterministic, jit == eager, vmap over a batch of keys.
  shape = (5, 80, 112)
  m1 = context_mask(key, shape)
  np.testing.assert_array_equal(m1, context_mask(key, shape))
  np.testing.assert_array_equal(m1, jax.jit(lambda k: context_mask(k, shape))(key))
  assert len({np.asarray(m).tobytes() for m in m1}) == shape[0]
  assert not np.array_equal(m1, context_mask(jax.random.key(8), shape))
  stacked = jax.vmap(lambda k: context_mask(k, shape))(jnp.stack([key, jax.random.key(8)]))
  np.testing.assert_array_equal(stacked[0], m1)
  np.testing.assert_array_equal(stacked[1], context_mask(jax.random.key(8), shape))


def test_context_inpaint_fills_the_mask_in_every_channel():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(5, 80, 112, 2)).astype(np.float32)) + 5.0
  key = jax.random.key(4)
  corrupted, mask = context_inpaint(key, images)
  np.testing.assert_array_equal(mask, context_mask(key, (5, 80, 112)))
  mask = np.asarray(mask)
  assert corrupted.shape == images.shape and corrupted.dtype == images.dtype
  assert (np.asarray(corrupted)[mask] == 0).all()
  np.testing.assert_array_equal(np.asarray(corrupted)[~mask], np.asarray(images)[~mask])
  filled, _ = jax.jit(functools.partial(context_inpaint, fill=-1.5))(key, images)
  assert (np.asarray(filled)[mask] == -1.5).all()
  half, _ = context_inpaint(key, images.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16


def test_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="patch must be >= 1"):
    poisson_disc_corners(key, (64, 64), patch=0)
  with pytest.raises(ValueError, match=r"patch=65 must fit in the image.*\(64, 80\)"):
    poisson_disc_corners(key, (64, 80), patch=65)
  with pytest.raises(TypeError, match="patch must be an int"):
    poisson_disc_corners(key, (64, 64), patch=16.0)
  for coverage in (0.0, -0.1, MAX_COVERAGE + 0.05, 0.5):
    with pytest.raises(ValueError, match=r"coverage must be in \(0, 0.4\]"):
      poisson_disc_corners(key, (64, 64), coverage=coverage)
  with pytest.raises(ValueError, match=r"K = round\(coverage \* H \* W / patch\*\*2\) = 0"):
    poisson_disc_corners(key, (16, 16), coverage=0.25)
  with pytest.raises(ValueError, match="num_candidates must be an int >= K = 4"):
    poisson_disc_corners(key, (64, 64), num_candidates=3)
  with pytest.raises(ValueError, match=r"image_shape must be \(H, W\)"):
    poisson_disc_corners(key, (64, 64, 64))
  with pytest.raises(ValueError, match=r"shape must be \(N, H, W\)"):
    context_mask(key, (64, 64))
  with pytest.raises(ValueError, match="N >= 1"):
    context_mask(key, (0, 64, 64))
  with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\); got shape \(2, 64, 64\)"):
    context_inpaint(key, jnp.zeros((2, 64, 64)))
  with pytest.raises(TypeError, match="images must be floating point; got dtype int32"):
    context_inpaint(key, jnp.zeros((2, 64, 64, 1), jnp.int32))
