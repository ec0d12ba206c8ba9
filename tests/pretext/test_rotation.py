"""Rotation prediction views (Swin-UNETR SSL ``rot_rand``): np.rot90 per sample, the reference's
plane through jaxmed's (z, y, x) layout, labels, argument checks."""

import jax
import numpy as np
import pytest
import torch

from jaxmed.pretext.rotation import random_rotation90, rotate90

X = np.random.default_rng(0).normal(size=(64, 4, 4, 3, 2)).astype(np.float32)  # D = H = 4


@pytest.mark.parametrize("axes", [(1, 0), (0, 1)])
def test_each_sample_is_np_rot90_by_its_label(axes):
  out, k = jax.jit(lambda key, x: random_rotation90(key, x, axes=axes))(jax.random.PRNGKey(3), X)
  k = np.asarray(k)
  assert k.dtype == np.int32 and k.shape == (64,)
  assert set(k.tolist()) == {0, 1, 2, 3}  # 64 draws: every class (p of a miss ~ 4 (3/4)^64)
  for i in range(64):
    np.testing.assert_array_equal(out[i], np.rot90(X[i], k[i], axes=axes), err_msg=str(i))
  again, k_again = random_rotation90(jax.random.PRNGKey(3), X, axes=axes)
  np.testing.assert_array_equal(k, k_again)
  np.testing.assert_array_equal(out, again)


def test_default_plane_is_the_references_y_z_plane_of_z_y_x_volumes():
  """research-contributions ``rot_rand``: ``x.rot90(k, (2, 3))`` on a ``(C, x, y, z)`` sample;
  the same volume stored (z, y, x, C), as jaxmed reads NIfTI, rotates with the default axes."""
  rng = np.random.default_rng(1)
  sample = torch.tensor(rng.normal(size=(2, 3, 5, 5)).astype(np.float32))  # (C, x, y, z)
  to_zyx = lambda t: np.transpose(t.numpy(), (3, 2, 1, 0))
  volumes = np.stack([to_zyx(sample)] * 4)
  out = rotate90(volumes, np.arange(4))
  for k in range(4):
    np.testing.assert_array_equal(out[k], to_zyx(sample.rot90(k, (2, 3))), err_msg=str(k))


def test_labels_are_taken_modulo_four():
  k = np.array([-1, 4, 5, 2] * 16)
  np.testing.assert_array_equal(rotate90(X, k), rotate90(X, k % 4))


@pytest.mark.parametrize("kwargs, match", [
    (dict(axes=(0, 2)), "square"),       # D = 4, W = 3
    (dict(axes=(1, 1)), "distinct"),
    (dict(axes=(0, 3)), "distinct"),
    (dict(axes="ab"), "axes"),
])
def test_bad_axes_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    random_rotation90(jax.random.PRNGKey(0), X, **kwargs)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="k must have shape"):
    rotate90(X, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="images"):
    rotate90(X[0, ..., 0], np.zeros(1, np.int32))
