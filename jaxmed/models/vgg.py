"""VGG-16 (configuration "D"), with or without BatchNorm, channels-last ``(N, H, W, C)``.

The layer order is torchvision's ``vgg16`` / ``vgg16_bn`` ``features`` (so its checkpoints load
with :mod:`jaxmed.interop.vgg`): 13 3x3 convs with padding 1 and a bias, each followed by ReLU
(conv -> BatchNorm -> ReLU with ``batch_norm``), and a 2x2 stride-2 max-pool closing each of the
5 blocks. Module names: ``conv{b}_{i}`` and ``bn{b}_{i}`` (block ``b = 1..5``, conv ``i``), and
for the optional classifier ``fc1``, ``fc2``, ``fc3``.

Every ReLU and every pool is a named tap, in network order::

  relu1_1 relu1_2 pool1  relu2_1 relu2_2 pool2  relu3_1 relu3_2 relu3_3 pool3
  relu4_1 relu4_2 relu4_3 pool4  relu5_1 relu5_2 relu5_3 pool5

The model does not normalise its input: torchvision's ImageNet weights expect RGB in [0, 1]
standardised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); LPIPS applies its
own scaling layer to [-1, 1] input. Perceptual losses read a few taps: ``taps=(...)`` runs the
network only up to the deepest one.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models._utils import check_rate
from jaxmed.models.blocks import kaiming_fan_out_init, make_norm

# torchvision's cfgs["D"]: conv widths, "M" = max-pool.
CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_EPS = 1e-5


def _layer_names() -> tuple[str, ...]:
  names, block, conv = [], 1, 1
  for v in CFG:
    if v == "M":
      names.append(f"pool{block}")
      block, conv = block + 1, 1
    else:
      names.append(f"relu{block}_{conv}")
      conv += 1
  return tuple(names)


LAYER_NAMES = _layer_names()
"""Every tap of :class:`VGG16`, in network order (one entry per element of :data:`CFG`)."""
# The taps LPIPS reads, 64/128/256/512/512 channels.
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

conv_init = kaiming_fan_out_init  # torchvision
dense_init = nn.initializers.normal(0.01)  # torchvision


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``(n_out, n_in)`` averaging weights of torch's adaptive average pooling along one axis."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool_2d(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``torch.nn.AdaptiveAvgPool2d(size)`` on ``(N, H, W, C)`` -> ``(N, *size, C)``."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  mh = jnp.asarray(_adaptive_matrix(x.shape[1], size[0]))
  mw = jnp.asarray(_adaptive_matrix(x.shape[2], size[1]))
  return jnp.einsum("nhwc,ph,qw->npqc", x, mh, mw, precision=jax.lax.Precision.HIGHEST)


class VGG16(nn.Module):
  """VGG-16 features (torchvision order) and an optional classifier.

  Attributes:
    batch_norm: conv -> BatchNorm -> ReLU (torchvision ``vgg16_bn``); BatchNorm eps 1e-5, torch
      momentum 0.1, running statistics in ``batch_stats``.
    include_top: add the classifier: adaptive average pool to 7x7, flatten in torch's
      ``(C, H, W)`` order, ``fc1`` (-> ``head_width``) ReLU dropout, ``fc2`` (-> ``head_width``)
      ReLU dropout, ``fc3`` (-> ``num_classes``). Off by default: perceptual use needs only
      the features.
    num_classes: classifier outputs.
    head_width: hidden width of the classifier (4096 in VGG-16).
    dropout: classifier dropout rate (in train mode, needs the ``dropout`` rng).
    width: multiplies every conv width (``max(1, int(C * width))``; 1.0 is VGG-16, 0.25 a
      quarter-width network for CPU-sized runs); module names do not change.
    dtype: compute dtype of convs and dense layers; norms, taps and outputs are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, H, W, Cin), train=False, return_features=False, taps=None)``:

  * ``taps=None``: the logits ``(N, num_classes)`` with ``include_top``, else ``pool5``
    ``(N, H / 32, W / 32, 512)``; with ``return_features`` also ``{tap: array}`` for every
    name of :data:`LAYER_NAMES` (``relu{b}_*`` are ``(N, H / 2**(b-1), W / 2**(b-1), C_b)``,
    ``pool{b}`` ``(N, H / 2**b, W / 2**b, C_b)``, ``C_b = 64, 128, 256, 512, 512`` times
    ``width``; sizes rounded down by every pool).
  * ``taps=("relu1_2", "relu3_3")``: only ``{tap: array}`` for the requested taps; layers past
    the deepest one (and the classifier) are not run.

  Every spatial size must be at least ``2**k`` for the ``k`` pools that are run.
  """

  batch_norm: bool = False
  include_top: bool = False
  num_classes: int = 1000
  head_width: int = 4096
  dropout: float = 0.5
  width: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self, x: jax.Array, taps: tuple[str, ...] | None,
                return_features: bool) -> int:
    """Checks the configuration and input; returns the number of layers (CFG entries) to run."""
    if self.include_top:
      if self.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got num_classes={self.num_classes}")
      if self.head_width < 1:
        raise ValueError(f"head_width must be >= 1; got head_width={self.head_width}")
    check_rate(self.dropout, "dropout")
    if not self.width > 0:
      raise ValueError(f"width must be > 0; got width={self.width}")
    if x.ndim != 4:
      raise ValueError(f"VGG16 expects x of shape (N, H, W, C) (ndim 4); got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[-1] < 1:
      raise ValueError(f"VGG16 input must have N >= 1 and C >= 1; got shape {x.shape}")
    num_layers = len(CFG)
    if taps is not None:
      if return_features:
        raise ValueError("pass either taps=... (returns only those features) or "
                         "return_features=True, not both")
      if not taps:
        raise ValueError("taps must name at least one layer; got taps=()")
      unknown = [t for t in taps if t not in LAYER_NAMES]
      if unknown:
        raise ValueError(f"unknown VGG16 taps {unknown}; valid taps: {LAYER_NAMES}")
      num_layers = 1 + max(LAYER_NAMES.index(t) for t in taps)
    pools = sum(1 for v in CFG[:num_layers] if v == "M")
    if min(x.shape[1:3]) < 2**pools:
      raise ValueError(f"VGG16 input shape {x.shape}: H and W must be >= {2**pools} for the "
                       f"{pools} max-pool(s) up to layer {LAYER_NAMES[num_layers - 1]}")
    return num_layers

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False,
               taps: Sequence[str] | str | None = None):
    if isinstance(taps, str):
      taps = (taps,)
    taps = None if taps is None else tuple(taps)
    num_layers = self._validate(x, taps, return_features)
    feats = {}
    block, conv = 1, 1
    for v, name in zip(CFG[:num_layers], LAYER_NAMES):
      if v == "M":
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        block, conv = block + 1, 1
      else:
        x = nn.Conv(max(1, int(v * self.width)), kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                    dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=conv_init,
                    bias_init=nn.initializers.zeros, name=f"conv{block}_{conv}")(x)
        x = x.astype(jnp.float32)
        if self.batch_norm:
          x = make_norm("batch", train=train, epsilon=_EPS, param_dtype=self.param_dtype,
                        name=f"bn{block}_{conv}")(x)
        x = nn.relu(x)
        conv += 1
      feats[name] = x.astype(jnp.float32)
      x = x.astype(self.dtype)

    if taps is not None:
      return {t: feats[t] for t in taps}
    out = feats["pool5"]
    if self.include_top:
      y = adaptive_avg_pool_2d(out, (7, 7))
      y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1).astype(self.dtype)
      dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=dense_init,
                   bias_init=nn.initializers.zeros)
      for i in (1, 2):
        y = nn.relu(nn.Dense(self.head_width, name=f"fc{i}", **dense)(y))
        y = nn.Dropout(rate=self.dropout, deterministic=not train)(y)
      out = nn.Dense(self.num_classes, name="fc3", **dense)(y).astype(jnp.float32)
    if return_features:
      return out, feats
    return out
