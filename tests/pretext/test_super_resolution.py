import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.pretext.super_resolution import grid_super_resolution


def _reference(images, gh, gw):
  """Eq. 10 cell by cell: each (possibly partial) cell takes its value at (h // 2, w // 2)."""
  out = np.empty_like(images)
  _, h, w, _ = images.shape
  for y in range(0, h, gh):
    for x in range(0, w, gw):
      cell = images[:, y:y + gh, x:x + gw]
      out[:, y:y + gh, x:x + gw] = cell[:, cell.shape[1] // 2, cell.shape[2] // 2][:, None, None]
  return out


IMAGES = np.random.default_rng(0).normal(size=(2, 13, 10, 3)).astype(np.float32)


@pytest.mark.parametrize("grid", [(4, 3), 5, 1, 16])
def test_cells_take_their_centre_value_partial_cells_included(grid):
  gh, gw = (grid, grid) if isinstance(grid, int) else grid
  out = grid_super_resolution(jnp.asarray(IMAGES), grid=grid)
  assert out.shape == IMAGES.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, _reference(IMAGES, gh, gw))


def test_identity_for_unit_cells_constant_for_one_cell_and_idempotent():
  x = jnp.asarray(IMAGES)
  np.testing.assert_array_equal(grid_super_resolution(x, grid=1), x)
  whole = np.asarray(grid_super_resolution(x, grid=(13, 10)))
  np.testing.assert_array_equal(whole, np.broadcast_to(IMAGES[:, 6:7, 5:6], IMAGES.shape))
  once = grid_super_resolution(x, grid=(4, 3))
  np.testing.assert_array_equal(grid_super_resolution(once, grid=(4, 3)), once)


def test_volumes_and_jit_equals_eager():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 6, 7, 2)).astype(np.float32))
  eager = grid_super_resolution(x, grid=(2, 4, 3))
  np.testing.assert_array_equal(jax.jit(grid_super_resolution, static_argnames="grid")(
      x, grid=(2, 4, 3)), eager)
  np.testing.assert_array_equal(eager[0, 4, 4:, 3:6, :], np.broadcast_to(x[0, 4, 5, 4], (2, 3, 2)))


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"images must be \(N, \*spatial, C\); got shape \(8, 8\)"):
    grid_super_resolution(jnp.ones((8, 8)))
  with pytest.raises(TypeError, match="images must be a floating array"):
    grid_super_resolution(jnp.ones((1, 8, 8, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"grid must be .* got \(2, 2, 2\)"):
    grid_super_resolution(jnp.ones((1, 8, 8, 1)), grid=(2, 2, 2))
  with pytest.raises(ValueError, match="grid must be"):
    grid_super_resolution(jnp.ones((1, 8, 8, 1)), grid=-1)
