"""Shared layers of the jaxmed models, after MONAI's ``monai.networks.blocks``.

Every model that needs one of these pieces imports it from here; there is one implementation of
each. Channels-last throughout: images ``(N, H, W, C)``, volumes ``(N, D, H, W, C)``.

Patches and kernel == stride layers (one reshape + one matmul / einsum each, which XLA runs much
faster than its strided and transposed 3D convolutions, see ``REFERENCES.md``):

  grid_shape_of, patchify, unpatchify   images <-> MAE-ordered patch vectors
  patch_conv / PatchConv                conv with kernel = stride (patch embedding)
  UpConv                                transposed conv with kernel = stride = 2 (up-sampling)
  PatchEmbed                            MONAI ``PatchEmbed``: ``proj`` (PatchConv) + LayerNorm

Matrix products and convolutions:

  linear / Dense                        ``x @ kernel + bias`` (nn.Dense's variables), CPU-fast
                                        gradient
  conv3x3 / SameConv                    stride-1 'same' conv; 3D as depth-shifted 2D convs

Norms (all computed in float32 with the two-pass variance, as PyTorch):

  make_norm(kind, ...)                  "instance" | "group" | "batch" | "layer" | "none"
  GroupStatsNorm                        instance / group norm (Flax's variables), CPU-fast sums
  parse_norm / norm_from_spec           MONAI ``norm_name`` specs ("instance", ("group", {...}))

Regularisation and transformer parts:

  attention                             softmax attention, CPU-fast gradient
  DropPath                              stochastic depth per sample (timm / MONAI)
  MLP                                   Dense -> exact GELU -> dropout -> Dense -> dropout

UNETR blocks (MONAI ``dynunet_block`` / ``unetr_block`` with ``res_block=True``):

  UnetResBlock, UnetrBasicBlock, UnetrUpBlock

Argument checks shared by the models live in :mod:`jaxmed.models._utils`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.models._utils import check_choice, check_group_channels, spatial_tuple

NORMS = ("instance", "group", "batch", "layer", "none")
MONAI_NORMS = ("instance", "batch", "group")
_EPS = 1e-5

# Flax's He normal (fan_in): the default of the einsum convs below.
conv_init = nn.initializers.he_normal()
# torch.nn.Conv* / Linear default weight init (kaiming_uniform with a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision / MONAI ResNet and VGG convs: kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Swin / timm linear layers.
trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02)


# --------------------------------------------------------------------------------------------
# Patches and kernel == stride layers.


def grid_shape_of(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
  """The patch grid of an image: ``spatial_shape // patch_size`` (must divide exactly)."""
  spatial_shape = tuple(int(s) for s in spatial_shape)
  p = spatial_tuple(patch_size, len(spatial_shape), "patch_size")
  if any(s % q for s, q in zip(spatial_shape, p)):
    raise ValueError(f"every spatial size must be divisible by patch_size={p}; "
                     f"got spatial shape {spatial_shape}")
  return tuple(s // q for s, q in zip(spatial_shape, p))


def patchify(x: jax.Array, patch_size: int | Sequence[int]) -> jax.Array:
  """Images ``(N, *S, C)`` -> patch vectors ``(N, T, prod(p) * C)``, MAE order.

  Token ``t`` is patch grid position ``unravel(t, S // p)`` (row-major); its vector is the patch
  ``x[n, g_0 p_0 : (g_0 + 1) p_0, ..., :]`` flattened in the order ``(p_0, ..., p_{d-1}, C)``
  (channel fastest), as ``patchify`` of MAE / ViT-AE++ (``nchpwq -> nhwpqc``).
  """
  if x.ndim < 3:
    raise ValueError(f"patchify expects x of shape (N, *spatial, C); got shape {x.shape}")
  d = x.ndim - 2
  p = spatial_tuple(patch_size, d, "patch_size")
  grid = grid_shape_of(x.shape[1:-1], p)
  n, c = x.shape[0], x.shape[-1]
  split = [n]
  for g, q in zip(grid, p):
    split += [g, q]
  x = x.reshape(split + [c])
  perm = ((0,) + tuple(1 + 2 * i for i in range(d)) + tuple(2 + 2 * i for i in range(d))
          + (2 * d + 1,))
  x = jnp.transpose(x, perm)
  return x.reshape(n, math.prod(grid), math.prod(p) * c)


def unpatchify(tokens: jax.Array, patch_size: int | Sequence[int],
               spatial_shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`patchify`: ``(N, T, prod(p) * C)`` -> images ``(N, *spatial_shape, C)``."""
  spatial_shape = tuple(int(s) for s in spatial_shape)
  d = len(spatial_shape)
  p = spatial_tuple(patch_size, d, "patch_size")
  grid = grid_shape_of(spatial_shape, p)
  if tokens.ndim != 3 or tokens.shape[1] != math.prod(grid) or tokens.shape[2] % math.prod(p):
    raise ValueError(
        f"unpatchify expects tokens (N, {math.prod(grid)}, prod(patch_size) * C) for "
        f"spatial_shape={spatial_shape} and patch_size={p}; got shape {tokens.shape}")
  n = tokens.shape[0]
  c = tokens.shape[2] // math.prod(p)
  x = tokens.reshape((n,) + grid + p + (c,))
  perm = [0]
  for i in range(d):
    perm += [1 + i, 1 + d + i]
  x = jnp.transpose(x, perm + [2 * d + 1])
  return x.reshape((n,) + spatial_shape + (c,))


def patch_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Convolution with kernel = stride and no padding, as :func:`patchify` + one :func:`linear`.

  Equals ``torch.nn.Conv{2,3}d(Cin, Cout, p, stride=p)`` with its weight transposed to Flax's
  ``(*p, Cin, Cout)``. The input is zero-padded at the end of every axis to a multiple of ``p``
  first (as MONAI's ``PatchEmbed``; a no-op when the sizes divide).

  Args:
    x: ``(N, *S, Cin)``.
    kernel: ``(*p, Cin, Cout)``.
    bias: ``(Cout,)`` or None.

  Returns:
    ``(N, *ceil(S / p), Cout)`` in the promoted dtype of ``x`` and ``kernel``.
  """
  d = x.ndim - 2
  p = tuple(kernel.shape[:d])
  pad = [(0, (-s) % q) for s, q in zip(x.shape[1:-1], p)]
  if any(q for _, q in pad):
    x = jnp.pad(x, [(0, 0)] + pad + [(0, 0)])
  grid = tuple(s // q for s, q in zip(x.shape[1:-1], p))
  y = linear(patchify(x, p), kernel.reshape(-1, kernel.shape[-1]), bias)
  return y.reshape((x.shape[0],) + grid + (kernel.shape[-1],))


class PatchConv(nn.Module):
  """Conv with kernel = stride = ``patch_size`` (:func:`patch_conv`), params ``kernel``, ``bias``.

  Attributes:
    features: output channels.
    patch_size: kernel = stride, one int per spatial axis.
    use_bias: add a learnable bias.
    kernel_init, bias_init: initialisers of the ``(*patch_size, Cin, features)`` kernel and the
      bias (He normal and zeros by default).

  Input ``(N, *S, Cin)`` -> ``(N, *ceil(S / patch_size), features)`` in ``dtype`` (odd sizes are
  zero-padded at the end).
  """

  features: int
  patch_size: Sequence[int]
  use_bias: bool = True
  kernel_init: Callable = conv_init
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = tuple(self.patch_size)
    if x.ndim != len(p) + 2:
      raise ValueError(f"PatchConv with patch_size={p} expects x of shape (N, *spatial, C) with "
                       f"{len(p)} spatial axes; got shape {x.shape}")
    kernel = self.param("kernel", self.kernel_init, p + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return patch_conv(x, kernel, bias)


class UpConv(nn.Module):
  """Transposed conv with kernel = stride = 2, as one product over the kernel taps + reshape.

  ``out[n, 2i+a, 2j+b, c] = sum_k x[n, i, j, k] * kernel[a, b, k, c] + bias[c]`` (and likewise
  in 3D). This equals ``torch.nn.functional.conv_transpose{2,3}d`` with stride 2 and weight
  ``kernel`` transposed to ``(Cin, Cout, *k)`` (no spatial flip;
  :func:`jaxmed.interop.state_dict.conv_transpose_kernel`), and avoids ``lax.conv_transpose``,
  which is very slow for 3D in XLA.

  Attributes:
    features: output channels Cout.
    use_bias: add a learnable bias.
    kernel_init, bias_init: initialisers (He normal and zeros by default).

  Input ``(N, *S, Cin)`` -> output ``(N, *(2 * S), Cout)`` in ``dtype``.
  """

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = conv_init
  bias_init: Callable = nn.initializers.zeros

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
    # One product with every tap's kernel side by side, (Cin, 2, ..., 2, Cout), then the taps
    # interleaved with the input's positions: (N, s_0, t_0, s_1, t_1, ..., Cout).
    taps = jnp.moveaxis(kernel, d, 0).reshape(cin, 2**d * self.features)
    y = linear(x, taps, None if bias is None else jnp.tile(bias, 2**d))
    spatial = x.shape[1:-1]
    y = y.reshape((x.shape[0],) + spatial + (2,) * d + (self.features,))
    order = [0] + [v for i in range(d) for v in (1 + i, 1 + d + i)] + [2 * d + 1]
    y = jnp.transpose(y, order).reshape((x.shape[0],) + tuple(2 * s for s in spatial)
                                        + (self.features,))
    return y


class PatchEmbed(nn.Module):
  """MONAI ``PatchEmbed`` (Swin): ``proj`` (:class:`PatchConv`) and, with ``patch_norm``, ``norm``.

  Input ``(N, *S, Cin)`` -> ``(N, *ceil(S / patch_size), embed_dim)`` in ``dtype``; the optional
  LayerNorm (eps 1e-5) runs in float32.
  """

  embed_dim: int
  patch_size: tuple[int, ...]
  patch_norm: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = PatchConv(self.embed_dim, self.patch_size, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="proj")(x)
    if self.patch_norm:
      x = make_norm("layer", param_dtype=self.param_dtype, name="norm")(x).astype(self.dtype)
    return x


# --------------------------------------------------------------------------------------------
# Matrix products.


def _sum_block(s: int, largest: int = 1024) -> int:
  """The largest divisor of ``s`` that is at most ``largest`` (``s`` itself when it is no more)."""
  return max(b for b in range(1, min(s, largest) + 1) if s % b == 0)


def _blocked(v: jax.Array) -> jax.Array:
  """``(N, S, C) -> (N, S / B, B, C)`` with ``B`` <= 1024 dividing ``S``; when ``S`` has no divisor
  of at least 128 (e.g. a prime), ``S`` is zero-padded to whole blocks of 1024 first."""
  n, s, c = v.shape
  block = _sum_block(s)
  if block < 128 <= s:
    block = 1024
    v = jnp.pad(v, ((0, 0), (0, -s % block), (0, 0)))
  return v.reshape(n, -1, block, c)


def spatial_sums(v: jax.Array, dot: bool) -> jax.Array:
  """``(N, S, C) -> (N, C)``: sums over ``S``; when ``dot``, as matrix products with ones.

  ``S`` is split into blocks of at most 1024 (:func:`_blocked`); each block's sum is a batched
  product ``ones (1, block) @ v (block, C)``, which reads ``v`` in its own layout, and the block
  sums are added. XLA:CPU reduces a large extent in reduce-window passes, and a product that
  contracts ``S`` with ones on the right made it copy ``v`` channel-major first (the gradient of
  an instance norm over 64^3 x 24: 61 ms that way, 12 ms blocked). The two levels also sum closer
  to float64 than one long product (relative error 2e-7 against 2e-6 at 64^3)."""
  if not dot:
    return v.sum(1)
  blocks_ = _blocked(v)
  ones = jnp.ones(blocks_.shape[:2] + (1, blocks_.shape[2]), v.dtype)
  part = jax.lax.dot_general(ones, blocks_, (((3,), (2,)), ((0, 1), (0, 1))),
                             precision=jax.lax.Precision.HIGHEST)  # (N, S / B, 1, C)
  return part[:, :, 0].sum(1)


def _linear(x, kernel, bias):
  y = jnp.einsum("...c,co->...o", x, kernel)
  return y if bias is None else y + bias


@jax.custom_vjp
def _linear_cpu(x, kernel, bias):
  return _linear(x, kernel, bias)


def _linear_cpu_fwd(x, kernel, bias):
  return _linear(x, kernel, bias), (x, kernel, bias)


def _linear_cpu_bwd(residuals, g):
  x, kernel, bias = residuals
  dx = jnp.einsum("...o,co->...c", g, kernel).astype(x.dtype)
  xb = _blocked(x.reshape(1, -1, x.shape[-1]))[0]  # (S / B, B, Cin)
  gb = _blocked(g.reshape(1, -1, g.shape[-1]))[0]  # (S / B, B, Cout)
  dk = jax.lax.dot_general(xb, gb, (((1,), (1,)), ((0,), (0,))),
                           preferred_element_type=jnp.float32).sum(0).astype(kernel.dtype)
  db = None if bias is None else spatial_sums(
      g.reshape(1, -1, g.shape[-1]).astype(jnp.float32), True)[0].astype(bias.dtype)
  return dx, dk, db


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """``x @ kernel (+ bias)`` over the last axis: ``(..., Cin), (Cin, Cout), (Cout,)`` ->
  ``(..., Cout)``.

  On CPU the gradient is written by hand: the kernel's as a sum of products over blocks of at
  most 1024 rows, ``x_b^T g_b``, and the bias's as :func:`spatial_sums`. XLA:CPU's own
  derivative contracts the rows with ``g`` copied channel-major first, which for long inputs costs
  more than the products (forward + backward of ``(32768, 24) @ (24, 96)``: 40.7 -> 28.3 ms; of
  the 1 -> 24 channel 1x1 conv over 64^3: 55.6 -> 38.4 ms). Same numbers up to float32
  summation order. Other backends use XLA's derivative.
  """
  if jax.default_backend() == "cpu":
    return _linear_cpu(x, kernel, bias)
  return _linear(x, kernel, bias)


class Dense(nn.Module):
  """``nn.Dense`` (the same ``kernel (Cin, features)`` / ``bias (features,)`` variables, inits and
  dtype promotion) through :func:`linear`, whose gradient is faster on CPU.

  Input ``(..., Cin)`` -> ``(..., features)`` in ``dtype`` (default: the promoted input dtype).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return linear(x, kernel, bias)


# --------------------------------------------------------------------------------------------
# Attention.


def _attend(q, k, v, bias, mask, dropout=None):
  """``(out, probs)`` of softmax attention, ``dropout`` applied to the probabilities; shapes as
  :func:`attention`."""
  logits = jnp.einsum("...nd,...md->...nm", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = logits + mask
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("...nm,...md->...nd", probs.astype(v.dtype), v), probs


@jax.custom_vjp
def _attention_cpu(q, k, v, bias, mask):
  return _attend(q, k, v, bias, mask)[0]


def _attention_cpu_fwd(q, k, v, bias, mask):
  out, probs = _attend(q, k, v, bias, mask)
  return out, (q, k, v, out, probs, bias, mask)


def _attention_cpu_bwd(residuals, g):
  q, k, v, out, probs, bias, mask = residuals
  g_probs = jnp.einsum("...nd,...md->...nm", g, v, preferred_element_type=jnp.float32)
  # sum_m probs * g_probs = sum_d g * out (FlashAttention's identity): a sum over the head
  # width instead of over the keys.
  row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  g_logits = probs * (g_probs - row)  # (..., n, m) float32
  gq = jnp.einsum("...nm,...md->...nd", g_logits.astype(k.dtype), k).astype(q.dtype)
  gk = jnp.einsum("...nm,...nd->...md", g_logits.astype(q.dtype), q).astype(k.dtype)
  gv = jnp.einsum("...nm,...nd->...md", probs.astype(g.dtype), g).astype(v.dtype)
  g_bias = None  # summed over the leading axes the bias was broadcast along
  if bias is not None:
    g_bias = spatial_sums(g_logits.reshape(1, -1, bias.size), True).reshape(bias.shape)
  return gq, gk, gv, g_bias, None if mask is None else jnp.zeros_like(mask)


_attention_cpu.defvjp(_attention_cpu_fwd, _attention_cpu_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
              mask: jax.Array | None = None,
              dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """``softmax(q k^T + bias + mask) v`` over the last two axes, head-major.

  Args:
    q, k, v: ``(..., n, d)`` (``q`` already scaled), e.g. ``(B, heads, n, d)`` or Swin's
      ``(B, windows, heads, n, d)``.
    bias: float32, the logits' trailing shape (e.g. ``(heads, n, n)``, Swin's relative position
      bias shared by every window), learnable; or None.
    mask: float32 constant broadcastable to the logits (e.g. Swin's shifted-window -100 per
      window, ``(windows, 1, n, n)``); no gradient; or None.
    dropout: applied to the probabilities (train-mode attention dropout, e.g. a Flax
      ``nn.Dropout``), or None. With it the gradient is XLA's on every backend.

  Returns:
    ``(..., n, d)`` in ``v``'s dtype; the softmax runs in float32.

  On CPU the gradient is written by hand. XLA's derivative sums ``probs * g_probs`` over the
  ``n`` keys and the bias's gradient over the leading axes with reductions that XLA:CPU ran at a
  fraction of memory speed (about 1 s of the 4.5 s Swin-UNETR (feature 24, 64^3) gradient); here
  the first is ``sum_d g * out`` (FlashAttention's identity, a sum over the head width) and the
  second a product with ones (:func:`spatial_sums`). Same numbers up to float32 rounding. Other
  backends use XLA's derivative.
  """
  logits_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
  if bias is not None and (bias.ndim > len(logits_shape)
                           or tuple(bias.shape) != logits_shape[len(logits_shape) - bias.ndim:]):
    raise ValueError(f"attention bias must have the trailing shape of the logits "
                     f"{logits_shape}; got bias shape {bias.shape}")
  if dropout is None and jax.default_backend() == "cpu":
    return _attention_cpu(q, k, v, bias, mask)
  return _attend(q, k, v, bias, mask, dropout)[0]


# --------------------------------------------------------------------------------------------
# Convolutions.


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution with an odd kernel, channels-last, no bias.

  3D inputs run as 2D convolutions batched over depth, ``y[d] = sum_a conv2d(x[d + a - kd//2],
  kernel[a])``: with few input channels the depth-shifted inputs are stacked along channels
  into one 2D conv; with more input than output channels one 2D conv computes all ``kd`` depth
  taps as output channels, which are then shifted and summed; otherwise one 2D conv per tap.
  XLA:CPU runs 3D convolutions several times slower than any of these; the result is the same up
  to float32 rounding.

  Args:
    x: ``(N, *S, Cin)``, 2 or 3 spatial axes.
    kernel: ``(*k, Cin, Cout)`` with odd ``k``.

  Returns:
    ``(N, *S, Cout)``.
  """
  d = x.ndim - 2
  ks = kernel.shape[:d]
  dn = ("NHWC", "HWIO", "NHWC")
  conv2d = lambda v, k: jax.lax.conv_general_dilated(
      v, k, (1, 1), [(s // 2, s // 2) for s in ks[-2:]], dimension_numbers=dn)
  if d == 2:
    return conv2d(x, kernel)
  if d != 3:
    raise ValueError(f"conv3x3 needs a 2D or 3D input (N, *S, C); got shape {x.shape}")
  n, depth, h, w, cin = x.shape
  kd, cout = ks[0], kernel.shape[-1]
  flat = lambda v: v.reshape(n * depth, h, w, v.shape[-1])
  pad_depth = lambda v: jnp.pad(v, ((0, 0), (kd // 2, kd // 2)) + ((0, 0),) * (v.ndim - 2))
  if kd == 1:
    y = conv2d(flat(x), kernel[0])
  elif cin * kd <= 16:  # depth taps stacked along the input channels
    xp = pad_depth(x)
    stacked = jnp.concatenate([xp[:, a:a + depth] for a in range(kd)], axis=-1)
    y = conv2d(flat(stacked), jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(
        ks[1], ks[2], kd * cin, cout))
  elif cin > cout:  # depth taps as output channels, shifted and summed
    taps = conv2d(flat(x), jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(
        ks[1], ks[2], cin, kd * cout))
    taps = pad_depth(taps.reshape(n, depth, h, w, kd, cout))
    return sum(taps[:, a:a + depth, :, :, a] for a in range(kd))
  else:  # one 2D conv per depth tap
    xp = pad_depth(x)
    y = sum(conv2d(flat(xp[:, a:a + depth]), kernel[a]) for a in range(kd))
  return y.reshape(n, depth, h, w, cout)


class SameConv(nn.Module):
  """Stride-1 'same' conv without bias (param ``kernel`` ``(*k, Cin, features)``, as nn.Conv).

  Runs through :func:`conv3x3` (fast 3D convolutions on CPU); a 1x1 kernel is one matmul.
  Input ``(N, *S, Cin)`` -> ``(N, *S, features)`` in ``dtype``.
  """

  features: int
  kernel_size: int = 3
  kernel_init: Callable = conv_init
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.ndim - 2
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size,) * d + (x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if self.kernel_size == 1:
      return linear(x, kernel.reshape(kernel.shape[-2:]))
    return conv3x3(x, kernel)


# --------------------------------------------------------------------------------------------
# Norms.


def _identity(x: jax.Array) -> jax.Array:
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float,
               dot: bool) -> jax.Array:
  """``(N, S, C)`` float32 normalised over ``S`` and each of ``groups`` channel groups, then
  ``* scale + bias`` (``(C,)``); two-pass variance. The gradient is written by hand: two sums
  over ``S`` and one element-wise pass (see :class:`GroupStatsNorm` for the times)."""
  return _group_norm_fwd(x, scale, bias, groups, epsilon, dot)[0]


def _per_group(v: jax.Array, groups: int) -> jax.Array:
  """``(N, C)`` per-channel values -> ``(N, 1, C)``: each group's sum, repeated over its
  channels."""
  n, c = v.shape
  return jnp.repeat(v.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1)[:, None]


def _group_norm_fwd(x, scale, bias, groups, epsilon, dot):
  count = x.shape[1] * (x.shape[2] // groups)
  mean = _per_group(spatial_sums(x, dot), groups) / count
  centred = x - mean
  rstd = jax.lax.rsqrt(_per_group(spatial_sums(centred * centred, dot), groups) / count
                       + epsilon)
  normalised = centred * rstd
  return normalised * scale + bias, (normalised, rstd, scale)


def _group_norm_bwd(groups, epsilon, dot, residuals, g):
  del epsilon
  normalised, rstd, scale = residuals
  count = normalised.shape[1] * (normalised.shape[2] // groups)
  sum_g = spatial_sums(g, dot)  # (N, C)
  sum_gn = spatial_sums(g * normalised, dot)
  mean_g = _per_group(sum_g * scale, groups) / count
  mean_gn = _per_group(sum_gn * scale, groups) / count
  dx = rstd * (g * scale - mean_g - normalised * mean_gn)
  return dx, sum_gn.sum(0), sum_g.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupStatsNorm(nn.Module):
  """Group norm over the spatial axes and each group's channels; ``num_groups=None``: instance norm.

  The same numbers and variables as ``nn.GroupNorm`` / ``nn.InstanceNorm`` with
  ``use_fast_variance=False`` (``scale`` and ``bias`` of shape ``(C,)``; PyTorch's two-pass
  variance), up to float32 summation order, through :func:`group_norm`. On CPU the sums are
  blocked products with ones (:func:`spatial_sums`): XLA:CPU splits a plain reduction over a
  large spatial extent into reduce-window passes. Instance norm + LeakyReLU of the demo UNet's step,
  forward + backward on this project's 2-core CPU: Flax's norm 15.2 ms, these sums with XLA's
  derivative 11.7 ms, with the hand-written one 8.7 ms. Other backends reduce directly.

  Input ``(N, *S, C)``; output float32 of the same shape.
  """

  num_groups: int | None = None
  epsilon: float = _EPS
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim < 3:
      raise ValueError(f"{type(self).__name__} input must be (N, *spatial, C); got shape {x.shape}")
    n, c = x.shape[0], x.shape[-1]
    groups = c if self.num_groups is None else self.num_groups
    check_group_channels(groups, (c,))
    scale = (self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale
             else jnp.ones((c,)))
    bias = (self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias
            else jnp.zeros((c,)))
    y = group_norm(x.astype(jnp.float32).reshape(n, -1, c), scale.astype(jnp.float32),
                   bias.astype(jnp.float32), groups, float(self.epsilon),
                   jax.default_backend() == "cpu")
    return y.reshape(x.shape)


def make_norm(kind: str, *, train: bool = False, num_groups: int = 32, epsilon: float = _EPS,
              affine: bool = True, momentum: float = 0.9, scale_init: Callable | None = None,
              param_dtype: Any = jnp.float32, name: str | None = None) -> Callable:
  """A norm layer computing in float32, with PyTorch's two-pass variance.

  Args:
    kind: "instance" (per sample and channel over space), "group" (``num_groups`` groups),
      "batch" (running statistics in ``batch_stats``), "layer" (over the channel axis) or
      "none" (the identity).
    train: for "batch": normalise with the batch statistics (and update the running ones under
      ``mutable=["batch_stats"]``) instead of the running statistics.
    num_groups: groups of "group".
    epsilon: added to the variance (PyTorch's default 1e-5).
    affine: learnable ``scale`` and ``bias``.
    momentum: Flax convention, ``1 - torch momentum`` (0.9 == torch's 0.1).
    scale_init: initialiser of ``scale`` (ones by default).
    param_dtype: parameter dtype.
    name: the module name (its variables' path).

  Returns:
    A Flax module (``(N, ..., C)`` -> float32 of the same shape), or the identity for "none".
  """
  check_choice(kind, NORMS, "norm")
  if kind == "none":
    return _identity
  common = dict(epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
                use_fast_variance=False, use_scale=affine, use_bias=affine, name=name)
  if scale_init is not None:
    common["scale_init"] = scale_init
  if kind in ("instance", "group"):  # float32 by construction, two-pass variance always
    stats = {k: v for k, v in common.items() if k not in ("dtype", "use_fast_variance")}
    return GroupStatsNorm(num_groups=num_groups if kind == "group" else None, **stats)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, **common)
  return nn.LayerNorm(**common)


NormSpec = tuple[str, tuple[tuple[str, Any], ...]]


def parse_norm(norm_name: str | Sequence[Any]) -> NormSpec:
  """MONAI ``norm_name`` (``"instance"``, ``("group", {"num_groups": 4})``, ...) -> hashable form.

  Returns ``(name, ((key, value), ...))`` with every supported option filled in:
  instance: ``affine`` (False), ``eps``; batch / syncbatch: ``affine`` (True), ``eps``,
  ``momentum`` (PyTorch convention, 0.1); group: ``num_groups`` (required), ``affine`` (True),
  ``eps``. All ``eps`` default to 1e-5, as in PyTorch.

  Raises:
    ValueError: an unknown name or option, or an option value this port cannot reproduce.
  """
  if isinstance(norm_name, str):
    name, args = norm_name, {}
  elif (isinstance(norm_name, (tuple, list)) and len(norm_name) == 2
        and isinstance(norm_name[0], str) and isinstance(norm_name[1], Mapping)):
    name, args = norm_name[0], dict(norm_name[1])
  elif (isinstance(norm_name, (tuple, list)) and len(norm_name) == 2
        and isinstance(norm_name[0], str) and isinstance(norm_name[1], tuple)):
    name, args = norm_name[0], dict(norm_name[1])  # already parsed
  else:
    raise ValueError(f"norm_name must be a name or (name, {{options}}); got {norm_name!r}")
  name = name.lower()
  if name == "syncbatch":
    name = "batch"
  defaults = {
      "instance": {"affine": False, "eps": 1e-5, "track_running_stats": False},
      "batch": {"affine": True, "eps": 1e-5, "momentum": 0.1, "track_running_stats": True},
      "group": {"num_groups": None, "affine": True, "eps": 1e-5},
  }
  if name not in defaults:
    raise ValueError(f"norm_name must be one of {MONAI_NORMS} (optionally with options); "
                     f"got {norm_name!r}")
  unknown = sorted(set(args) - set(defaults[name]))
  if unknown:
    raise ValueError(f"norm_name {name!r} does not support option(s) {unknown}; supported: "
                     f"{sorted(defaults[name])}")
  full = {**defaults[name], **args}
  if name == "instance" and full["track_running_stats"]:
    raise ValueError("norm_name 'instance' with track_running_stats=True is not supported")
  if name == "batch" and not full["track_running_stats"]:
    raise ValueError("norm_name 'batch' with track_running_stats=False is not supported")
  if name == "group":
    g = full["num_groups"]
    if not isinstance(g, (int, np.integer)) or g < 1:
      raise ValueError(f"norm_name 'group' needs an int num_groups >= 1; got {norm_name!r}")
  full.pop("track_running_stats", None)
  return name, tuple(sorted(full.items()))


def check_norm_channels(norm: NormSpec, channels: Sequence[int]) -> None:
  """A parsed group-norm spec must divide every channel count in ``channels``."""
  if norm[0] == "group":
    check_group_channels(dict(norm[1])["num_groups"], channels, what="norm_name 'group'")


def norm_from_spec(norm: NormSpec, name: str, train: bool, param_dtype: Any) -> Callable:
  """The :func:`make_norm` layer of a :func:`parse_norm` spec (torch momentum converted)."""
  kind, options = norm
  opts = dict(options)
  return make_norm(kind, train=train, num_groups=int(opts.get("num_groups") or 32),
                   epsilon=float(opts["eps"]), affine=bool(opts["affine"]),
                   momentum=1.0 - float(opts.get("momentum", 0.1)), param_dtype=param_dtype,
                   name=name)


INSTANCE_NORM: NormSpec = ("instance", (("affine", False), ("eps", 1e-5)))
"""``parse_norm("instance")``: MONAI's default UNETR block norm (no affine)."""


# --------------------------------------------------------------------------------------------
# Regularisation and transformer parts.


class DropPath(nn.Module):
  """Stochastic depth per example (MONAI / timm ``DropPath``, scaled by the keep probability).

  ``__call__(x (N, ...), *, train=False)``: the identity unless ``train`` and ``rate > 0``; then
  each sample is zeroed with probability ``rate`` (else divided by ``1 - rate``), using the
  'dropout' rng.
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    if keep > 0.0:
      return jnp.where(mask, x / keep, 0).astype(x.dtype)
    return jnp.zeros_like(x)


class MLP(nn.Module):
  """Transformer MLP: Dense(hidden) -> exact (erf) GELU -> dropout -> Dense(C) -> dropout.

  MONAI ``MLPBlock`` (swin dropout mode) with the default ``names=("linear1", "linear2")``;
  timm's ``Mlp`` with ``names=("fc1", "fc2")``.

  Attributes:
    hidden: width of the hidden layer.
    dropout_rate: dropout after the activation and after the output layer (train only).
    names: names of the two Dense layers.
    kernel_init: initialiser of both Dense kernels (biases are zero).

  ``__call__(x (..., C), *, train=False)`` -> ``(..., C)`` in ``dtype``.
  """

  hidden: int
  dropout_rate: float = 0.0
  names: tuple[str, str] = ("linear1", "linear2")
  kernel_init: Callable = nn.initializers.xavier_uniform()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    dim = x.shape[-1]
    x = Dense(self.hidden, name=self.names[0], **dense)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = Dense(dim, name=self.names[1], **dense)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


# --------------------------------------------------------------------------------------------
# UNETR blocks.


class UnetResBlock(nn.Module):
  """MONAI ``UnetResBlock`` (kernel 3, stride 1): conv-norm-lrelu-conv-norm + skip, lrelu.

  Convs (:class:`SameConv`) have no bias. The skip gets a 1x1 conv + norm (``conv3`` /
  ``norm3``) when the channel count changes. LeakyReLU slope 0.01. Norms and the activation run
  in float32; ``norm`` is a :func:`parse_norm` spec.
  Input ``(B, *S, Cin)`` -> ``(B, *S, features)`` in ``dtype``.
  """

  features: int
  norm: tuple = INSTANCE_NORM
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: norm_from_spec(self.norm, name, train, self.param_dtype)
    y = SameConv(self.features, name="conv1", **conv)(x)
    y = norm("norm1")(y.astype(jnp.float32))
    y = nn.leaky_relu(y, negative_slope=0.01).astype(self.dtype)
    y = SameConv(self.features, name="conv2", **conv)(y)
    y = norm("norm2")(y.astype(jnp.float32))
    residual = x
    if x.shape[-1] != self.features:
      residual = SameConv(self.features, kernel_size=1, name="conv3", **conv)(x)
      residual = norm("norm3")(residual.astype(jnp.float32))
    y = y + residual.astype(jnp.float32)
    return nn.leaky_relu(y, negative_slope=0.01).astype(self.dtype)


class UnetrBasicBlock(nn.Module):
  """MONAI ``UnetrBasicBlock`` with ``res_block=True``: a :class:`UnetResBlock` named ``layer``.

  Input ``(B, *S, Cin)`` -> ``(B, *S, features)``.
  """

  features: int
  norm: tuple = INSTANCE_NORM
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return UnetResBlock(self.features, self.norm, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="layer")(x, train)


class UnetrUpBlock(nn.Module):
  """MONAI ``UnetrUpBlock`` (``res_block=True``): transposed conv k = s = 2 (no bias), concat the
  skip (after the up-sampled features), :class:`UnetResBlock` (2 features -> features).

  ``__call__(x (B, *S, Cin), skip (B, *2S, features))`` -> ``(B, *2S, features)``.
  """

  features: int
  norm: tuple = INSTANCE_NORM
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool = False) -> jax.Array:
    y = UpConv(self.features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
               name="transp_conv")(x)
    y = jnp.concatenate([y, skip.astype(y.dtype)], axis=-1)
    return UnetResBlock(self.features, self.norm, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="conv_block")(y, train)
