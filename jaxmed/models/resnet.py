"""ResNet-18/34/50 for 2D ``(N, H, W, C)`` or 3D ``(N, D, H, W, C)`` images.

The layout is torchvision's ResNet v1.5 (the stride of a down-sampling Bottleneck sits on its
3x3 conv), with the options of MONAI's ``monai.networks.nets.ResNet`` that change the weights
or the forward pass, so that both checkpoints load (:mod:`jaxmed.interop.resnet`):

  conv1                 stem conv, kernel ``conv1_t_size`` (7), stride ``conv1_t_stride`` (2),
                        padding ``kernel // 2``, no bias
  bn1                   norm of the stem, then ReLU (the ``stem`` feature), then a 3x3 max-pool
                        with stride 2 and padding 1 unless ``no_max_pool``
  layer{i}_{j}          block ``j`` of stage ``i = 1..4``: BasicBlock (conv1 3x3, bn1, ReLU,
                        conv2 3x3, bn2) or Bottleneck (conv1 1x1, bn1, ReLU, conv2 3x3 with the
                        stride, bn2, ReLU, conv3 1x1 to 4x the width, bn3); the first block of
                        stages 2-4 has stride 2. When the block changes the stride or the width
                        the shortcut is ``downsample_conv`` (1x1, stride) + ``downsample_norm``
                        (shortcut "B") or a strided subsampling zero-padded to the new width
                        (shortcut "A", no parameters). Sum, then ReLU.
  fc                    optional Dense head on the global average pool

The ``bn*`` / ``downsample_norm`` modules are BatchNorm (``norm="batch"``) or GroupNorm
(``norm="group"``); the names do not change with the norm type.

To reproduce MONAI's defaults pass ``conv1_t_stride=1, bias_downsample=True`` (and
``shortcut_type="A"`` for MONAI's ``resnet18`` / ``resnet34`` helpers); torchvision's ResNet is
the default configuration here (stride 2, shortcut "B", no bias in the shortcut conv). Note that
MONAI's ``norm`` argument only reaches the stem norm (its blocks always use BatchNorm); here
``norm`` applies to every norm layer. MONAI's shortcut "A" concatenates ``out.data``, which cuts
the gradient through the shortcut; here the gradient flows (the forward pass is the same).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models._utils import (check_choice, check_group_channels, check_input,
                                  check_spatial_dims, spatial_tuple)
from jaxmed.models.blocks import kaiming_fan_out_init, make_norm, torch_default_init

BLOCKS = ("basic", "bottleneck")
NORMS = ("batch", "group")
SHORTCUTS = ("A", "B")
EXPANSION = {"basic": 1, "bottleneck": 4}
# depth -> (block, blocks per stage), as torchvision and MONAI.
CONFIGS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
           50: ("bottleneck", (3, 4, 6, 3))}
FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4", "pooled")
_EPS = 1e-5

conv_init = kaiming_fan_out_init  # torchvision / MONAI
dense_init = torch_default_init  # torch.nn.Linear's default


def _norm(kind: str, num_groups: int, train: bool, param_dtype: Any, name: str) -> nn.Module:
  """BatchNorm (torch momentum 0.1 == Flax momentum 0.9) or GroupNorm, eps 1e-5, in float32."""
  return make_norm(kind, train=train, num_groups=num_groups, epsilon=_EPS,
                   param_dtype=param_dtype, name=name)


def _conv(features: int, kernel: Sequence[int], strides: Sequence[int], use_bias: bool,
          dtype: Any, param_dtype: Any, name: str) -> nn.Conv:
  """A torch-style conv: explicit symmetric padding ``kernel // 2``."""
  return nn.Conv(features, kernel_size=tuple(kernel), strides=tuple(strides),
                 padding=tuple((k // 2, k // 2) for k in kernel), use_bias=use_bias,
                 dtype=dtype, param_dtype=param_dtype, kernel_init=conv_init,
                 bias_init=nn.initializers.zeros, name=name)


class ResNetBlock(nn.Module):
  """A BasicBlock (``block="basic"``) or a v1.5 Bottleneck (``block="bottleneck"``).

  Attributes:
    planes: width of the block; the output has ``planes * EXPANSION[block]`` channels.
    block: "basic" | "bottleneck".
    strides: stride of the 3x3 conv (and of the shortcut).
    shortcut_type: "A" (subsample + zero channels) or "B" (1x1 conv + norm), used only when the
      stride or the width changes.
    bias_downsample: bias in the shortcut conv (shortcut "B").
    norm: "batch" | "group"; num_groups: groups for "group".

  Input ``(N, *S, Cin)`` -> output ``(N, *ceil(S / strides), planes * expansion)`` in ``dtype``.
  """

  planes: int
  block: str = "basic"
  strides: int = 1
  shortcut_type: str = "B"
  bias_downsample: bool = False
  norm: str = "batch"
  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    d = x.ndim - 2
    out_ch = self.planes * EXPANSION[self.block]
    conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    one, three, stride = (1,) * d, (3,) * d, (self.strides,) * d

    def norm(y, name):
      return _norm(self.norm, self.num_groups, train, self.param_dtype, name)(
          y.astype(jnp.float32))

    if self.block == "basic":
      y = _conv(self.planes, three, stride, False, name="conv1", **conv)(x)
      y = nn.relu(norm(y, "bn1")).astype(self.dtype)
      y = _conv(self.planes, three, one, False, name="conv2", **conv)(y)
      y = norm(y, "bn2")
    else:
      y = _conv(self.planes, one, one, False, name="conv1", **conv)(x)
      y = nn.relu(norm(y, "bn1")).astype(self.dtype)
      y = _conv(self.planes, three, stride, False, name="conv2", **conv)(y)
      y = nn.relu(norm(y, "bn2")).astype(self.dtype)
      y = _conv(out_ch, one, one, False, name="conv3", **conv)(y)
      y = norm(y, "bn3")

    residual = x
    if self.strides != 1 or x.shape[-1] != out_ch:
      if self.shortcut_type == "B":
        residual = _conv(out_ch, one, stride, self.bias_downsample, name="downsample_conv",
                         **conv)(x)
        residual = norm(residual, "downsample_norm")
      else:  # "A": avg-pool with kernel 1 = subsampling, then zero channels (MONAI).
        residual = x[(slice(None),) + (slice(None, None, self.strides),) * d]
        residual = jnp.pad(residual, ((0, 0),) * (d + 1) + ((0, out_ch - x.shape[-1]),))
    return nn.relu(y + residual.astype(jnp.float32)).astype(self.dtype)


class ResNet(nn.Module):
  """ResNet (torchvision v1.5 layout, MONAI options), 2D or 3D, channels-last.

  Attributes:
    block: "basic" (ResNet-18/34) | "bottleneck" (ResNet-50).
    layers: blocks in each of the 4 stages, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_inplanes: stage widths before ``widen_factor`` and the Bottleneck expansion (the stem
      has ``block_inplanes[0]`` channels).
    spatial_dims: 2 or 3.
    num_classes: size of the ``fc`` head on the pooled features; None or 0 for no head.
    norm: "batch" (running statistics in the ``batch_stats`` collection, eps 1e-5, torch
      momentum 0.1) | "group" (GroupNorm with ``num_groups`` groups, eps 1e-5).
    num_groups: groups for "group"; every width must be divisible by it.
    conv1_t_size: stem conv kernel size (int or one per spatial axis), padding ``size // 2``.
    conv1_t_stride: stem conv stride (int or one per spatial axis); torchvision 2, MONAI's
      default 1.
    no_max_pool: skip the max-pool after the stem.
    shortcut_type: "B" (1x1 conv + norm, torchvision) or "A" (subsample + zero-pad channels,
      no parameters; MONAI's resnet18/34 helpers).
    widen_factor: multiplies ``block_inplanes`` (``int(w * widen_factor)``, as MONAI).
    bias_downsample: bias in the shortcut conv ("B"); torchvision False, MONAI's default True.
    dtype: compute dtype of the convs and the head; norms run in float32, outputs are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, *S, Cin), train=False, return_features=False)`` returns the logits
  ``(N, num_classes)`` (or the pooled features ``(N, C)`` without a head), float32, or
  ``(output, features)`` with float32 ``features``:

    stem     ``(N, *S / conv1_t_stride, block_inplanes[0])`` after the stem conv, norm and
             ReLU, *before* the max-pool
    layer1   ``(N, *S / (stride * 2), C1)`` (``/ stride`` with ``no_max_pool``) ...
    layer4   ``(N, *S / (stride * 16), C4)``; ``Ci = widths[i] * expansion``
    pooled   ``(N, C4)`` global average of ``layer4``

  (sizes divide with rounding up, as torch's.) ``train=True`` uses batch statistics and, with
  ``mutable=["batch_stats"]``, updates the running ones (Flax updates the running variance
  with the biased batch variance, torch with the unbiased one).
  """

  block: str = "basic"
  layers: Sequence[int] = (2, 2, 2, 2)
  block_inplanes: Sequence[int] = (64, 128, 256, 512)
  spatial_dims: int = 2
  num_classes: int | None = None
  norm: str = "batch"
  num_groups: int = 32
  conv1_t_size: int | Sequence[int] = 7
  conv1_t_stride: int | Sequence[int] = 2
  no_max_pool: bool = False
  shortcut_type: str = "B"
  widen_factor: float = 1.0
  bias_downsample: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def widths(self) -> tuple[int, ...]:
    """Stage widths after ``widen_factor`` (before the Bottleneck expansion)."""
    return tuple(int(w * self.widen_factor) for w in self.block_inplanes)

  def _validate(self, x: jax.Array) -> None:
    check_spatial_dims(self.spatial_dims)
    check_choice(self.block, BLOCKS, "block")
    check_choice(self.norm, NORMS, "norm")
    check_choice(self.shortcut_type, SHORTCUTS, "shortcut_type")
    if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
      raise ValueError(f"layers must be 4 block counts >= 1; got layers={tuple(self.layers)}")
    if len(self.block_inplanes) != 4:
      raise ValueError(f"block_inplanes must have 4 widths; "
                       f"got block_inplanes={tuple(self.block_inplanes)}")
    widths = self.widths()
    if any(w < 1 for w in widths):
      raise ValueError(f"widths block_inplanes * widen_factor must be >= 1; got {widths} from "
                       f"block_inplanes={tuple(self.block_inplanes)}, "
                       f"widen_factor={self.widen_factor}")
    if self.num_classes is not None and self.num_classes < 0:
      raise ValueError(f"num_classes must be None or >= 0; got num_classes={self.num_classes}")
    expansion = EXPANSION[self.block]
    if self.norm == "group":
      check_group_channels(self.num_groups, (widths[0], *widths, *(w * expansion for w in widths)))
    if self.shortcut_type == "A":
      # The zero-padded shortcut cannot narrow: every stage's input width <= its output width.
      inputs = (widths[0],) + tuple(w * expansion for w in widths[:-1])
      bad = [i + 1 for i, (a, w) in enumerate(zip(inputs, widths)) if a > w * expansion]
      if bad:
        raise ValueError(f"shortcut_type='A' cannot reduce the channel count (stages {bad} of "
                         f"widths {widths}); use shortcut_type='B'")
    spatial_tuple(self.conv1_t_size, self.spatial_dims, "conv1_t_size")
    spatial_tuple(self.conv1_t_stride, self.spatial_dims, "conv1_t_stride")
    check_input(x, self.spatial_dims, "ResNet")
    if any(s < 1 for s in x.shape[1:]):
      raise ValueError(f"ResNet input must have non-empty spatial and channel axes; "
                       f"got shape {x.shape}")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    self._validate(x)
    d = self.spatial_dims
    widths = self.widths()
    kernel = spatial_tuple(self.conv1_t_size, d, "conv1_t_size")
    stride = spatial_tuple(self.conv1_t_stride, d, "conv1_t_stride")
    feats = {}

    x = _conv(widths[0], kernel, stride, False, self.dtype, self.param_dtype, "conv1")(x)
    x = _norm(self.norm, self.num_groups, train, self.param_dtype, "bn1")(x.astype(jnp.float32))
    x = nn.relu(x)
    feats["stem"] = x
    x = x.astype(self.dtype)
    if not self.no_max_pool:
      x = nn.max_pool(x, window_shape=(3,) * d, strides=(2,) * d, padding=((1, 1),) * d)

    for i, (width, blocks) in enumerate(zip(widths, self.layers)):
      for j in range(int(blocks)):
        x = ResNetBlock(
            width,
            block=self.block,
            strides=2 if (i > 0 and j == 0) else 1,
            shortcut_type=self.shortcut_type,
            bias_downsample=self.bias_downsample,
            norm=self.norm,
            num_groups=self.num_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"layer{i + 1}_{j}",
        )(x, train=train)
      feats[f"layer{i + 1}"] = x

    pooled = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, d + 1)))
    feats["pooled"] = pooled
    out = pooled
    if self.num_classes:
      out = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=dense_init, bias_init=nn.initializers.zeros,
                     name="fc")(pooled).astype(jnp.float32)
    if return_features:
      return out, {name: v.astype(jnp.float32) for name, v in feats.items()}
    return out


def resnet(depth: int, **kwargs: Any) -> ResNet:
  """ResNet-``depth`` for ``depth`` in 18, 34, 50; ``kwargs`` are :class:`ResNet` attributes."""
  if depth not in CONFIGS:
    raise ValueError(f"depth must be one of {tuple(CONFIGS)}; got depth={depth}")
  for key in ("block", "layers"):
    if key in kwargs:
      raise ValueError(f"resnet(depth={depth}) sets {key}; use ResNet(...) to choose it")
  block, layers = CONFIGS[depth]
  return ResNet(block=block, layers=layers, **kwargs)


def resnet18(**kwargs: Any) -> ResNet:
  """ResNet-18 (BasicBlock, 2-2-2-2); ``kwargs`` are :class:`ResNet` attributes."""
  return resnet(18, **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
  """ResNet-34 (BasicBlock, 3-4-6-3); ``kwargs`` are :class:`ResNet` attributes."""
  return resnet(34, **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
  """ResNet-50 (Bottleneck v1.5, 3-4-6-3); ``kwargs`` are :class:`ResNet` attributes."""
  return resnet(50, **kwargs)
