"""The SSFD UNet: the self-supervised in-painting UNet whose encoder defines the SSFD metric.

SSFD (Adamson et al., "SSFD: Self-Supervised Feature Distance as an MR Image Reconstruction
Quality Metric", NeurIPS 2021 workshop; ``../shared/papers/ssfd_feature_distance.md``) pre-trains
a UNet (2 convs per level, 5 levels with 20-40-80-160-320 filters, GroupNorm, dropout 0.1) to
in-paint zero-filled patches, then compares images by the mean squared distance of encoder
features. The encoder follows meddlr's ``SSFD_Encoder`` (``meddlr/metrics/ssfd.py``), the module
the published checkpoint loads into:

  block1                 DoubleConv(in -> chans)                     (meddlr ``firstblock``)
  block{k}, k=2..L+1     MaxPool(2) then DoubleConv(c -> 2c)         (meddlr ``encoder{k-1}``)

where ``L = num_pool_layers`` and every DoubleConv is

  conv1 (3x3, pad 1, bias) -> ReLU -> conv2 (3x3, pad 1, bias) -> ReLU   = tap ``block{k}_relu2``
  -> GroupNorm(num_groups, eps 1e-5) -> Dropout (train only)             = output ``block{k}``

(meddlr's module builds a ``Dropout(0.1)`` but never applies it; the paper trains with dropout
0.1. Here it is applied after the GroupNorm in train mode only, so the taps and every eval-mode
output equal meddlr's.) The SSFD taps are meddlr's names ``block1_relu2`` .. ``block5_relu2``
(1-based, ``block4_relu2`` = 160 channels at 1/8 resolution is the metric's default layer).

The decoder of the published in-painting network is not public; :class:`SSFDUNet` completes the
encoder with the classical UNet decoder in the same block style:

  decoder{k}, k=L..1     up: 2x2 stride-2 transposed conv (bias) -> chans * 2**(k-1),
                         concat [up, block{k}] (the encoder output at that level), DoubleConv
  output_conv            1x1 conv with bias -> out_channels (linear; L2 in-painting loss)

:class:`SSFDUNet` keeps its encoder in the submodule ``encoder``, an :class:`SSFDEncoder` with the
same configuration, so ``{"params": variables["params"]["encoder"]}`` runs with
:class:`SSFDEncoder` directly. ``jaxmed.interop.ssfd`` converts the meddlr checkpoint.

Both modules work in 2D ``(N, H, W, C)`` and, with ``spatial_dims=3``, in 3D ``(N, D, H, W, C)``.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models._utils import check_input, check_rate, check_spatial_dims
from jaxmed.models.blocks import UpConv, make_norm, torch_default_init

_EPS = 1e-5
conv_init = torch_default_init  # torch's default Conv init
_TAP = re.compile(r"^block([1-9][0-9]*)_relu2$")


def tap_names(num_pool_layers: int = 4) -> tuple[str, ...]:
  """SSFD tap names for ``num_pool_layers`` = L: ``block1_relu2`` .. ``block{L+1}_relu2``."""
  return tuple(f"block{k}_relu2" for k in range(1, num_pool_layers + 2))


def _check_config(chans: int, num_pool_layers: int, num_groups: int, spatial_dims: int,
                  dropout: float) -> None:
  check_spatial_dims(spatial_dims)
  if num_pool_layers < 0:
    raise ValueError(f"num_pool_layers must be >= 0; got num_pool_layers={num_pool_layers}")
  if chans < 1:
    raise ValueError(f"chans must be >= 1; got chans={chans}")
  if num_groups < 1 or chans % num_groups:
    raise ValueError(
        f"GroupNorm needs chans divisible by num_groups (then every level's 2**k * chans is); "
        f"got chans={chans}, num_groups={num_groups}")
  check_rate(dropout, "dropout")


def _check_input(x: jax.Array, spatial_dims: int, what: str) -> None:
  check_input(x, spatial_dims, what)
  if x.shape[-1] < 1:
    raise ValueError(f"{what} input needs at least one channel; got shape {x.shape}")


class DoubleConv(nn.Module):
  """conv1 -> ReLU -> conv2 -> ReLU (tap) -> GroupNorm -> Dropout; meddlr's SSFD ``DoubleConv``.

  Attributes:
    features: output channels.
    num_groups: GroupNorm groups (10 in SSFD).
    dropout: dropout rate after the GroupNorm, train mode only (0 disables it).

  ``__call__(x (N, *S, Cin), train)`` -> ``(out, tap)``, both ``(N, *S, features)``: ``out`` is
  the normalised block output in ``dtype``, ``tap`` the second ReLU's output in float32.
  """

  features: int
  num_groups: int = 10
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    d = x.ndim - 2
    conv = dict(kernel_size=(3,) * d, padding=((1, 1),) * d, use_bias=True, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=conv_init,
                bias_init=nn.initializers.zeros)
    x = nn.relu(nn.Conv(self.features, name="conv1", **conv)(x))
    x = nn.relu(nn.Conv(self.features, name="conv2", **conv)(x))
    tap = x.astype(jnp.float32)
    x = make_norm("group", num_groups=self.num_groups, epsilon=_EPS,
                  param_dtype=self.param_dtype, name="norm")(tap)
    x = x.astype(self.dtype)
    if self.dropout > 0.0:
      x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    return x, tap


class SSFDEncoder(nn.Module):
  """The SSFD feature encoder (meddlr ``SSFD_Encoder`` layout), optionally truncated.

  Attributes:
    chans: channels of ``block1``; ``block{k}`` has ``chans * 2**(k-1)`` (20 -> 320 in SSFD).
    num_pool_layers: max-pools, i.e. ``num_pool_layers + 1`` blocks (4 in SSFD).
    num_groups: GroupNorm groups (10); ``chans`` must be divisible by it.
    spatial_dims: 2 or 3.
    dropout: dropout after each block's GroupNorm in train mode (meddlr: never applied).
    last_tap: stop after this block (``"block4_relu2"`` builds and runs blocks 1..4 only; the
      later blocks then have no variables); None runs all blocks.
    dtype: compute dtype of the convolutions; GroupNorm, taps and outputs are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, *S, Cin), train=False, return_features=False)`` -> the last block's
  normalised output ``(N, *S // 2**(K-1), chans * 2**(K-1))`` (K = last block), or
  ``(output, features)`` with ``features["block{k}_relu2"]`` (the SSFD taps, before the norm)
  and ``features["block{k}"]`` (the block outputs the next level and a decoder consume),
  k = 1..K, all float32. Pooling floors odd sizes as ``torch.nn.MaxPool2d(2)`` does; every
  spatial size must be >= 2**(K-1).
  """

  chans: int = 20
  num_pool_layers: int = 4
  num_groups: int = 10
  spatial_dims: int = 2
  dropout: float = 0.0
  last_tap: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def num_blocks(self) -> int:
    """Blocks this encoder builds (``num_pool_layers + 1``, or fewer with ``last_tap``)."""
    total = self.num_pool_layers + 1
    if self.last_tap is None:
      return total
    match = _TAP.match(self.last_tap)
    if match is None or not 1 <= int(match.group(1)) <= total:
      raise ValueError(f"last_tap must be None or one of {tap_names(self.num_pool_layers)}; "
                       f"got last_tap={self.last_tap!r}")
    return int(match.group(1))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    _check_config(self.chans, self.num_pool_layers, self.num_groups, self.spatial_dims,
                  self.dropout)
    num_blocks = self.num_blocks()
    _check_input(x, self.spatial_dims, "SSFDEncoder")
    factor = 2**(num_blocks - 1)
    if any(s < factor for s in x.shape[1:-1]):
      raise ValueError(f"SSFDEncoder input shape {x.shape}: every spatial size must be >= "
                       f"{factor} = 2**{num_blocks - 1} for {num_blocks} blocks")
    d = self.spatial_dims
    feats = {}
    x = x.astype(self.dtype)
    for k in range(1, num_blocks + 1):
      if k > 1:
        x = nn.max_pool(x, window_shape=(2,) * d, strides=(2,) * d)
      x, tap = DoubleConv(self.chans * 2**(k - 1), num_groups=self.num_groups,
                          dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"block{k}")(x, train=train)
      feats[f"block{k}_relu2"] = tap
      feats[f"block{k}"] = x.astype(jnp.float32)
    out = x.astype(jnp.float32)
    if return_features:
      return out, feats
    return out


class SSFDDecoderBlock(nn.Module):
  """``up`` (2x2 stride-2 transposed conv with bias) -> concat [up, skip] -> DoubleConv.

  ``__call__(x (N, *S, Cin), skip (N, *2S, features), train)`` -> ``(out, tap)``, both
  ``(N, *2S, features)`` (see :class:`DoubleConv`).
  """

  features: int
  num_groups: int = 10
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = UpConv(self.features, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
               kernel_init=conv_init, name="up")(x)
    x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
    return DoubleConv(self.features, num_groups=self.num_groups, dropout=self.dropout,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="conv_block")(
                          x, train=train)


class SSFDUNet(nn.Module):
  """The SSFD in-painting UNet: :class:`SSFDEncoder` (``encoder``) + decoder + 1x1 output conv.

  Attributes:
    out_channels: output channels (1 for grayscale in-painting).
    chans, num_pool_layers, num_groups, spatial_dims: as in :class:`SSFDEncoder`.
    dropout: dropout after every block's GroupNorm in train mode (0.1 in the paper).
    dtype: compute dtype; GroupNorm, features and the output are float32.
    param_dtype: parameter dtype.

  Variables: ``encoder`` (exactly an :class:`SSFDEncoder` of the same configuration),
  ``decoder{k}`` (k = L..1, each ``up`` + ``conv_block``), ``output_conv``.

  ``__call__(x (N, *S, Cin), train=False, return_features=False)`` -> ``(N, *S, out_channels)``
  float32, or ``(output, features)`` with the encoder's features (``block{k}_relu2``,
  ``block{k}``) plus ``decoder{k}_relu2`` and ``decoder{k}`` (``(N, *S / 2**(k-1),
  chans * 2**(k-1))``). Every spatial size must be divisible by ``2**num_pool_layers``.
  """

  out_channels: int = 1
  chans: int = 20
  num_pool_layers: int = 4
  num_groups: int = 10
  spatial_dims: int = 2
  dropout: float = 0.1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    _check_config(self.chans, self.num_pool_layers, self.num_groups, self.spatial_dims,
                  self.dropout)
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    _check_input(x, self.spatial_dims, "SSFDUNet")
    factor = 2**self.num_pool_layers
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(
          f"SSFDUNet input shape {x.shape}: every spatial size must be divisible by "
          f"{factor} = 2**num_pool_layers (num_pool_layers={self.num_pool_layers})")
    common = dict(num_groups=self.num_groups, dropout=self.dropout, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    h, feats = SSFDEncoder(chans=self.chans, num_pool_layers=self.num_pool_layers,
                           spatial_dims=self.spatial_dims, name="encoder", **common)(
                               x, train=train, return_features=True)
    h = h.astype(self.dtype)
    for k in range(self.num_pool_layers, 0, -1):
      h, tap = SSFDDecoderBlock(self.chans * 2**(k - 1), name=f"decoder{k}", **common)(
          h, feats[f"block{k}"], train=train)
      feats[f"decoder{k}_relu2"] = tap
      feats[f"decoder{k}"] = h.astype(jnp.float32)
    d = self.spatial_dims
    out = nn.Conv(self.out_channels, kernel_size=(1,) * d, use_bias=True, dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=conv_init,
                  bias_init=nn.initializers.zeros, name="output_conv")(h).astype(jnp.float32)
    if return_features:
      return out, feats
    return out
