import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext import grid_cell_mask, grid_inpaint


def test_masked_cells_are_whole_cells_and_zero_in_every_channel():
  images = jnp.ones((3, 20, 24, 2))
  out, keep = grid_inpaint(jax.random.PRNGKey(0), images, grid=4, keep_prob=0.5)
  keep = np.asarray(keep)
  cells = keep.reshape(3, 5, 4, 6, 4).transpose(0, 1, 3, 2, 4).reshape(3, 5, 6, 16)
  assert np.all(cells.all(-1) | ~cells.any(-1))  # each cell fully kept or fully masked
  np.testing.assert_array_equal(np.asarray(out), np.where(keep[..., None], 1.0, 0.0) * np.ones(2))


@pytest.mark.parametrize("keep_prob", [0.0, 0.25, 0.75, 1.0])
def test_masked_fraction_matches_keep_prob(keep_prob):
  keep = grid_cell_mask(jax.random.PRNGKey(1), (64, 64, 64), grid=8, keep_prob=keep_prob)
  assert abs(float(jnp.mean(keep)) - keep_prob) < 0.02


def test_partial_cells_odd_shapes_and_per_axis_grid():
  keep = grid_cell_mask(jax.random.PRNGKey(2), (2, 13, 7), grid=(5, 3), keep_prob=0.5)
  assert keep.shape == (2, 13, 7)
  k = np.asarray(keep)
  np.testing.assert_array_equal(k[:, 10:13, 0:3], np.broadcast_to(k[:, 10:11, 0:1], (2, 3, 3)))


def test_deterministic_per_key_and_jittable():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 1))
  f = jax.jit(lambda k, x: grid_inpaint(k, x, grid=4, keep_prob=0.5))
  a, _ = f(jax.random.PRNGKey(3), x)
  b, _ = f(jax.random.PRNGKey(3), x)
  c, _ = f(jax.random.PRNGKey(4), x)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_bad_arguments():
  with pytest.raises(ValueError, match="keep_prob"):
    grid_cell_mask(jax.random.PRNGKey(0), (1, 8, 8), grid=2, keep_prob=1.5)
  with pytest.raises(ValueError, match="grid"):
    grid_cell_mask(jax.random.PRNGKey(0), (1, 8, 8), grid=(2, 2, 2), keep_prob=0.5)
  with pytest.raises(ValueError, match="images"):
    grid_inpaint(jax.random.PRNGKey(0), jnp.ones((8, 8)), grid=2)
