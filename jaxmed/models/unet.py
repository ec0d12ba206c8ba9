"""An nnU-Net-like UNet for 2D ``(N, H, W, C)`` or 3D ``(N, D, H, W, C)`` images.

Layer names are part of the API (transfer learning swaps ``input_conv`` / ``output_conv``
and keeps everything else; perceptual metrics read named features):

  input_conv                ConvNormAct, in_channels -> features[0]
  encoder_{k}, k=0..L-2     ConvBlock at level k (1 / 2**k resolution)
  bottleneck                ConvBlock at level L-1
  upsample_{k}, k=L-2..0    UpConv to level k resolution, -> features[k] channels
  decoder_{k}, k=L-2..0     ConvBlock on concat(upsample_{k}, encoder_{k})
  output_conv               1x1 nn.Conv with bias, features[0] -> out_channels

Only ``input_conv`` and ``output_conv`` have parameters whose shapes depend on the number of
input or output channels.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("instance", "group", "batch", "none")
DOWNSAMPLES = ("conv", "maxpool")
_EPS = 1e-5

conv_init = nn.initializers.he_normal()


def _check_norm(norm: str, num_groups: int, features: Sequence[int]) -> None:
  """Validates a norm name and, for group norm, the divisibility of every feature count."""
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}; got norm={norm!r}")
  if norm == "group":
    if num_groups < 1:
      raise ValueError(f"num_groups must be >= 1; got num_groups={num_groups}")
    bad = [f for f in features if f % num_groups]
    if bad:
      raise ValueError(
          f"norm='group' needs every level's features divisible by num_groups={num_groups}; "
          f"features={tuple(features)} has {tuple(bad)} not divisible")


class UpConv(nn.Module):
  """Transposed conv with kernel = stride = 2, as one einsum over the kernel taps + reshape.

  ``out[n, 2i+a, 2j+b, c] = sum_k x[n, i, j, k] * kernel[a, b, k, c] + bias[c]`` (and likewise
  in 3D). This equals ``torch.nn.functional.conv_transpose{2,3}d`` with stride 2 and weight
  ``kernel`` transposed to ``(Cin, Cout, *k)`` (no spatial flip), and avoids
  ``lax.conv_transpose``, which is very slow for 3D in XLA.

  Attributes:
    features: output channels Cout.
    use_bias: add a learnable bias.

  Input ``(N, *S, Cin)`` -> output ``(N, *(2 * S), Cout)`` in ``dtype``.
  """

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = conv_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 3:
      raise ValueError(f"UpConv input must be (N, *spatial, C); got shape {x.shape}")
    if self.features < 1:
      raise ValueError(f"UpConv features must be >= 1; got features={self.features}")
    d = x.ndim - 2
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (2,) * d + (cin, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # Spatial letters s_i for the input, tap letters t_i for the kernel; the output interleaves
    # them (s_0, t_0, s_1, t_1, ...) so that the reshape merges (i, a) into 2i + a.
    letters = string.ascii_letters
    s, t = letters[:d], letters[d:2 * d]
    n, k, c = "N", "K", "C"
    spec = (f"{n}{s}{k},{t}{k}{c}->{n}" + "".join(si + ti for si, ti in zip(s, t)) + c)
    y = jnp.einsum(spec, x, kernel)
    y = y.reshape((x.shape[0],) + tuple(2 * size for size in x.shape[1:-1]) + (self.features,))
    if bias is not None:
      y = y + bias
    return y


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
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got dropout={self.dropout}")
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
    x = x.astype(jnp.float32)
    common = dict(epsilon=_EPS, dtype=jnp.float32, param_dtype=self.param_dtype,
                  use_fast_variance=False, name="norm")
    if self.norm == "instance":
      x = nn.InstanceNorm(**common)(x)
    elif self.norm == "group":
      x = nn.GroupNorm(num_groups=self.num_groups, **common)(x)
    elif self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, **common)(x)
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
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3; got spatial_dims={self.spatial_dims}")
    if len(self.features) < 2:
      raise ValueError(f"features needs at least 2 levels; got features={tuple(self.features)}")
    if any(int(f) < 1 for f in self.features):
      raise ValueError(f"features must all be >= 1; got features={tuple(self.features)}")
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    if self.convs_per_level < 1:
      raise ValueError(f"convs_per_level must be >= 1; got convs_per_level={self.convs_per_level}")
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f"downsample must be one of {DOWNSAMPLES}; got {self.downsample!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1); got dropout={self.dropout}")
    _check_norm(self.norm, self.num_groups, self.features)
    if x.ndim != self.spatial_dims + 2:
      layout = "(N, H, W, C)" if self.spatial_dims == 2 else "(N, D, H, W, C)"
      raise ValueError(
          f"UNet with spatial_dims={self.spatial_dims} expects x of shape {layout} "
          f"(ndim {self.spatial_dims + 2}); got shape {x.shape}")
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
