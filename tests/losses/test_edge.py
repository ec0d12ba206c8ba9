"""Sobel gradient magnitude and the edge loss of ViT-AE++ (Eq. 2 of vit_ae_plus_plus)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxmed.losses import edge_loss, sobel_magnitude

RNG = np.random.default_rng(0)


def _scipy_sum_sq(x):
  """sum_a sobel_a(x)^2 per example and channel, float64, by scipy (zero padding)."""
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    for c in range(x.shape[-1]):
      v = x[n, ..., c]
      out[n, ..., c] = sum(ndimage.sobel(v, axis=a, mode="constant") ** 2 for a in range(v.ndim))
  return out


@pytest.mark.parametrize("shape", [(2, 6, 8, 1), (1, 7, 5, 3), (2, 5, 7, 9, 2), (1, 4, 4, 4, 1),
                                   (1, 3, 11, 6, 3)])
def test_exact_magnitude_equals_scipy_sobel(shape):
  x = RNG.normal(size=shape).astype(np.float32)
  got = sobel_magnitude(x, eps=0.0)
  assert got.shape == shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np.sqrt(_scipy_sum_sq(x)), rtol=1e-5, atol=1e-5)


def test_eps_is_added_under_the_root():
  x = RNG.normal(size=(2, 5, 7, 9, 2)).astype(np.float32)
  for eps in (1e-6, 0.5):
    np.testing.assert_allclose(sobel_magnitude(x, eps=eps), np.sqrt(_scipy_sum_sq(x) + eps),
                               rtol=1e-5, atol=1e-5)
  # A constant volume: the interior derivatives are exactly 0 (only the zero padding differs).
  const = np.full((1, 5, 5, 5, 1), 2.0, np.float32)
  assert np.all(np.asarray(sobel_magnitude(const, eps=0.0))[0, 1:-1, 1:-1, 1:-1] == 0)
  np.testing.assert_allclose(np.asarray(sobel_magnitude(const))[0, 1:-1, 1:-1, 1:-1],
                             np.sqrt(1e-6), rtol=1e-6)
  # Integer input is computed in float32.
  ints = RNG.integers(0, 9, size=(1, 4, 5, 2))
  np.testing.assert_allclose(sobel_magnitude(ints, eps=0.0), np.sqrt(_scipy_sum_sq(ints)),
                             rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_gradient_is_finite_on_constant_and_random_volumes(eps):
  target = RNG.normal(size=(2, 5, 6, 7, 2)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda p, t: edge_loss(p, t, eps=eps)))
  # All zeros: every g_a = 0, a stationary point of the magnitude (finite, zero gradient). A
  # constant 3 has edges only at the zero-padded border; random values everywhere.
  assert np.all(np.asarray(grad(np.zeros_like(target), target)) == 0.0)
  for pred in (np.full_like(target, 3.0), RNG.normal(size=target.shape).astype(np.float32)):
    g = np.asarray(grad(pred, target))
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
  # Constant prediction and target: a zero loss and a finite gradient.
  const = np.ones_like(target)
  assert float(edge_loss(const, const, eps=eps)) == 0.0
  assert np.all(np.isfinite(np.asarray(grad(const, const))))


def test_zero_for_identical_inputs_and_positive_otherwise():
  x = RNG.normal(size=(2, 6, 7, 3)).astype(np.float32)
  assert float(edge_loss(x, x)) == 0.0
  loss = edge_loss(x, 2 * x)
  assert loss.shape == () and loss.dtype == jnp.float32 and float(loss) > 0


def test_loss_is_the_mse_of_the_edge_maps_with_a_blurred_target():
  pred = RNG.normal(size=(2, 6, 7, 8, 2)).astype(np.float32)
  target = RNG.normal(size=pred.shape).astype(np.float32)
  by_hand = np.mean((np.sqrt(_scipy_sum_sq(pred) + 1e-6) - np.sqrt(_scipy_sum_sq(target) + 1e-6))
                    ** 2)
  np.testing.assert_allclose(edge_loss(pred, target), by_hand, rtol=1e-5)
  for sigma in (0.7, 1.67):
    blurred = np.stack([ndimage.gaussian_filter(target[n].astype(np.float64), sigma,
                                                axes=(0, 1, 2), mode="reflect")
                        for n in range(len(target))])
    by_hand = np.mean((np.sqrt(_scipy_sum_sq(pred)) - np.sqrt(_scipy_sum_sq(blurred))) ** 2)
    np.testing.assert_allclose(edge_loss(pred, blurred.astype(np.float32), eps=0.0), by_hand,
                               rtol=1e-5)


def test_no_gradient_flows_to_the_target():
  pred = RNG.normal(size=(1, 5, 6, 7, 1)).astype(np.float32)
  target = RNG.normal(size=pred.shape).astype(np.float32)
  g_pred, g_target = jax.grad(edge_loss, argnums=(0, 1))(pred, target)
  assert np.abs(np.asarray(g_pred)).sum() > 0
  assert np.all(np.asarray(g_target) == 0.0)


def test_validation_errors():
  x = np.zeros((1, 4, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match=r"sobel_magnitude: x must be \(N, H, W, C\) or .*\(4, 4\)"):
    sobel_magnitude(np.zeros((4, 4)))
  with pytest.raises(ValueError, match="sobel_magnitude: x must be real; got complex"):
    sobel_magnitude(x.astype(np.complex64))
  with pytest.raises(ValueError, match="sobel_magnitude: eps must be a finite float >= 0"):
    sobel_magnitude(x, eps=-1e-6)
  with pytest.raises(ValueError, match=r"edge_loss: pred must be .*\(1, 1, 4, 4, 4, 1\)"):
    edge_loss(x[None], x[None])
  with pytest.raises(ValueError, match=r"edge_loss: target shape \(1, 4, 4, 3, 1\) must equal "
                                       r"pred shape \(1, 4, 4, 4, 1\)"):
    edge_loss(x, x[..., :3, :])
  with pytest.raises(ValueError, match="edge_loss: target must be real; got complex"):
    edge_loss(x, x.astype(np.complex64))
  with pytest.raises(ValueError, match="edge_loss: eps must be a finite float >= 0"):
    edge_loss(x, x, eps=float("nan"))
  with pytest.raises(ValueError, match="edge_loss: pred must be a numeric array"):
    edge_loss(np.array([["a"]]), x)
