"""An nnU-Net-like UNet for 2D ``(N, H, W, C)`` or 3D ``(N, D, H, W, C)`` images.

Layer names are part of the API (transfer learning swaps ``input_conv`` / ``output_conv``
and keeps everything else; perceptual metrics read named features):

  input_conv                ConvNormAct, in_channels -> features[0]
  encoder_{k}, k=0..L-2     ConvBlock at level k (1 / 2**k resolution)
  bottleneck                ConvBlock at level L-1
  upsample_{k}, k=L-2..0    UpConv (:mod:`jaxmed.models.blocks`, kernel = stride = 2) to
                            level k resolution, -> features[k] channels
  decoder_{k}, k=L-2..0     ConvBlock on concat(upsample_{k}, encoder_{k})
  output_conv               1x1 nn.Conv with bias, features[0] -> out_channels

Only ``input_conv`` and ``output_conv`` have parameters whose shapes depend on the number of
input or output channels.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models._utils import (check_choice, check_group_channels, check_input, check_rate,
                                  check_spatial_dims)
from jaxmed.models.blocks import UpConv, conv_init, make_norm

NORMS = ("instance", "group", "batch", "none")
DOWNSAMPLES = ("conv", "maxpool")
_EPS = 1e-5


def _check_norm(norm: str, num_groups: int, features: Sequence[int]) -> None:
  """Validates a norm name and, for group norm, the divisibility of every feature count."""
  check_choice(norm, NORMS, "norm")
  if norm == "group":
    check_group_channels(num_groups, features)


class ConvNormAct(nn.Module):
  """Conv (kernel 3, 'same' padding) -> norm -> LeakyReLU, then dropout when ``dropout > 0``.

  The conv has a bias only when ``norm == "none"``. The norm and the activation are computed
  in float32; the output is cast to ``dtype``.

  Attributes:
    features: output channels.
    strides: conv stride (2 for nnU-Net style down-sampling).
    norm: "instance" | "group" | "batch" | "none".
    num_groups: groups for "group".
    dropout: dropout rate after the activation (uses the 'dropout' rng in train mode).
    negative_slope: LeakyReLU slope.
    kernel_size: conv kernel size along every spatial axis.

  Input ``(N, *S, Cin)`` -> output ``(N, *ceil(S / strides), features)``.
  """

  features: int
  strides: int = 1
  norm: str = "instance"
  num_groups: int = 8
  dropout: float = 0.0
  negative_slope: float = 0.01
  kernel_size: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if x.ndim < 3:
      raise ValueError(f"ConvNormAct input must be (N, *spatial, C); got shape {x.shape}")
    if self.features < 1:
      raise ValueError(f"ConvNormAct features must be >= 1; got features={self.features}")
    if self.strides < 1:
      raise ValueError(f"ConvNormAct strides must be >= 1; got strides={self.strides}")
    check_rate(self.dropout, "dropout")
    _check_norm(self.norm, self.num_groups, (self.features,))
    d = x.ndim - 2
    pad = self.kernel_size // 2
    x = nn.Conv(
        self.features,
        kernel_size=(self.kernel_size,) * d,
        strides=(self.strides,) * d,
        padding=((pad, pad),) * d,
        use_bias=self.norm == "none",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=conv_init,
        bias_init=nn.initializers.zeros,
        name="conv",
    )(x)
    x = make_norm(self.norm, train=train, num_groups=self.num_groups, epsilon=_EPS,
                  param_dtype=self.param_dtype, name="norm")(x.astype(jnp.float32))
    x = nn.leaky_relu(x, negative_slope=self.negative_slope)
    x = x.astype(self.dtype)
    if self.dropout > 0.0:
      x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    return x


class ConvBlock(nn.Module):
  """``num_convs`` ConvNormAct layers ``conv_0 .. conv_{num_convs-1}``; the first has ``strides``.

  ``num_convs == 0`` is the identity (used by ``encoder_0`` when ``convs_per_level == 1``).
  Input ``(N, *S, Cin)`` -> output ``(N, *S / strides, features)``.
  """

  features: int
  num_convs: int = 2
  strides: int = 1
  norm: str = "instance"
  num_groups: int = 8
  dropout: float = 0.0
  negative_slope: float = 0.01
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.num_convs < 0:
      raise ValueError(f"ConvBlock num_convs must be >= 0; got num_convs={self.num_convs}")
    for i in range(self.num_convs):
      x = ConvNormAct(
          self.features,
          strides=self.strides if i == 0 else 1,
          norm=self.norm,
          num_groups=self.num_groups,
          dropout=self.dropout,
          negative_slope=self.negative_slope,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"conv_{i}",
      )(x, train=train)
    return x


class UNet(nn.Module):
  """nnU-Net-like UNet (2D or 3D), channels-last.

  Attributes:
    out_channels: logits channels.
    features: channels per level, encoder top to bottom; the last is the bottleneck.
    spatial_dims: 2 or 3.
    norm: "instance" | "group" | "batch" | "none".
    num_groups: groups for "group" (every entry of ``features`` must be divisible by it).
    dropout: dropout rate after every ConvNormAct (0 disables it).
    negative_slope: LeakyReLU slope.
    convs_per_level: ConvNormAct layers per level (level 0 counts ``input_conv``).
    downsample: "conv" (strided 3x3 conv as the first conv of a level, as nnU-Net) or
      "maxpool" (2x2 max-pool before the level).
    dtype: compute dtype of convolutions; norms run in float32, outputs are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, *S, Cin), train=False, return_features=False)`` -> logits
  ``(N, *S, out_channels)`` float32, or ``(logits, features)`` where ``features`` maps
  ``encoder_{k}`` / ``decoder_{k}`` to ``(N, *S / 2**k, features[k])`` and ``bottleneck`` to
  ``(N, *S / 2**(L-1), features[-1])``, all float32. Every spatial size must be divisible by
  ``2**(len(features) - 1)``.
  """

  out_channels: int
  features: Sequence[int] = (32, 64, 128, 256, 320)
  spatial_dims: int = 2
  norm: str = "instance"
  num_groups: int = 8
  dropout: float = 0.0
  negative_slope: float = 0.01
  convs_per_level: int = 2
  downsample: str = "conv"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self, x: jax.Array) -> None:
    check_spatial_dims(self.spatial_dims)
    if len(self.features) < 2:
      raise ValueError(f"features needs at least 2 levels; got features={tuple(self.features)}")
    if any(int(f) < 1 for f in self.features):
      raise ValueError(f"features must all be >= 1; got features={tuple(self.features)}")
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    if self.convs_per_level < 1:
      raise ValueError(f"convs_per_level must be >= 1; got convs_per_level={self.convs_per_level}")
    check_choice(self.downsample, DOWNSAMPLES, "downsample")
    check_rate(self.dropout, "dropout")
    _check_norm(self.norm, self.num_groups, self.features)
    check_input(x, self.spatial_dims, "UNet")
    factor = 2 ** (len(self.features) - 1)
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(
          f"UNet input shape {x.shape}: every spatial size must be divisible by "
          f"{factor} = 2**(len(features) - 1) for features={tuple(self.features)}")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    self._validate(x)
    features = tuple(int(f) for f in self.features)
    num_levels = len(features)
    d = self.spatial_dims
    block = dict(norm=self.norm, num_groups=self.num_groups, dropout=self.dropout,
                 negative_slope=self.negative_slope, dtype=self.dtype,
                 param_dtype=self.param_dtype)
    strided = self.downsample == "conv"
    feats = {}

    x = ConvNormAct(features[0], name="input_conv", **block)(x, train=train)
    x = ConvBlock(features[0], num_convs=self.convs_per_level - 1, name="encoder_0",
                  **block)(x, train=train)
    skips = [x]
    feats["encoder_0"] = x
    for k in range(1, num_levels):
      if not strided:
        x = nn.max_pool(x, window_shape=(2,) * d, strides=(2,) * d)
      name = "bottleneck" if k == num_levels - 1 else f"encoder_{k}"
      x = ConvBlock(features[k], num_convs=self.convs_per_level, strides=2 if strided else 1,
                    name=name, **block)(x, train=train)
      feats[name] = x
      if k < num_levels - 1:
        skips.append(x)

    for k in range(num_levels - 2, -1, -1):
      x = UpConv(features[k], dtype=self.dtype, param_dtype=self.param_dtype,
                 name=f"upsample_{k}")(x)
      x = jnp.concatenate([x, skips[k]], axis=-1)
      x = ConvBlock(features[k], num_convs=self.convs_per_level, name=f"decoder_{k}",
                    **block)(x, train=train)
      feats[f"decoder_{k}"] = x

    logits = nn.Conv(
        self.out_channels,
        kernel_size=(1,) * d,
        use_bias=True,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=conv_init,
        bias_init=nn.initializers.zeros,
        name="output_conv",
    )(x).astype(jnp.float32)
    if return_features:
      return logits, {name: v.astype(jnp.float32) for name, v in feats.items()}
    return logits
