"""DAE's disruptions: additive noise (Eq. 1), down- then up-sampling (Eq. 2), local masking.

Disruptive Autoencoders (Valanarasu et al., Sec. 2; Appendix G for the strengths): a volume is
disrupted by noise and resampling in image space, tokenised, and a random subset of the
embedding channels is zeroed ("local masking"); the network reconstructs the clean volume.
Images are ``(N, H, W, C)``, volumes ``(N, D, H, W, C)``; every function is pure, keeps static
shapes and validates its arguments before tracing.

The paper's "all" (and the reference code's ``--choice all``) composes, in this order::

  k_img, k_mask = jax.random.split(key)
  x_in = disrupt(k_img, x, kind="noise+downsample")           # noise -> down -> up
  emb = patch_embedding(x_in)                                  # inside the network
  emb = apply_channel_mask(emb, local_channel_mask(k_mask, n, emb.shape[-1], shared=True))

The image-space part is :func:`disrupt`; the masking belongs to the network (it needs the
patch embedding), which calls :func:`local_channel_mask` and :func:`apply_channel_mask`. In the
reference Swin-UNETR the masked embedding also feeds the encoder2 skip, while encoder1 (the
full-resolution conv skip) sees the unmasked disrupted image. The target is always the clean
``x``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.pretext._grid import check_prob, concrete_values

KINDS = ("none", "noise", "downsample", "noise+downsample")
RESAMPLE_METHODS = ("linear", "nearest", "nearest-exact")


def _check_x(x, fn: str, name: str = "x") -> tuple[int, ...]:
  """Raises unless ``x`` is a floating ``(N, H, W, C)`` or ``(N, D, H, W, C)`` array."""
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) not in (4, 5) or min(shape) < 1:
    raise ValueError(f"{fn}: {name} must be a non-empty image batch (N, H, W, C) or volume "
                     f"batch (N, D, H, W, C); got shape {None if shape is None else tuple(shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{fn}: {name} must be a floating array; got dtype {x.dtype}")
  return tuple(shape)


def _check_count(name: str, value, fn: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{fn}: {name} must be an int >= 1; got {name}={value!r}")
  return int(value)


def _check_variance(value, name: str, fn: str) -> float:
  value = float(value)
  if not (value >= 0 and math.isfinite(value)):
    raise ValueError(f"{fn}: {name} must be a finite number >= 0; got {name}={value}")
  return value


def add_noise(key: jax.Array, x: jax.Array, *, variance: float = 0.1) -> jax.Array:
  """Additive Gaussian noise, ``x + sqrt(variance) * N(0, 1)`` (Eq. 1 of DAE).

  The paper's ``sigma = 0.1`` is a variance (Appendix G: "the variance of the gaussian
  noise"); the reference adds ``variance ** 0.5 * torch.randn(...)``, so the standard deviation
  is ``sqrt(0.1) ~ 0.316``. The noise is drawn fresh for every voxel, channel and sample; pass
  a new key per step (``jax.random.fold_in(key, step)``). The mean is 0. No clipping.

  Args:
    key: a ``jax.random`` key.
    x: ``(N, H, W, C)`` or ``(N, D, H, W, C)`` float.
    variance: the noise variance, a Python number >= 0 (checked, so not a traced value).

  Returns:
    ``x + noise`` with the shape and dtype of ``x`` (the noise is drawn and added in float32).
  """
  fn = "add_noise"
  _check_x(x, fn)
  variance = _check_variance(variance, "variance", fn)
  return _add_noise(key, x, jnp.float32(math.sqrt(variance)))


@jax.jit
def _add_noise(key, x, std):
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return (x.astype(jnp.float32) + std * noise).astype(x.dtype)


def _resampling(shape, factor, method, fn: str, method_arg: str = "method") -> tuple[int, ...]:
  """Checks ``method`` and ``factor`` for an ``x`` of ``shape``; returns one factor per axis."""
  if method not in RESAMPLE_METHODS:
    raise ValueError(f"{fn}: {method_arg} must be one of {RESAMPLE_METHODS}; "
                     f"got {method_arg}={method!r}")
  return _factors(factor, tuple(shape[1:-1]), fn)


def _factors(factor, spatial: tuple[int, ...], fn: str) -> tuple[int, ...]:
  if isinstance(factor, Sequence) and not isinstance(factor, str):
    factors = tuple(factor)
  else:
    factors = (factor,) * len(spatial)
  if len(factors) != len(spatial) or any(
      isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 1 for f in factors):
    raise ValueError(f"{fn}: factor must be an int >= 1 or one per spatial axis of {spatial}; "
                     f"got factor={factor!r}")
  factors = tuple(int(f) for f in factors)
  if any(s % f for s, f in zip(spatial, factors)):
    raise ValueError(f"{fn}: every spatial size must be divisible by its factor; got spatial "
                     f"shape {spatial} and factor {factors}")
  return factors


def downsample_upsample(x: jax.Array, *, factor=4, method: str = "linear") -> jax.Array:
  """Down-samples by ``factor`` and up-samples back to the input shape (Eq. 2 of DAE).

  DAE's "pre-upsampling" super-resolution input: ``x`` resized to ``spatial // factor`` and back
  to ``spatial``, without antialiasing (``jax.image.resize(..., antialias=False)``; its default
  antialiasing low-pass filters when shrinking, which torch's ``F.interpolate`` does not).

  Grid convention: ``jax.image.resize`` uses half-pixel centres (``align_corners=False``):
  output index ``i`` samples the input at ``(i + 0.5) * in / out - 0.5``. For ``"linear"``
  taps falling outside the input are dropped and the remaining weights renormalised, which
  equals torch's clamping of the source coordinate to the border. So

  * ``"linear"`` (the paper's choice) equals ``F.interpolate(mode="bilinear" / "trilinear",
    align_corners=False)`` both ways and ``scipy.ndimage.zoom(order=1, grid_mode=True,
    mode="nearest")``: shrinking by 4 averages voxels ``4i + 1`` and ``4i + 2`` of each cell
    (no low-pass filter), growing interpolates between cell values, edges replicated.
  * ``"nearest"`` (the reference code's ``F.interpolate(img, size=96 // 4)`` default mode)
    is torch's legacy nearest, which samples ``floor(i * in / out)``: each cell's first voxel
    (``x[:, ::f]``), then repeats it ``f`` times. This is not ``jax.image.resize``'s nearest.
  * ``"nearest-exact"``: ``jax.image.resize(method="nearest")`` both ways, which samples
    ``floor((i + 0.5) * in / out)`` (voxel ``4i + 2`` for ``f = 4``), torch's
    ``mode="nearest-exact"``. Both nearest modes up-sample by plain repetition.

  Args:
    x: ``(N, H, W, C)`` or ``(N, D, H, W, C)`` float.
    factor: the down-sampling ratio epsilon (4 in DAE, Table 9), an int or one per spatial
      axis; every spatial size must be divisible by its factor. 1 is the identity.
    method: ``"linear"``, ``"nearest"`` or ``"nearest-exact"`` (above).

  Returns:
    The resampled ``x``, same shape and dtype.
  """
  fn = "downsample_upsample"
  factors = _resampling(_check_x(x, fn), factor, method, fn)
  if all(f == 1 for f in factors):
    return x
  return _down_up(x, factors, method)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _down_up(x, factors, method):
  n, *spatial, c = x.shape
  kernel = "linear" if method == "linear" else "nearest"
  if method == "nearest":  # torch's legacy nearest: the first voxel of each cell
    low = x[(slice(None), *(slice(None, None, f) for f in factors))]
  else:
    low_shape = (n, *(s // f for s, f in zip(spatial, factors)), c)
    low = jax.image.resize(x, low_shape, kernel, antialias=False)
  return jax.image.resize(low, x.shape, kernel, antialias=False)


def local_channel_mask(key: jax.Array, n: int, channels: int, *, ratio: float = 0.6,
                       shared: bool = False) -> jax.Array:
  """DAE local masking: which ``int(ratio * channels)`` embedding channels to zero.

  Exactly ``int(ratio * channels)`` channels (the reference's ``int(0.6 * C)``), drawn without
  replacement. ``shared=False``: one random subset per sample (each sample's from its own key of
  ``jax.random.split(key, n)``). ``shared=True``: one subset for the whole batch, as the reference
  code does (``random.sample(range(C), int(0.6 * C))`` per forward pass); for the same key it is
  the subset of :func:`jaxmed.pretext.masking.channel_masking`. Apply it to the patch embedding
  with :func:`apply_channel_mask`; every token of a sample shares the sample's subset.

  Args:
    key: a ``jax.random`` key.
    n: batch size N.
    channels: embedding channels C (Swin-UNETR's feature size).
    ratio: fraction of channels to zero, in [0, 1] (0.6 in DAE; App. G.3's text prefers 0.4).
    shared: one subset for all samples.

  Returns:
    ``(n, channels)`` float32, 1 for a zeroed channel, 0 for a kept one; every row sums to
    ``int(ratio * channels)``.
  """
  fn = "local_channel_mask"
  n = _check_count("n", n, fn)
  channels = _check_count("channels", channels, fn)
  ratio = check_prob(f"{fn}: ratio", ratio)
  return _channel_mask(key, jnp.int32(int(ratio * channels)), n, channels, bool(shared))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _channel_mask(key, num_masked, n, channels, shared):
  def one(k):  # the first num_masked channels of a random permutation
    perm = jax.random.permutation(k, channels)
    chosen = (jnp.arange(channels) < num_masked).astype(jnp.float32)
    return jnp.zeros((channels,), jnp.float32).at[perm].set(chosen)

  if shared:
    return jnp.broadcast_to(one(key), (n, channels))
  return jax.vmap(one)(jax.random.split(key, n))


def apply_channel_mask(embeddings: jax.Array, mask: jax.Array) -> jax.Array:
  """Zeroes the masked channels of each sample's embedding at every spatial position / token.

  Args:
    embeddings: ``(N, *S, C)`` (a patch embedding ``(N, D, H, W, C)``, tokens ``(N, T, C)``).
    mask: ``(N, C)`` of 0/1 (or bool), 1 for a channel to zero, as :func:`local_channel_mask`
      returns.

  Returns:
    ``embeddings`` with ``embeddings[b, ..., c] = 0`` wherever ``mask[b, c] != 0``; same shape
    and dtype. (A ``where``, not a product: an inf or nan in a masked channel becomes 0 too.)

  Raises:
    ValueError: (before tracing) ``embeddings`` of rank below 2, ``mask`` not ``(N, C)``; a
      concrete ``mask`` with values other than 0 and 1 (e.g. a keep-probability or a
      keep-mask scaled by ``1 / (1 - ratio)``, which would zero every nonzero channel).
  """
  fn = "apply_channel_mask"
  e_shape = getattr(embeddings, "shape", None)
  if e_shape is None or len(e_shape) < 2:
    raise ValueError(f"{fn}: embeddings must be (N, *spatial, C); got shape "
                     f"{None if e_shape is None else tuple(e_shape)}")
  m_shape = getattr(mask, "shape", None)
  expected = (e_shape[0], e_shape[-1])
  if m_shape is None or tuple(m_shape) != expected:
    raise ValueError(f"{fn}: mask must have shape (N, C) = {expected} for embeddings of shape "
                     f"{tuple(e_shape)}; got {None if m_shape is None else tuple(m_shape)}")
  values = concrete_values(mask)
  if values is not None and not ((values == 0) | (values == 1)).all():
    raise ValueError(f"{fn}: mask must be 0/1 (or bool), 1 for a channel to zero; found values "
                     f"{np.unique(values)[:6]} (shape {values.shape}, dtype {values.dtype})")
  masked = (mask != 0).reshape(e_shape[0], *(1,) * (len(e_shape) - 2), e_shape[-1])
  return jnp.where(masked, jnp.zeros((), embeddings.dtype), embeddings)


def disrupt(key: jax.Array, x: jax.Array, *, kind: str, noise_variance: float = 0.1,
            factor=4, resample: str = "linear") -> jax.Array:
  """DAE's image-space disruption of a batch (Eqs. 1-2; Table 5's rows).

  ``kind``:

  * ``"none"``: ``x`` unchanged (the input of local masking alone, the code's ``sld``);
  * ``"noise"``: :func:`add_noise` (the code's ``denoise``);
  * ``"downsample"``: :func:`downsample_upsample` (the code's ``superres``; ``key`` unused);
  * ``"noise+downsample"``: noise, then down- and up-sampling (the image part of ``all``).

  The paper's "all" adds local masking of the patch embedding after this, inside the network:
  ``disrupt(k1, x, kind="noise+downsample")`` then :func:`local_channel_mask` /
  :func:`apply_channel_mask` on the embedding with another key (module docstring).

  Args:
    key: a ``jax.random`` key (fresh per step).
    x: ``(N, H, W, C)`` or ``(N, D, H, W, C)`` float, the clean input.
    kind: one of ``"none"``, ``"noise"``, ``"downsample"``, ``"noise+downsample"``.
    noise_variance: variance of the noise (:func:`add_noise`'s ``variance``; 0.1 in DAE).
    factor: down-sampling ratio (:func:`downsample_upsample`; 4 in DAE).
    resample: :func:`downsample_upsample`'s ``method``: ``"linear"`` (the paper) or
      ``"nearest"`` (the reference code), or ``"nearest-exact"``.

  Returns:
    The disrupted ``x``, same shape and dtype.
  """
  fn = "disrupt"
  shape = _check_x(x, fn)
  if kind not in KINDS:
    raise ValueError(f"{fn}: kind must be one of {KINDS}; got kind={kind!r}")
  if "downsample" in kind:  # all checks before any work
    _resampling(shape, factor, resample, fn, method_arg="resample")
  if "noise" in kind:
    _check_variance(noise_variance, "noise_variance", fn)  # named as the caller passed it
    x = add_noise(key, x, variance=noise_variance)
  if "downsample" in kind:
    x = downsample_upsample(x, factor=factor, method=resample)
  return x
