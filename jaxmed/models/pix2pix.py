"""pix2pix networks: the U-Net-256 generator and the 70x70 PatchGAN discriminator.

Layer for layer as ``models/networks.py`` of junyanz/pytorch-CycleGAN-and-pix2pix
(``UnetGenerator`` built from nested ``UnetSkipConnectionBlock`` s, and ``NLayerDiscriminator``),
channels-last and with the nesting unrolled into levels.

Generator, ``L = num_downs`` levels; ``inner_k = ngf * min(2**k, 8)``; level k (0 = outermost):

  down_{k}   k = 0:        Conv4x4 s2 p1 (no norm)                 in -> inner_0
             0 < k < L-1:  LeakyReLU(0.2), Conv4x4 s2 p1, Norm     inner_{k-1} -> inner_k
             k = L-1:      LeakyReLU(0.2), Conv4x4 s2 p1 (no norm) inner_{L-2} -> inner_{L-1}
  up_{k}     k = L-1:      ReLU, ConvT4x4 s2 p1, Norm              inner_{L-1} -> inner_{L-2}
             0 < k < L-1:  ReLU, ConvT4x4 s2 p1, Norm, Dropout if 4 <= k <= L-2
                                                                    2 inner_k -> inner_{k-1}
             k = 0:        ReLU, ConvT4x4 s2 p1 (bias), Tanh        2 inner_0 -> out_channels

and the input of ``up_{k-1}`` is ``concat[LeakyReLU(x_k), up_k]`` where ``x_k`` is the output of
``down_{k-1}``. The LeakyReLU on the skip is the reference's behaviour: its
``LeakyReLU(0.2, inplace=True)`` rewrites the block input before ``torch.cat([x, model(x)])``
reads it (see lanpa/tensorboardX#215, which shows the traced graph). Convolutions have a bias
only with ``norm="instance"`` (``use_bias = norm_layer == InstanceNorm2d``; so ``"none"`` gives
bias-free convs too, as in the reference), the outermost down conv included (it has no norm after
it, and still no bias with BatchNorm); only the final up conv always has one. Dropout 0.5 sits in
the ``num_downs - 5`` middle blocks (3 for U-Net-256), as pix2pix's default ``use_dropout``
(``--no_dropout`` off) builds them.

Discriminator (``NLayerDiscriminator``), ``n_layers`` = 3 gives the 70x70 PatchGAN:

  layer0                Conv4x4 s2 p1 (bias), LeakyReLU(0.2)         in -> ndf
  layer{n}, n<n_layers  Conv4x4 s2 p1, Norm, LeakyReLU(0.2)          -> ndf * min(2**n, 8)
  layer{n_layers}       Conv4x4 s1 p1, Norm, LeakyReLU(0.2)          -> ndf * min(2**n_layers, 8)
  layer{n_layers+1}     Conv4x4 s1 p1 (bias)                          -> 1 (logits, no sigmoid)

A 256x256 input gives a 30x30 patch map; each output sees a 70x70 input window.

Norms: ``"batch"`` (BatchNorm2d, momentum 0.1 = Flax 0.9, eps 1e-5, running statistics in eval),
``"instance"`` (InstanceNorm2d with ``affine=False`` and no running statistics, as
``get_norm_layer('instance')``), ``"none"``. Norms, features and outputs are float32.

Weights initialise as ``init_weights(init_type='normal', gain=0.02)``: conv kernels N(0, 0.02),
biases 0, BatchNorm scale N(1, 0.02). The transposed convs are ``flax.linen.ConvTranspose``
(``padding=2`` on the dilated input equals torch's ``padding=1``); their kernels are stored
spatially flipped relative to torch's ``ConvTranspose2d.weight``, i.e. convert them with
:func:`jaxmed.interop.state_dict.flax_conv_transpose_kernel`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmed.models._utils import check_choice, check_rate
from jaxmed.models.blocks import make_norm

NORMS = ("batch", "instance", "none")
_EPS = 1e-5
_SLOPE = 0.2

kernel_init = nn.initializers.normal(0.02)


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """BatchNorm scale ~ N(1, 0.02), as pix2pix's ``init_weights``."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class Norm(nn.Module):
  """BatchNorm / parameter-free InstanceNorm / identity, computed in float32.

  Input ``(N, H, W, C)`` -> float32 ``(N, H, W, C)``; ``train`` selects batch statistics (and
  updates ``batch_stats``) for ``"batch"``.
  """

  norm: str = "batch"
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = x.astype(jnp.float32)
    if self.norm == "batch":
      return make_norm("batch", train=train, epsilon=_EPS, scale_init=_bn_scale_init,
                       param_dtype=self.param_dtype, name="bn")(x)
    if self.norm == "instance":
      return make_norm("instance", epsilon=_EPS, affine=False, param_dtype=self.param_dtype,
                       name="in")(x)
    return x


