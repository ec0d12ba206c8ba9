"""Swin UNETR (2D / 3D), numerically equal to MONAI 1.6 ``monai.networks.nets.SwinUNETR``.

Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in
MRI Images" (arXiv:2201.01266); Swin UNETR v2 (``use_v2``): He et al., "SwinUNETR-V2" (MICCAI
2023). Channels-last: images ``(N, H, W, C)``, volumes ``(N, D, H, W, C)``.

Module names mirror MONAI's attribute names, so a converted checkpoint maps one to one
(``jaxmed.interop.swin_unetr``)::

  swinViT                    SwinTransformer (the encoder; usable on its own)
    patch_embed/proj         patch embedding, conv with kernel = stride = patch_size
    patch_embed/norm         LayerNorm, only with ``patch_norm``
    patch_embed/proj/conv1.. (``patch_embedding="conv"``) the DAE conv block, see below
    mask_token               (``use_mask_token``) the learnable token of ``token_mask``
    layers{i}c, i=1..4       (``use_v2``) UnetrBasicBlock before stage i
    layers{i}                BasicLayer: blocks_{j} (SwinTransformerBlock) + downsample
  encoder1..4, encoder10     UnetrBasicBlock (residual conv block ``layer``)
  decoder5..1                UnetrUpBlock: transp_conv (kernel = stride = 2) + conv_block
  out                        1x1 conv with bias

Behaviour kept from MONAI (and its Swin ancestors), all reproduced exactly:

* a window shrinks to the feature map along every axis where the map is not larger than the
  window, and the shift along that axis becomes 0;
* feature maps are zero-padded (after ``norm1``) to a multiple of the window; the padded tokens
  take part in attention (un-shifted windows get no mask), as in MONAI;
* the relative position index is built for the *configured* window and sliced ``[:n, :n]``
  with ``n`` the number of tokens of the (possibly shrunk) window, as MONAI does;
* shifted windows get the region mask with fill value -100;
* ``downsample``: "merging" (MONAI >= 1.5 ``PatchMerging``), "mergingv2" (``PatchMergingV2``)
  or "merging_legacy" (``PatchMerging`` of MONAI < 1.5, before PR #8285 of Jan 2025, whose 3D
  octant order repeats the octants (0, 1, 0) and (0, 0, 1) and never sees (1, 1, 0) and
  (0, 1, 1); the published self-supervised Swin UNETR and DAE checkpoints were trained with
  it). In 2D the three are the same.

Pre-training hooks (Disruptive Autoencoders, SimMIM), inert unless used: with the default
attributes and no masks the variables (MONAI's tree) and the computation are unchanged.

* ``patch_embedding="conv"``: the patch embedding of the DAE checkpoints (research-contributions
  ``DAE/``, ``PatchEmbed3D``): MONAI ``UnetBasicBlock`` with kernel 3, ``conv1`` stride 2
  (padding 1), ``norm1``, LeakyReLU 0.01, ``conv2`` stride 1, ``norm2``, LeakyReLU 0.01; convs
  without bias, instance norms with affine parameters (eps 1e-5). ``patch_size`` must be 2.
* ``channel_mask`` ``(B, E)`` (nonzero = zero that embedding channel in every token, DAE's
  local masking, as :func:`jaxmed.pretext.disruptions.local_channel_mask` returns) and
  ``token_mask`` ``(B, *grid)`` bool (True = replace the token by ``mask_token``, SimMIM), both
  applied right after the patch embedding in the reference's order: token mask, dropout,
  channel mask. The masked embedding is ``hidden_states_0`` and feeds ``encoder2``;
  ``encoder1`` sees the input as given. ``mask_token`` ``(E,)`` exists only with
  ``use_mask_token=True`` (truncated normal, std 0.02, as SimMIM / DAE initialise it).

Windows, region masks and relative indices are built in NumPy at trace time (shapes are static):
a jitted forward holds them as small constants. The patch embedding, the UNETR blocks, the MLP
and DropPath come from :mod:`jaxmed.models.blocks`: 3D convolutions run as 2D convolutions
batched over depth (``blocks.conv3x3``), and every kernel = stride layer (patch embedding,
transposed convs) as one matmul / einsum, which XLA:CPU runs much faster than its 3D
(transposed) convolutions.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models._utils import (check_choice, check_input, check_rate, check_spatial_dims,
                                  spatial_tuple)
from jaxmed.models.blocks import (MLP, Dense, DropPath, PatchEmbed, SameConv, UnetrBasicBlock,
                                  UnetrUpBlock, attention, check_norm_channels, conv_init,
                                  make_norm, parse_norm, trunc_normal_init)

DOWNSAMPLES = ("merging", "mergingv2", "merging_legacy")
PATCH_EMBEDDINGS = ("linear", "conv")
_LN_EPS = 1e-5
_MASK_FILL = -100.0

dense_init = trunc_normal_init

# 3D octant orders of the patch merging variants, as (d, h, w) offsets in concatenation order.
_OCTANTS_3D = {
    "mergingv2": tuple(itertools.product(range(2), repeat=3)),
    "merging": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1),
                (1, 1, 1)),
    "merging_legacy": ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0),
                       (0, 0, 1), (1, 1, 1)),
}
# 2D (h, w) order, the same for every variant (MONAI's PatchMergingV2 2D branch).
_OCTANTS_2D = ((0, 0), (1, 0), (0, 1), (1, 1))


# --------------------------------------------------------------------------------------------
# Configuration helpers.


def get_window_size(x_size: Sequence[int], window_size: Sequence[int],
                    shift_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Window and shift actually used on a feature map of size ``x_size`` (MONAI's rule).

  Along an axis where the map is not larger than the window, the window shrinks to the map
  and the shift is 0.
  """
  window, shift = list(window_size), list(shift_size)
  for i, s in enumerate(x_size):
    if s <= window_size[i]:
      window[i] = s
      shift[i] = 0
  return tuple(window), tuple(shift)


