import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext.local_shuffle import local_shuffle


def _cells(h, w, gh, gw):
  for y in range(0, h, gh):
    for x in range(0, w, gw):
      yield slice(y, min(y + gh, h)), slice(x, min(x + gw, w))


def _distinct_images(shape, seed=0):
  """Images whose values are all distinct, so that each output pixel names its source."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32))


_shuffle = jax.jit(local_shuffle, static_argnames=("grid", "prob"))
IMAGES = _distinct_images((3, 13, 10, 2))  # partial cells on both axes of a (4, 3) grid


def test_selected_cells_are_row_and_column_permutations_others_unchanged():
  gh, gw = 4, 3
  images = IMAGES
  out, selected = _shuffle(jax.random.PRNGKey(0), images, grid=(gh, gw), prob=0.6)
  images, out, selected = np.asarray(images), np.asarray(out), np.asarray(selected)
  assert out.shape == images.shape and out.dtype == images.dtype and selected.shape == (3, 13, 10)
  num_selected = 0
  for n in range(3):
    for ys, xs in _cells(13, 10, gh, gw):
      sel = selected[n, ys, xs]
      assert sel.all() or not sel.any()  # whole cells
      src, dst = images[n, ys, xs], out[n, ys, xs]
      if not sel.any():
        np.testing.assert_array_equal(dst, src)
        continue
      num_selected += 1
      # P g Q: out[i, j] = g[p(i), q(j)] with p, q permutations, the same in every channel.
      where = {v: divmod(k, src.shape[1]) for k, v in enumerate(src[..., 0].ravel())}
      rows = np.array([[where[v][0] for v in row] for row in dst[..., 0]])
      cols = np.array([[where[v][1] for v in row] for row in dst[..., 0]])
      p, q = rows[:, 0], cols[0, :]
      assert (rows == p[:, None]).all() and (cols == q[None, :]).all()
      assert sorted(p) == list(range(src.shape[0])) and sorted(q) == list(range(src.shape[1]))
      np.testing.assert_array_equal(dst, src[p][:, q])
      for c in range(2):  # multiset of each channel's cell values preserved
        np.testing.assert_array_equal(np.sort(dst[..., c], None), np.sort(src[..., c], None))
  assert 0 < num_selected < 3 * 4 * 4


def test_selected_fraction_matches_prob():
  images = jnp.zeros((8, 64, 64, 1))
  _, selected = _shuffle(jax.random.PRNGKey(1), images, grid=2, prob=0.3)
  assert abs(float(jnp.mean(selected)) - 0.3) < 0.02  # 8192 cells


def test_permutations_are_uniform():
  # Two-row cells: the row pair is swapped in half of the selected cells; one-column cells
  # (grid width 1) never move horizontally.
  images = _distinct_images((4, 64, 64, 1))
  out, selected = _shuffle(jax.random.PRNGKey(2), images, grid=(2, 1), prob=1.0)
  assert bool(selected.all())
  swapped = np.asarray(out[:, 0::2] != images[:, 0::2])
  assert abs(swapped.mean() - 0.5) < 0.03
  np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(images, axis=1))


def test_volume_cells_keep_their_values():
  images = _distinct_images((2, 5, 6, 7, 1))
  out, _ = _shuffle(jax.random.PRNGKey(3), images, grid=4, prob=1.0)
  cell = lambda x: np.sort(np.asarray(x[:, 4:, 4:, 4:]).reshape(2, -1), axis=1)
  np.testing.assert_array_equal(cell(out), cell(images))
  assert not np.array_equal(out, images)


def test_deterministic_per_key_and_jit_equals_eager():
  a, ma = local_shuffle(jax.random.PRNGKey(0), IMAGES, grid=(4, 3), prob=0.6)
  b, mb = _shuffle(jax.random.PRNGKey(0), IMAGES, grid=(4, 3), prob=0.6)
  c, _ = _shuffle(jax.random.PRNGKey(5), IMAGES, grid=(4, 3), prob=0.6)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ma, mb)
  assert not np.array_equal(a, c)


def test_bad_arguments():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"images must be \(N, \*spatial, C\)"):
    local_shuffle(key, jnp.ones((8, 8)))
  with pytest.raises(TypeError, match="images must be a floating array; got dtype int32"):
    local_shuffle(key, jnp.ones((1, 8, 8, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]; got 1.5"):
    local_shuffle(key, jnp.ones((1, 8, 8, 1)), prob=1.5)
  with pytest.raises(ValueError, match="grid must be"):
    local_shuffle(key, jnp.ones((1, 8, 8, 1)), grid=(2, 2, 2))
  with pytest.raises(ValueError, match="grid must be"):
    local_shuffle(key, jnp.ones((1, 8, 8, 1)), grid=0)