def _check_norm(norm: str) -> None:
  check_choice(norm, NORMS, "norm")


def _check_image(x: jax.Array, what: str) -> None:
  if x.ndim != 4 or x.shape[-1] < 1:
    raise ValueError(f"{what} expects x of shape (N, H, W, C) with C >= 1; got shape {x.shape}")


class _Down(nn.Module):
  """[LeakyReLU] -> Conv4x4 s2 p1 -> [Norm]: one down step of a UnetSkipConnectionBlock."""

  features: int
  activate: bool
  norm: str
  use_bias: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.activate:
      x = nn.leaky_relu(x, _SLOPE)
    x = nn.Conv(self.features, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=kernel_init, name="conv")(x)
    return Norm(self.norm, self.param_dtype, name="norm")(x, train=train)


class _Up(nn.Module):
  """ReLU -> ConvT4x4 s2 p1 -> Norm (or Tanh when ``outermost``) -> [Dropout]."""

  features: int
  norm: str
  use_bias: bool
  outermost: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.relu(x)
    # Flax pads the stride-dilated input: k - 1 - p = 2 on each side gives torch's output 2H.
    x = nn.ConvTranspose(self.features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                         use_bias=self.use_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, kernel_init=kernel_init,
                         name="conv")(x)
    if self.outermost:
      return jnp.tanh(x.astype(jnp.float32))
    x = Norm(self.norm, self.param_dtype, name="norm")(x, train=train)
    if self.dropout > 0.0:
      x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    return x


class UNetGenerator(nn.Module):
  """pix2pix ``UnetGenerator`` (U-Net-256 with ``num_downs=8``), channels-last.

  Attributes:
    out_channels: output channels (Tanh range [-1, 1]).
    num_downs: down-samplings (8 for 256x256, 7 for 128x128); at least 5.
    ngf: filters of the outermost level (64).
    norm: "batch" (pix2pix default) | "instance" | "none".
    dropout: rate of the dropout in the ``num_downs - 5`` middle up-blocks (0.5; 0 disables).
    dtype: compute dtype of the convolutions; norms, features and output are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, H, W, Cin), train=False, return_features=False)`` -> ``(N, H, W,
  out_channels)`` float32 in [-1, 1], or ``(output, features)`` with ``down_{k}``
  (``(N, H / 2**(k+1), W / 2**(k+1), inner_k)``, after the level's norm, k = 0..L-1) and
  ``up_{k}`` (``(N, H / 2**k, W / 2**k, inner_{k-1})``, before the skip concat, k = 1..L-1).
  H and W must be divisible by ``2**num_downs``. Variables: ``down_{k}`` / ``up_{k}``, each
  with ``conv`` and (where the reference has one) ``norm``.
  """

  out_channels: int = 3
  num_downs: int = 8
  ngf: int = 64
  norm: str = "batch"
  dropout: float = 0.5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _validate(self, x: jax.Array) -> None:
    _check_norm(self.norm)
    if self.num_downs < 5:
      raise ValueError(f"num_downs must be >= 5 (the reference always builds 5 levels); "
                       f"got num_downs={self.num_downs}")
    if self.ngf < 1:
      raise ValueError(f"ngf must be >= 1; got ngf={self.ngf}")
    if self.out_channels < 1:
      raise ValueError(f"out_channels must be >= 1; got out_channels={self.out_channels}")
    check_rate(self.dropout, "dropout")
    _check_image(x, "UNetGenerator")
    factor = 2**self.num_downs
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNetGenerator input shape {x.shape}: H and W must be divisible by "
                       f"{factor} = 2**num_downs (num_downs={self.num_downs})")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    self._validate(x)
    levels = self.num_downs
    inner = [self.ngf * min(2**k, 8) for k in range(levels)]
    use_bias = self.norm == "instance"
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = {}
    skips = []
    h = x.astype(self.dtype)
    for k in range(levels):
      if k > 0:
        skips.append(nn.leaky_relu(h, _SLOPE))  # the reference's in-place LeakyReLU
      h = _Down(inner[k], activate=k > 0, norm="none" if k in (0, levels - 1) else self.norm,
                use_bias=use_bias, name=f"down_{k}", **common)(
                    h, train=train)
      feats[f"down_{k}"] = h
      h = h.astype(self.dtype)
    for k in range(levels - 1, 0, -1):
      h = _Up(inner[k - 1], norm=self.norm, use_bias=use_bias,
              dropout=self.dropout if 4 <= k <= levels - 2 else 0.0, name=f"up_{k}",
              **common)(h, train=train)
      feats[f"up_{k}"] = h
      h = jnp.concatenate([skips[k - 1], h.astype(self.dtype)], axis=-1)
    out = _Up(self.out_channels, norm="none", use_bias=True, outermost=True, name="up_0",
              **common)(h, train=train)
    if return_features:
      return out, {k: v.astype(jnp.float32) for k, v in feats.items()}
    return out