@functools.lru_cache(maxsize=None)
def relative_position_index(window_size: tuple[int, ...]) -> np.ndarray:
  """Swin relative position index ``(N, N)``, ``N = prod(window_size)``, into the bias table.

  ``index[i, j] = sum_a (c_a(i) - c_a(j) + w_a - 1) * prod_{b > a} (2 w_b - 1)``; equal to
  MONAI's ``relative_position_index`` buffer.
  """
  coords = np.stack(np.meshgrid(*[np.arange(w) for w in window_size], indexing="ij"))
  coords = coords.reshape(len(window_size), -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  index = np.zeros(rel.shape[:2], np.int64)
  for a, w in enumerate(window_size):
    mult = int(np.prod([2 * b - 1 for b in window_size[a + 1:]], dtype=np.int64))
    index += (rel[:, :, a] + w - 1) * mult
  index.setflags(write=False)
  return index


def _partition_np(x: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
  """``(*S)`` -> ``(num_windows, N)`` in MONAI's window order (raster over the window grid)."""
  d = len(window)
  grid = [s // w for s, w in zip(x.shape, window)]
  shape = [v for g, w in zip(grid, window) for v in (g, w)]
  x = x.reshape(shape)
  x = x.transpose(tuple(range(0, 2 * d, 2)) + tuple(range(1, 2 * d, 2)))
  return x.reshape(int(np.prod(grid)), int(np.prod(window)))


@functools.lru_cache(maxsize=None)
def shift_regions(padded: tuple[int, ...], window: tuple[int, ...],
                  shift: tuple[int, ...]) -> np.ndarray:
  """Region label ``(num_windows, N)`` of every token of every shifted window.

  Two tokens of a window may attend to each other only when their labels agree; the mask is
  ``-100`` elsewhere. Same regions as MONAI's ``compute_mask`` (including its slices when a
  shift is 0).
  """
  img = np.zeros(padded, np.int32)
  regions = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
  for cnt, index in enumerate(itertools.product(*regions)):
    img[index] = cnt
  labels = _partition_np(img, window)
  labels.setflags(write=False)
  return labels


def shift_mask(padded: tuple[int, ...], window: tuple[int, ...],
               shift: tuple[int, ...]) -> np.ndarray:
  """MONAI's ``compute_mask``: ``(num_windows, N, N)``, 0 within a region and -100 across."""
  labels = shift_regions(padded, window, shift)
  return np.where(labels[:, None, :] != labels[:, :, None], _MASK_FILL, 0.0).astype(np.float32)


def _window_partition(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """``(B, *S, C)`` -> ``(B, num_windows, N, C)``; ``S`` divisible by ``window``."""
  b, c, d = x.shape[0], x.shape[-1], len(window)
  grid = [s // w for s, w in zip(x.shape[1:-1], window)]
  shape = [b] + [v for g, w in zip(grid, window) for v in (g, w)] + [c]
  x = x.reshape(shape)
  perm = (0,) + tuple(range(1, 2 * d, 2)) + tuple(range(2, 2 * d + 1, 2)) + (2 * d + 1,)
  return x.transpose(perm).reshape(b, int(np.prod(grid)), int(np.prod(window)), c)


def _window_reverse(windows: jax.Array, window: tuple[int, ...],
                    spatial: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`_window_partition`: ``(B, num_windows, N, C)`` -> ``(B, *S, C)``."""
  b, c, d = windows.shape[0], windows.shape[-1], len(window)
  grid = [s // w for s, w in zip(spatial, window)]
  x = windows.reshape([b] + grid + list(window) + [c])
  perm = (0,) + tuple(v for a in range(d) for v in (1 + a, 1 + d + a)) + (2 * d + 1,)
  return x.transpose(perm).reshape((b,) + tuple(spatial) + (c,))


# --------------------------------------------------------------------------------------------
# Layers.


class WindowAttention(nn.Module):
  """Window multi-head self-attention with a relative position bias (MONAI ``WindowAttention``).

  Attributes:
    num_heads: heads; the channel count must be divisible by it.
    window_size: the configured window (defines the bias table ``prod(2 w - 1) x heads``).
    qkv_bias: bias in the qkv projection.
    attn_drop: dropout on the attention probabilities.
    proj_drop: dropout after the output projection.

  ``__call__(x (B, num_windows, n, C), regions (num_windows, n) or None)``: ``n`` is the token
  count of the window in use (``<= prod(window_size)``); ``regions`` are the region labels of
  shifted windows (:func:`shift_regions`), turned into the -100 mask. Softmax runs in float32.
  """

  num_heads: int
  window_size: tuple[int, ...]
  qkv_bias: bool = True
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, regions: np.ndarray | None, *,
               train: bool = False) -> jax.Array:
    b, nw, n, c = x.shape
    h = self.num_heads
    hd = c // h
    table = self.param("relative_position_bias_table", dense_init,
                       (int(np.prod([2 * w - 1 for w in self.window_size])), h),
                       self.param_dtype)
    qkv = Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=dense_init, name="qkv")(x)
    # Head-major (b, w, h, n, d) layout: XLA:CPU runs the batched matmuls much faster so.
    qkv = qkv.reshape(b, nw, n, 3, h, hd).transpose(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    # MONAI slices the index of the configured window to the n tokens in use.
    index = relative_position_index(tuple(self.window_size))[:n, :n]
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(index.reshape(-1)), axis=0)
    bias = bias.reshape(n, n, h).transpose(2, 0, 1)
    mask = None
    if regions is not None:  # (num_windows, n) region labels of a shifted window
      labels = jnp.asarray(regions)
      mask = jnp.where(labels[:, None, :] != labels[:, :, None], _MASK_FILL, 0.0)[:, None]
    dropout = None
    if self.attn_drop > 0.0 and train:
      dropout = nn.Dropout(self.attn_drop, deterministic=False)
    out = attention(q, k.astype(q.dtype), v.astype(self.dtype), bias, mask, dropout)
    out = out.transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)
    out = Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init,
                   name="proj")(out)
    return nn.Dropout(self.proj_drop, deterministic=not train)(out)


class SwinTransformerBlock(nn.Module):
  """(Shifted) window attention block: x + DropPath(W-MSA(LN(x))), then + DropPath(MLP(LN(x))).

  ``shift`` is False for the plain-window block and True for the shifted one (shift of
  ``window // 2``, set to 0 along axes where the window shrinks to the map).
  Input and output ``(B, *S, C)``.
  """

  num_heads: int
  window_size: tuple[int, ...]
  shift: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    spatial = tuple(x.shape[1:-1])
    c = x.shape[-1]
    full_shift = tuple(w // 2 for w in self.window_size) if self.shift else (0,) * len(spatial)
    window, shift = get_window_size(spatial, self.window_size, full_shift)
    layer_norm = functools.partial(make_norm, "layer", epsilon=_LN_EPS,
                                   param_dtype=self.param_dtype)

    shortcut = x
    y = layer_norm(name="norm1")(x).astype(self.dtype)
    pad = [(0, (-s) % w) for s, w in zip(spatial, window)]
    if any(p for _, p in pad):
      y = jnp.pad(y, [(0, 0)] + pad + [(0, 0)])
    padded = tuple(y.shape[1:-1])
    axes = tuple(range(1, len(spatial) + 1))
    shifted = any(s > 0 for s in shift)
    if shifted:
      y = jnp.roll(y, tuple(-s for s in shift), axis=axes)
      regions = shift_regions(padded, window, shift)
    else:
      regions = None
    windows = _window_partition(y, window)
    windows = WindowAttention(self.num_heads, self.window_size, qkv_bias=self.qkv_bias,
                              attn_drop=self.attn_drop, proj_drop=self.drop, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="attn")(windows, regions,
                                                                          train=train)
    y = _window_reverse(windows, window, padded)
    if shifted:
      y = jnp.roll(y, shift, axis=axes)
    y = y[(slice(None),) + tuple(slice(0, s) for s in spatial)]
    x = shortcut + DropPath(self.drop_path)(y, train=train)

    y = layer_norm(name="norm2")(x).astype(self.dtype)
    y = MLP(int(c * self.mlp_ratio), dropout_rate=self.drop, kernel_init=dense_init,
            dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(y, train=train)
    return x + DropPath(self.drop_path)(y, train=train)


class PatchMerging(nn.Module):
  """Patch merging: 2x2(x2) neighbourhood -> channels, LayerNorm(2^d C), Linear(-> 2C, no bias).

  Odd sizes are zero-padded at the end first. ``mode`` picks the 3D octant order
  ("merging", "mergingv2", "merging_legacy"; see the module docstring).
  Input ``(B, *S, C)`` -> ``(B, *ceil(S / 2), 2C)``.
  """

  mode: str = "merging"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.ndim - 2
    b, c = x.shape[0], x.shape[-1]
    pad = [(0, s % 2) for s in x.shape[1:-1]]
    if any(p for _, p in pad):
      x = jnp.pad(x, [(0, 0)] + pad + [(0, 0)])
    half = [s // 2 for s in x.shape[1:-1]]
    x = x.reshape([b] + [v for h in half for v in (h, 2)] + [c])
    octants = _OCTANTS_2D if d == 2 else _OCTANTS_3D[self.mode]
    parts = []
    for offsets in octants:
      index = (slice(None),) + tuple(v for o in offsets for v in (slice(None), o))
      parts.append(x[index])
    x = jnp.concatenate(parts, axis=-1)
    x = make_norm("layer", epsilon=_LN_EPS, param_dtype=self.param_dtype,
                  name="norm")(x).astype(self.dtype)
    return Dense(2 * c, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=dense_init, name="reduction")(x)


class BasicLayer(nn.Module):
  """One Swin stage: ``depth`` blocks (``blocks_{j}``, odd j shifted), then ``downsample``.

  Input ``(B, *S, C)`` -> ``(B, *ceil(S / 2), 2C)`` (or ``(B, *S, C)`` without downsample).
  """

  depth: int
  num_heads: int
  window_size: tuple[int, ...]
  drop_path: tuple[float, ...]
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop: float = 0.0
  attn_drop: float = 0.0
  downsample: str | None = "merging"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for j in range(self.depth):
      x = SwinTransformerBlock(
          self.num_heads, self.window_size, shift=j % 2 == 1, mlp_ratio=self.mlp_ratio,
          qkv_bias=self.qkv_bias, drop=self.drop, attn_drop=self.attn_drop,
          drop_path=self.drop_path[j], dtype=self.dtype, param_dtype=self.param_dtype,
          name=f"blocks_{j}")(x, train=train)
    if self.downsample is not None:
      x = PatchMerging(self.downsample, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsample")(x)
    return x


def conv3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Convolution with kernel 3, stride 2, padding 1 (PyTorch's), channels-last, no bias.

  ``(N, *S, Cin)`` -> ``(N, *ceil(S / 2), Cout)``; ``kernel`` ``(3, 3[, 3], Cin, Cout)``. 3D runs
  as three stride-2 2D convolutions batched over the output depth (one per depth tap), which
  XLA:CPU runs faster than its 3D convolution.
  """
  d = x.ndim - 2
  dn = ("NHWC", "HWIO", "NHWC")
  conv2d = lambda v, k: jax.lax.conv_general_dilated(v, k, (2, 2), [(1, 1), (1, 1)],
                                                     dimension_numbers=dn)
  if d == 2:
    return conv2d(x, kernel)
  n, depth, h, w, cin = x.shape
  out_depth = -(-depth // 2)
  xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  y = 0
  for a in range(3):  # output depth i reads input depths 2i - 1, 2i, 2i + 1
    taps = xp[:, a:a + 2 * out_depth - 1:2].reshape(n * out_depth, h, w, cin)
    y = y + conv2d(taps, kernel[a])
  return y.reshape((n, out_depth) + y.shape[1:])


class Conv3Stride2(nn.Module):
  """:func:`conv3_stride2` as a layer: param ``kernel`` ``(3, 3[, 3], Cin, features)`` (nn.Conv's
  layout), no bias. Input ``(B, *S, Cin)`` -> ``(B, *ceil(S / 2), features)`` in ``dtype``."""

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", conv_init, (3,) * (x.ndim - 2) + (x.shape[-1], self.features),
                        self.param_dtype)
    return conv3_stride2(*nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype))


class ConvPatchEmbedBlock(nn.Module):
  """MONAI ``UnetBasicBlock`` (kernel 3, stride 2) with affine instance norms: the DAE ``proj``.

  ``conv1`` (stride 2, padding 1) -> ``norm1`` -> LeakyReLU 0.01 -> ``conv2`` (stride 1) ->
  ``norm2`` -> LeakyReLU 0.01; no conv biases; norms and activations in float32.
  Input ``(B, *S, Cin)`` -> ``(B, *ceil(S / 2), features)`` in ``dtype``.
  """

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = functools.partial(make_norm, "instance", epsilon=_LN_EPS, affine=True,
                             param_dtype=self.param_dtype)
    y = Conv3Stride2(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="conv1")(x)
    y = nn.leaky_relu(norm(name="norm1")(y.astype(jnp.float32)), 0.01).astype(self.dtype)
    y = SameConv(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="conv2")(y)
    return nn.leaky_relu(norm(name="norm2")(y.astype(jnp.float32)), 0.01).astype(self.dtype)


class ConvPatchEmbed(nn.Module):
  """The DAE checkpoints' patch embedding, holding its block as ``proj`` (the reference's
  names): ``ConvPatchEmbed(ConvPatchEmbedBlock(E, parent=None))``."""

  proj: nn.Module

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


def _mask_array(mask: Any, name: str) -> Any:
  if mask is not None and not hasattr(mask, "shape"):
    mask = np.asarray(mask)
  if mask is not None and not hasattr(mask, "dtype"):
    raise ValueError(f"{name} must be an array; got {type(mask).__name__}")
  return mask


def check_masks(x_shape: tuple[int, ...], grid: tuple[int, ...], embed_dim: int,
                channel_mask: Any, token_mask: Any, use_mask_token: bool) -> tuple[Any, Any]:
  """Checks the masks of :class:`SwinTransformer` / :class:`SwinUNETR` (shapes and dtypes).

  Args:
    x_shape: the input's shape ``(B, *S, Cin)``.
    grid: the patch grid of the embedding (``ceil(S / patch_size)``).
    embed_dim: embedding channels.
    channel_mask: None or ``(B, embed_dim)`` bool / integer / float, nonzero = zeroed channel.
    token_mask: None or ``(B, *grid)`` bool, True = token replaced by ``mask_token``.
    use_mask_token: whether the module has a ``mask_token`` (``token_mask`` needs one).

  Returns:
    The masks as arrays (NumPy for Python sequences), None where not given.

  Raises:
    ValueError: naming the argument, the expected and the received shape or dtype.
  """
  channel_mask = _mask_array(channel_mask, "channel_mask")
  token_mask = _mask_array(token_mask, "token_mask")
  b = x_shape[0]
  if channel_mask is not None:
    expected = (b, embed_dim)
    if tuple(channel_mask.shape) != expected:
      raise ValueError(f"channel_mask must have shape (B, embedding channels) = {expected} for x "
                       f"of shape {tuple(x_shape)}; got shape {tuple(channel_mask.shape)}")
    dtype = np.dtype(channel_mask.dtype)
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)
            or np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16):
      raise ValueError(f"channel_mask must be bool, integer or float (nonzero = zero that "
                       f"channel); got dtype {dtype}")
  if token_mask is not None:
    if not use_mask_token:
      raise ValueError("token_mask needs use_mask_token=True (the learnable mask_token that "
                       "replaces the masked tokens); got use_mask_token=False")
    expected = (b,) + tuple(grid)
    if tuple(token_mask.shape) != expected:
      raise ValueError(f"token_mask must have shape (B, *patch grid) = {expected} for x of shape "
                       f"{tuple(x_shape)}; got shape {tuple(token_mask.shape)}")
    if np.dtype(token_mask.dtype) != np.bool_:
      raise ValueError(f"token_mask must be bool (True = replace the token by mask_token); got "
                       f"dtype {np.dtype(token_mask.dtype)}")
  return channel_mask, token_mask


def _layer_norm_channels(x: jax.Array) -> jax.Array:
  """Non-affine LayerNorm over channels in float32 (MONAI ``proj_out(..., normalize=True)``)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPS)


def _check_common(spatial_dims, depths, num_heads, embed_dim, mlp_ratio, downsample,
                  drop_rate, attn_drop_rate, drop_path_rate) -> None:
  check_spatial_dims(spatial_dims)
  if len(depths) < 1 or any(int(v) < 1 for v in depths):
    raise ValueError(f"depths must be a non-empty sequence of ints >= 1; got {tuple(depths)}")
  if len(num_heads) != len(depths):
    raise ValueError(f"num_heads needs one entry per stage ({len(depths)}); got "
                     f"num_heads={tuple(num_heads)}")
  for i, h in enumerate(num_heads):
    dim = embed_dim * 2**i
    if int(h) < 1 or dim % int(h):
      raise ValueError(f"stage {i} has {dim} channels, which num_heads[{i}]={h} must divide "
                       f"(num_heads={tuple(num_heads)})")
  if not mlp_ratio > 0:
    raise ValueError(f"mlp_ratio must be > 0; got mlp_ratio={mlp_ratio}")
  check_choice(downsample, DOWNSAMPLES, "downsample")
  for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                     ("dropout_path_rate", drop_path_rate)):
    check_rate(rate, name, inclusive=True)


class SwinTransformer(nn.Module):
  """The Swin UNETR encoder (MONAI ``SwinTransformer``), named ``swinViT`` inside SwinUNETR.

  Attributes:
    embed_dim: channels after the patch embedding (``feature_size`` of SwinUNETR).
    depths: blocks per stage.
    num_heads: attention heads per stage (stage i has ``embed_dim * 2**i`` channels).
    window_size: window (int or one per axis).
    patch_size: patch embedding size (int or one per axis).
    spatial_dims: 2 or 3.
    mlp_ratio, qkv_bias: MLP width ratio; bias in the qkv projection.
    drop_rate: dropout after the patch embedding, in the MLP and after the attention projection.
    attn_drop_rate: dropout on the attention probabilities.
    drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    patch_norm: LayerNorm after the patch embedding (``patch_embedding="linear"`` only).
    downsample: "merging" | "mergingv2" | "merging_legacy".
    use_v2: a residual conv block (``layers{i}c``, instance norm) before every stage.
    patch_embedding: "linear" (MONAI: conv with kernel = stride = ``patch_size``) or "conv"
      (the DAE checkpoints' conv block, ``patch_size`` 2; see the module docstring).
    use_mask_token: add the learnable ``mask_token`` ``(embed_dim,)`` that ``token_mask``
      needs (absent otherwise, so default variables keep MONAI's tree).
    remat: rematerialise every stage (``nn.remat``) to save activation memory in training.
    dtype: compute dtype (norms and softmax in float32).

  ``__call__(x (B, *S, Cin), *, train=False, normalize=True, channel_mask=None,
  token_mask=None)`` -> tuple of ``len(depths) + 1`` hidden states, float32: the patch
  embedding ``(B, *S/p, E)`` (after the masks) and each stage's output
  ``(B, *S/(p 2^(i+1)), E 2^(i+1))``, each through a non-affine LayerNorm over channels when
  ``normalize``. ``channel_mask`` ``(B, E)``: nonzero zeroes that channel of every token;
  ``token_mask`` ``(B, *ceil(S/p))`` bool: True replaces the token by ``mask_token`` (see the
  module docstring). Any spatial size works (odd sizes are padded as in MONAI).
  """

  embed_dim: int = 24
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int | Sequence[int] = 7
  patch_size: int | Sequence[int] = 2
  spatial_dims: int = 3
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  patch_norm: bool = False
  downsample: str = "merging"
  use_v2: bool = False
  patch_embedding: str = "linear"
  use_mask_token: bool = False
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self, x: jax.Array) -> None:
    _check_common(self.spatial_dims, self.depths, self.num_heads, self.embed_dim, self.mlp_ratio,
                  self.downsample, self.drop_rate, self.attn_drop_rate, self.drop_path_rate)
    if self.embed_dim < 1:
      raise ValueError(f"embed_dim must be >= 1; got embed_dim={self.embed_dim}")
    spatial_tuple(self.window_size, self.spatial_dims, "window_size")
    patch = spatial_tuple(self.patch_size, self.spatial_dims, "patch_size")
    check_choice(self.patch_embedding, PATCH_EMBEDDINGS, "patch_embedding")
    if self.patch_embedding == "conv" and set(patch) != {2}:
      raise ValueError(f"patch_embedding='conv' (kernel 3, stride 2) needs patch_size=2; got "
                       f"patch_size={self.patch_size}")
    if self.patch_embedding == "conv" and self.patch_norm:
      raise ValueError("patch_norm=True applies to patch_embedding='linear' only (the DAE conv "
                       "embedding normalises inside its block)")
    check_input(x, self.spatial_dims, "SwinTransformer")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, normalize: bool = True,
               channel_mask: Any = None, token_mask: Any = None) -> tuple[jax.Array, ...]:
    self._validate(x)
    d = self.spatial_dims
    window = spatial_tuple(self.window_size, d, "window_size")
    patch = spatial_tuple(self.patch_size, d, "patch_size")
    grid = tuple(-(-s // p) for s, p in zip(x.shape[1:-1], patch))
    channel_mask, token_mask = check_masks(x.shape, grid, self.embed_dim, channel_mask,
                                           token_mask, self.use_mask_token)
    depths = tuple(int(v) for v in self.depths)
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).tolist()
    instance = parse_norm("instance")
    layer_cls = nn.remat(BasicLayer, static_argnums=(2,)) if self.remat else BasicLayer
    conv_cls = nn.remat(UnetrBasicBlock, static_argnums=(2,)) if self.remat else UnetrBasicBlock

    if self.patch_embedding == "conv":
      block = ConvPatchEmbedBlock(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                  parent=None)
      x = ConvPatchEmbed(block, name="patch_embed")(x)
    else:
      x = PatchEmbed(self.embed_dim, patch, self.patch_norm, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="patch_embed")(x)
    if self.use_mask_token:
      mask_token = self.param("mask_token", dense_init, (self.embed_dim,), self.param_dtype)
      if token_mask is not None:  # SimMIM: masked tokens become the learnable token
        x = jnp.where(jnp.asarray(token_mask)[..., None], mask_token.astype(x.dtype), x)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    if channel_mask is not None:  # DAE local masking: zero channels in every token
      zeroed = (jnp.asarray(channel_mask) != 0).reshape((x.shape[0],) + (1,) * d + (-1,))
      x = jnp.where(zeroed, jnp.zeros((), x.dtype), x)
    out = lambda h: _layer_norm_channels(h) if normalize else h.astype(jnp.float32)
    hidden = [out(x)]
    for i, depth in enumerate(depths):
      if self.use_v2:
        x = conv_cls(self.embed_dim * 2**i, instance, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=f"layers{i + 1}c")(x, train)
      x = layer_cls(depth, int(self.num_heads[i]), window,
                    tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]), mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias, drop=self.drop_rate, attn_drop=self.attn_drop_rate,
                    downsample=self.downsample, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"layers{i + 1}")(x, train)
      hidden.append(out(x))
    return tuple(hidden)


class SwinUNETR(nn.Module):
  """Swin UNETR (MONAI 1.6 ``SwinUNETR``), channels-last.

  Attributes:
    out_channels: logits channels.
    feature_size: channels after the patch embedding, divisible by 12 (papers use 48).
    depths: Swin blocks per stage (4 stages).
    num_heads: attention heads per stage.
    window_size: window (int or one per axis).
    patch_size: patch embedding size; must be 2 (the decoder up-samples the patch embedding by
      2 to meet ``encoder1``; MONAI fails with a shape error for any other value).
    spatial_dims: 2 or 3.
    norm_name: decoder norm as in MONAI: "instance" (no affine), "batch", ("group",
      {"num_groups": g}), optionally with options ({"affine": True}, {"eps": ...}).
    normalize: non-affine LayerNorm on the 5 hidden states of the encoder.
    use_v2: Swin UNETR v2 (a residual conv block before every stage).
    downsample: "merging" | "mergingv2" | "merging_legacy" (see the module docstring).
    patch_norm: LayerNorm after the patch embedding (``patch_embedding="linear"`` only).
    patch_embedding: "linear" (MONAI) or "conv" (the DAE checkpoints' conv block).
    use_mask_token: add the learnable ``swinViT/mask_token`` that ``token_mask`` needs.
    drop_rate, attn_drop_rate, dropout_path_rate: dropout, attention dropout, stochastic depth
      (all active only with ``train=True`` and a 'dropout' rng).
    qkv_bias, mlp_ratio: bias in qkv; MLP width ratio.
    remat: rematerialise every encoder stage and every decoder block (``nn.remat``).
    dtype: compute dtype; norms, softmax and the outputs are float32.
    param_dtype: parameter dtype.

  ``__call__(x (B, *S, Cin), *, train=False, return_features=False, channel_mask=None,
  token_mask=None)`` -> logits ``(B, *S, out_channels)`` float32, or ``(logits, features)``;
  ``channel_mask`` ``(B, F)`` (nonzero = zero that embedding channel) and ``token_mask``
  ``(B, *S/2)`` bool (True = ``mask_token``) act right after the patch embedding, as in
  :class:`SwinTransformer`; ``encoder1`` sees ``x`` as given. Features (F = feature_size):
  ``hidden_states_{i}`` ``(B, *S/2^(i+1), F 2^i)``, i = 0..4 (after ``normalize``);
  ``encoder1`` ``(B, *S, F)``, ``encoder2`` ``(B, *S/2, F)``, ``encoder3`` ``(B, *S/4, 2F)``,
  ``encoder4`` ``(B, *S/8, 4F)``, ``encoder10`` ``(B, *S/32, 16F)``; ``decoder5``
  ``(B, *S/16, 8F)``, ``decoder4`` ``(B, *S/8, 4F)``, ``decoder3`` ``(B, *S/4, 2F)``,
  ``decoder2`` ``(B, *S/2, F)``, ``decoder1`` ``(B, *S, F)``; all float32.
  Every spatial size must be divisible by 32 (``patch_size * 2**4``). Batch norm in training
  needs ``mutable=["batch_stats"]``.
  """

  out_channels: int
  feature_size: int = 24
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int | Sequence[int] = 7
  patch_size: int = 2
  spatial_dims: int = 3
  norm_name: str | Sequence[Any] = "instance"
  normalize: bool = True
  use_v2: bool = False
  downsample: str = "merging"
  patch_norm: bool = False
  patch_embedding: str = "linear"
  use_mask_token: bool = False
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  dropout_path_rate: float = 0.0
  qkv_bias: bool = True
  mlp_ratio: float = 4.0
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self, x: jax.Array) -> tuple:
    d = self.spatial_dims
    check_spatial_dims(d)
    if self.feature_size < 12 or self.feature_size % 12:
      raise ValueError(f"feature_size must be a positive multiple of 12; got "
                       f"feature_size={self.feature_size}")
    if len(self.depths) != 4:
      raise ValueError(f"SwinUNETR has 4 stages; got depths={tuple(self.depths)}")
    _check_common(d, self.depths, self.num_heads, self.feature_size, self.mlp_ratio,
                  self.downsample, self.drop_rate, self.attn_drop_rate, self.dropout_path_rate)
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    if self.patch_size != 2:
      raise ValueError(f"SwinUNETR needs patch_size=2 (its decoder up-samples the patch "
                       f"embedding by 2 to meet encoder1); got patch_size={self.patch_size}")
    spatial_tuple(self.window_size, d, "window_size")
    norm = parse_norm(self.norm_name)
    f = self.feature_size
    check_norm_channels(norm, (f, 2 * f, 4 * f, 8 * f, 16 * f))
    check_input(x, d, "SwinUNETR")
    factor = self.patch_size * 2**4
    bad = [s for s in x.shape[1:-1] if s % factor]
    if bad:
      raise ValueError(f"SwinUNETR input shape {x.shape}: every spatial size must be divisible "
                       f"by {factor} (patch_size * 2**4); {tuple(bad)} are not")
    return norm

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               channel_mask: Any = None, token_mask: Any = None):
    norm = self._validate(x)
    f = self.feature_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    basic = nn.remat(UnetrBasicBlock, static_argnums=(2,)) if self.remat else UnetrBasicBlock
    up = nn.remat(UnetrUpBlock, static_argnums=(3,)) if self.remat else UnetrUpBlock

    hidden = SwinTransformer(
        embed_dim=f, depths=tuple(self.depths), num_heads=tuple(self.num_heads),
        window_size=self.window_size, patch_size=self.patch_size,
        spatial_dims=self.spatial_dims, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
        drop_rate=self.drop_rate, attn_drop_rate=self.attn_drop_rate,
        drop_path_rate=self.dropout_path_rate, patch_norm=self.patch_norm,
        downsample=self.downsample, use_v2=self.use_v2, patch_embedding=self.patch_embedding,
        use_mask_token=self.use_mask_token, remat=self.remat, name="swinViT",
        **kw)(x, train=train, normalize=self.normalize, channel_mask=channel_mask,
              token_mask=token_mask)
    feats = {f"hidden_states_{i}": h for i, h in enumerate(hidden)}
    hidden = [h.astype(self.dtype) for h in hidden]
    enc0 = basic(f, norm, name="encoder1", **kw)(x, train)
    enc1 = basic(f, norm, name="encoder2", **kw)(hidden[0], train)
    enc2 = basic(2 * f, norm, name="encoder3", **kw)(hidden[1], train)
    enc3 = basic(4 * f, norm, name="encoder4", **kw)(hidden[2], train)
    dec4 = basic(16 * f, norm, name="encoder10", **kw)(hidden[4], train)
    dec3 = up(8 * f, norm, name="decoder5", **kw)(dec4, hidden[3], train)
    dec2 = up(4 * f, norm, name="decoder4", **kw)(dec3, enc3, train)
    dec1 = up(2 * f, norm, name="decoder3", **kw)(dec2, enc2, train)
    dec0 = up(f, norm, name="decoder2", **kw)(dec1, enc1, train)
    out = up(f, norm, name="decoder1", **kw)(dec0, enc0, train)
    logits = nn.Conv(self.out_channels, kernel_size=(1,) * self.spatial_dims, use_bias=True,
                     kernel_init=conv_init, name="out", **kw)(out).astype(jnp.float32)
    if not return_features:
      return logits
    feats.update(encoder1=enc0, encoder2=enc1, encoder3=enc2, encoder4=enc3, encoder10=dec4,
                 decoder5=dec3, decoder4=dec2, decoder3=dec1, decoder2=dec0, decoder1=out)
    return logits, {k: v.astype(jnp.float32) for k, v in feats.items()}
