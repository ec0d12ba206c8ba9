import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import comb

from jaxmed.pretext.intensity import bezier_curve, bezier_intensity

V = np.linspace(0.0, 1.0, 501, dtype=np.float32)


def _bernstein(v, points):
  """Cubic Bezier from its definition, sum_k C(3, k) v^k (1 - v)^(3 - k) p_k, in float64."""
  v = np.asarray(v, np.float64)[..., None]
  k = np.arange(4)
  return np.sum(comb(3, k) * v ** k * (1 - v) ** (3 - k) * np.asarray(points, np.float64), -1)


def test_curve_equals_bernstein_form_and_hits_end_points():
  points = np.random.default_rng(0).uniform(size=(20, 1, 4)).astype(np.float32)
  out = np.asarray(bezier_curve(V, points))
  assert out.shape == (20, V.size)
  np.testing.assert_allclose(out, _bernstein(V, points), atol=1e-6)
  np.testing.assert_allclose(out[:, 0], points[:, 0, 0], atol=1e-7)   # B(0) = p0
  np.testing.assert_allclose(out[:, -1], points[:, 0, 3], atol=1e-7)  # B(1) = p3


def test_curve_is_monotone_for_random_control_points():
  p12 = np.random.default_rng(1).uniform(size=(2000, 2)).astype(np.float32)
  up = np.concatenate([np.zeros((2000, 1)), p12, np.ones((2000, 1))], -1)[:, None]
  down = up[..., ::-1].copy()
  assert (np.diff(np.asarray(bezier_curve(V, up)), axis=-1) >= -1e-6).all()
  assert (np.diff(np.asarray(bezier_curve(V, down)), axis=-1) <= 1e-6).all()


def _images():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 9, 7, 3)).astype(np.float32) * rng.uniform(0.5, 4, (6, 1, 1, 3)) + 2
  x[1, ..., 2] = 0.7  # a constant channel
  return jnp.asarray(x)


def test_each_channel_is_mapped_through_its_image_curve_within_its_range():
  x = _images()
  out, points = jax.jit(bezier_intensity)(jax.random.PRNGKey(0), x)
  x, out, points = np.asarray(x), np.asarray(out), np.asarray(points)
  assert out.shape == x.shape and out.dtype == np.float32 and points.shape == (6, 4)
  np.testing.assert_array_equal(points[:, [0, 3]], np.tile([0.0, 1.0], (6, 1)))
  assert ((points[:, 1:3] >= 0) & (points[:, 1:3] <= 1)).all() and np.ptp(points[:, 1]) > 0
  lo, hi = x.min((1, 2), keepdims=True), x.max((1, 2), keepdims=True)
  span = np.where(hi > lo, hi - lo, 1)
  expected = lo + _bernstein((x - lo) / span, points[:, None, None, None]) * (hi - lo)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert (out >= lo).all() and (out <= hi).all()
  np.testing.assert_array_equal(out[1, ..., 2], x[1, ..., 2])
  for n in range(6):  # monotone: the order of the pixels' values is kept
    for c in range(3):
      order = np.argsort(x[n, ..., c], axis=None)
      assert (np.diff(out[n, ..., c].ravel()[order]) >= -1e-6).all()


def test_inverted_curves_reverse_the_order_and_follow_invert_prob():
  x = _images()
  out, points = bezier_intensity(jax.random.PRNGKey(1), x, invert_prob=1.0)
  np.testing.assert_array_equal(points[:, [0, 3]], np.tile([1.0, 0.0], (6, 1)))
  x, out = np.asarray(x), np.asarray(out)
  order = np.argsort(x[0, ..., 0], axis=None)
  assert (np.diff(out[0, ..., 0].ravel()[order]) <= 1e-6).all()
  np.testing.assert_allclose(out.max((1, 2)), x.max((1, 2)), atol=1e-6)  # min -> max
  small = jnp.ones((4000, 2, 2, 1))
  _, points = bezier_intensity(jax.random.PRNGKey(2), small, invert_prob=0.3)
  assert abs(float(jnp.mean(points[:, 0])) - 0.3) < 0.03


def test_deterministic_per_key_jit_equals_eager_and_dtype_kept():
  x = _images()
  a, pa = bezier_intensity(jax.random.PRNGKey(3), x)
  b, pb = jax.jit(bezier_intensity)(jax.random.PRNGKey(3), x)
  c, _ = bezier_intensity(jax.random.PRNGKey(4), x)
  np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(pa, pb)
  assert not np.allclose(a, c)
  half, _ = bezier_intensity(jax.random.PRNGKey(3), x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16


def test_bad_arguments():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"points must be \(\.\.\., 4\).*got shape \(3,\)"):
    bezier_curve(V, np.zeros(3))
  with pytest.raises(ValueError, match=r"invert_prob must be in \[0, 1\]; got -0.1"):
    bezier_intensity(key, jnp.ones((1, 4, 4, 1)), invert_prob=-0.1)
  with pytest.raises(ValueError, match=r"images must be \(N, \*spatial, C\)"):
    bezier_intensity(key, jnp.ones((4, 4)))
  with pytest.raises(TypeError, match="images must be a floating array; got dtype uint8"):
    bezier_intensity(key, jnp.ones((1, 4, 4, 1), jnp.uint8))
