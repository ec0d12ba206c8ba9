"""Edge losses through a Sobel gradient magnitude: the edge loss of ViT-AE++ (Eq. 2 of
vit_ae_plus_plus).

    edge = sobel_magnitude(volume)                          # (N, D, H, W, C), per channel
    loss = edge_loss(pred, target)                          # MSE of the two edge maps

Pure JAX (no flax). The Sobel derivative along a spatial axis is the separable kernel
[-1, 0, 1] along that axis times the smoothing [1, 2, 1] along every other spatial axis, with
zero padding: per channel it equals ``scipy.ndimage.sobel(x, axis=a, mode="constant")``. It is
written as shifted adds of zero-padded arrays (8 one-dimensional passes in 3D, prefixes shared
between the axes), which on a 2-core CPU measured ~15x faster than the same separable passes as
1D convolutions and ~100x faster than one depthwise 3x3x3 convolution (XLA:CPU's slow spot),
forward and gradient, at (2, 64, 64, 64, 4).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jaxmed.losses import _checks


_LAYOUT = "(N, H, W, C) or (N, D, H, W, C)"


def _check_array(fn: str, name: str, x) -> jax.Array:
  """``x`` as an array of rank 4 or 5 with a real (or bool) dtype."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    try:
      x = np.asarray(x)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{fn}: {name} must be a numeric array; got {type(x).__name__}") from e
  dtype = np.dtype(x.dtype)
  if not (jnp.issubdtype(dtype, jnp.number) or dtype == np.bool_):
    raise ValueError(f"{fn}: {name} must be a numeric array; got dtype {dtype}")
  _checks.real(fn, name, x)
  if len(x.shape) not in (4, 5):
    raise ValueError(f"{fn}: {name} must be {_LAYOUT}; got shape {tuple(x.shape)}")
  return x


def _compute_dtype(dtype):
  """float32 at least (float64 stays float64 when x64 is on)."""
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.float32


def _shift_pass(x: jax.Array, axis: int, derivative: bool) -> jax.Array:
  """Correlation with [-1, 0, 1] (``derivative``) or [1, 2, 1] along ``axis``, zero padding."""
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  padded = jnp.pad(x, pad)
  before = lax.slice_in_dim(padded, 0, n, axis=axis)       # x[i - 1]
  after = lax.slice_in_dim(padded, 2, n + 2, axis=axis)    # x[i + 1]
  return after - before if derivative else before + 2 * x + after


def _sum_sq_gradients(x: jax.Array) -> jax.Array:
  """``sum_a g_a^2`` over the spatial axes (1 .. ndim - 2) of a channels-last batch."""
  spatial = range(1, x.ndim - 1)
  cache = {(): x}  # passes applied so far -> result; axes share their smoothing prefixes
  total = None
  for a in spatial:
    passes = tuple((b, False) for b in reversed(spatial) if b != a) + ((a, True),)
    for i in range(1, len(passes) + 1):
      if passes[:i] not in cache:
        cache[passes[:i]] = _shift_pass(cache[passes[:i - 1]], *passes[i - 1])
    sq = jnp.square(cache[passes])
    total = sq if total is None else total + sq
  return total


def _safe_sqrt(s: jax.Array) -> jax.Array:
  """``sqrt(s)`` for ``s >= 0`` whose gradient at 0 is 0 (not inf -> NaN): the double where."""
  positive = s > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("eps",))
def _sobel_magnitude(x: jax.Array, eps: float) -> jax.Array:
  s = _sum_sq_gradients(x.astype(_compute_dtype(x.dtype)))
  return jnp.sqrt(s + eps) if eps > 0 else _safe_sqrt(s)


def sobel_magnitude(x, *, eps: float = 1e-6) -> jax.Array:
  """Sobel gradient magnitude per channel of a 2D or 3D batch (the edge map of ViT-AE++ Eq. 2).

  For every spatial axis ``a`` the Sobel derivative ``g_a`` is the correlation with [-1, 0, 1]
  along ``a`` and the smoothing [1, 2, 1] along every other spatial axis, zero padding (per
  channel ``scipy.ndimage.sobel(x, axis=a, mode="constant")``; ViT-AE++'s 3x3x3 kernels up to
  their sign); the result is ``sqrt(sum_a g_a^2 + eps)``, accumulated in float32 (float64 input
  with x64 enabled stays float64).

  Why ``eps``: the gradient of ``sqrt`` at 0 is infinite, and ``g_a = 0`` wherever the input is
  locally constant (background, any constant volume), so without it the chain rule gives
  ``0 * inf = NaN`` and poisons a training step. With ``eps > 0`` the derivative
  ``g_a / sqrt(sum g^2 + eps)`` is finite everywhere (at most ``1 / (2 sqrt(eps))`` per unit of
  ``g^2``). ``eps = 0`` gives the exact magnitude through a safe square root whose gradient at 0
  is 0 (the ``jnp.where`` double-where trick), also finite.

  Args:
    x: ``(N, H, W, C)`` images or ``(N, D, H, W, C)`` volumes, real.
    eps: ``>= 0``, added under the square root; static (a new value recompiles).

  Returns:
    The magnitude, same shape as ``x``, float32 (at least).
  """
  fn = "sobel_magnitude"
  x = _check_array(fn, "x", x)
  eps = _checks.number(fn, "eps", eps)
  return _sobel_magnitude(x, eps)


@functools.partial(jax.jit, static_argnames=("eps",))
def _edge_loss(pred: jax.Array, target: jax.Array, eps: float) -> jax.Array:
  target = jax.lax.stop_gradient(target).astype(_compute_dtype(target.dtype))
  diff = _sobel_magnitude(pred, eps) - _sobel_magnitude(target, eps)
  return jnp.mean(jnp.square(diff)).astype(jnp.float32)


def edge_loss(pred, target, *, eps: float = 1e-6) -> jax.Array:
  """Edge loss, Eq. 2 of vit_ae_plus_plus: the MSE of the Sobel edge maps.

      L_edge = mean over (N, *spatial, C) of (sobel_magnitude(pred) - sobel_magnitude(target))^2

  The reference code blurs its target first (an 11-tap kernel of effective sigma ~1.67 voxels);
  the paper does not. Blur ``target`` before the call for the code's form (ViT-AE++'s
  ``loss.edge_blur_sigma`` does, with `jaxmed.data.transforms.gaussian_smooth`). No gradient
  flows to the target (``stop_gradient``). The paper's ``||.||_2`` is read as the reference
  code's MSE. The magnitude is compared per channel (modality); the reference code sums the
  modalities' magnitudes into one map before the MSE.

  Args:
    pred: ``(N, H, W, C)`` or ``(N, D, H, W, C)`` reconstruction, real (e.g. the unpatchified
      prediction of every patch).
    target: the ground truth (optionally blurred), same shape.
    eps: ``>= 0``, see `sobel_magnitude`; static.

  Returns:
    float32 scalar.
  """
  fn = "edge_loss"
  pred = _check_array(fn, "pred", pred)
  target = _check_array(fn, "target", target)
  if tuple(target.shape) != tuple(pred.shape):
    raise ValueError(f"{fn}: target shape {tuple(target.shape)} must equal pred shape "
                     f"{tuple(pred.shape)}")
  eps = _checks.number(fn, "eps", eps)
  return _edge_loss(pred, target, eps)