class PatchGANDiscriminator(nn.Module):
  """pix2pix ``NLayerDiscriminator`` (``n_layers=3``: the 70x70 PatchGAN), channels-last.

  Attributes:
    ndf: filters of the first conv (64).
    n_layers: stride-2 convs (3); the receptive field is 70 for 3, 34 for 2, 142 for 4.
    norm: "batch" (pix2pix default) | "instance" | "none".
    dtype: compute dtype of the convolutions; norms, features and logits are float32.
    param_dtype: parameter dtype.

  ``__call__(x (N, H, W, Cin), train=False, return_features=False)`` -> patch logits
  ``(N, H', W', 1)`` float32 (``H' = H // 2**n_layers - 2``; 30 for 256), or ``(logits,
  features)`` with ``layer0`` .. ``layer{n_layers}`` (after each LeakyReLU) and
  ``layer{n_layers+1}`` (= the logits), for feature-matching losses. Variables: ``conv_{i}``,
  i = 0..n_layers+1, and ``norm_{i}``, i = 1..n_layers.
  """

  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def output_size(self, size: int) -> int:
    """Patch-map size for an input size (conv 4x4 p1: ``s2`` gives floor(n/2), ``s1`` n - 1)."""
    for _ in range(self.n_layers):
      size = (size + 2 - 4) // 2 + 1
    return size - 2

  def _validate(self, x: jax.Array) -> None:
    _check_norm(self.norm)
    if self.n_layers < 1:
      raise ValueError(f"n_layers must be >= 1; got n_layers={self.n_layers}")
    if self.ndf < 1:
      raise ValueError(f"ndf must be >= 1; got ndf={self.ndf}")
    _check_image(x, "PatchGANDiscriminator")
    if min(x.shape[1], x.shape[2]) < 2 or min(self.output_size(s) for s in x.shape[1:3]) < 1:
      raise ValueError(f"PatchGANDiscriminator input shape {x.shape} is too small for "
                       f"n_layers={self.n_layers}: the patch map would be empty")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
    self._validate(x)
    use_bias = self.norm == "instance"
    conv = dict(kernel_size=(4, 4), padding=((1, 1), (1, 1)), dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=kernel_init)
    feats = {}
    h = nn.Conv(self.ndf, strides=(2, 2), use_bias=True, name="conv_0", **conv)(
        x.astype(self.dtype))
    h = nn.leaky_relu(h.astype(jnp.float32), _SLOPE)
    feats["layer0"] = h
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = nn.Conv(self.ndf * min(2**n, 8), strides=(stride, stride), use_bias=use_bias,
                  name=f"conv_{n}", **conv)(h.astype(self.dtype))
      h = Norm(self.norm, self.param_dtype, name=f"norm_{n}")(h, train=train)
      h = nn.leaky_relu(h, _SLOPE)
      feats[f"layer{n}"] = h
    out = nn.Conv(1, strides=(1, 1), use_bias=True, name=f"conv_{self.n_layers + 1}", **conv)(
        h.astype(self.dtype)).astype(jnp.float32)
    feats[f"layer{self.n_layers + 1}"] = out
    if return_features:
      return out, feats
    return out
