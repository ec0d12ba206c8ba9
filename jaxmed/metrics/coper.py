"""The CoPer perceptual metric (Sec. III-B, Fig. 2a, App. A of coper_contrastive_perceptual_metric).

CoPer is LPIPS (Zhang et al., 2018) read from a network pre-trained with contrastive
self-supervision. For two images ``x1, x2`` and a frozen network with taps ``l = 1..L``, the
features ``y^l`` ``(H_l, W_l, C_l)`` are unit-normalised over the channels,
``y_hat = y / (sqrt(sum_c y^2) + 1e-10)`` (eps outside the root, as ``lpips.normalize_tensor``),
and

  ``d(x1, x2) = sum_l  1 / (H_l W_l)  sum_{h, w}  sum_c  w_{l, c} (y_hat1 - y_hat2)^2_{h, w, c}``

with non-negative per-channel weights ``w_l`` (default 1: LPIPS's "baseline", the paper's
"without further tuning"; LPIPS's learned "lin" weights load with
``jaxmed.interop.load_lpips_lin``). The text and LPIPS sum over the taps; Fig. 2a says
"average", available as ``reduce="mean"``.

Networks (2D, frozen, eval mode), run in pure JAX over the parameter trees of jaxmed's Flax
modules (:mod:`jaxmed.metrics._networks`), so this module imports nothing heavier than jax:

* ``"vgg16"``: :class:`jaxmed.models.VGG16`, with or without BatchNorm; default taps
  ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` (LPIPS's).
* ``"resnet"``: :class:`jaxmed.models.resnet.ResNet` (BasicBlock or Bottleneck, any widths,
  BatchNorm or GroupNorm); default taps ``stem`` (the ReLU after conv1 / bn1, before the
  max-pool) and ``layer1`` .. ``layer4`` (LPIPS's resnet taps).
* ``"vit"``: :class:`jaxmed.models.vit.ViT` (App. A: DINO ViT-S/16); taps ``block_{i}``, the
  output of block ``i`` with the cls token dropped and the tokens laid out on the patch grid
  ``(H / p, W / p, D)``. The paper uses five blocks without naming them; the default is the
  0-based blocks 3, 5, 7, 9, 11 (every block of a ViT with fewer than 12).

Grey images are repeated to the network's 3 input channels. Volumes ``(N, D, H, W, C)`` get the
2.5D metric: the 2D metric over the slices along each of the three spatial axes, averaged over
the slices of an axis, then over the three axes.

To compare distances with ratings on a common scale (Sec. IV-A.4), divide by the largest
distance with :func:`jaxmed.metrics.max_normalize`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.metrics import _checks, _networks

NETWORKS = _networks.NETWORKS
VGG16_TAPS = _networks.VGG16_TAPS
RESNET_TAPS = _networks.RESNET_TAPS
VIT_DEFAULT_BLOCKS = _networks.VIT_DEFAULT_BLOCKS
# LPIPS ScalingLayer (lpips 0.1.4): (x - shift) / scale on RGB in [-1, 1] = ImageNet mean / std.
LPIPS_SHIFT = (-.030, -.088, -.188)
LPIPS_SCALE = (.458, .448, .450)
PREPROCESS = ("lpips", "none")
REDUCE = ("sum", "mean")
_EPS = 1e-10  # lpips.normalize_tensor


def coper_distance(x, y, *, params, network="vgg16", taps=None, weights=None, reduce="sum",
                   preprocess="lpips", batch_stats=None, num_heads=None, layer_norm_eps=None,
                   pos_embed=None, stem_stride=None, max_pool=None, num_groups=None):
  """CoPer / LPIPS-form perceptual distance per example (Sec. III-B of coper; LPIPS).

  ``d = sum_l mean_{h, w} sum_c w_{l, c} (y_hat1 - y_hat2)^2`` over the taps ``l``, with
  ``y_hat`` the features unit-normalised over the channels (see the module docstring). With
  ``network="vgg16"``, LPIPS's lin weights (``weights=jaxmed.interop.load_lpips_lin(path)``) and
  the torchvision VGG-16 it ships with, this is ``lpips.LPIPS(net="vgg")`` (v0.1) on ``[-1, 1]``
  input.

  Args:
    x, y: ``(N, H, W, C)`` images or ``(N, D, H, W, C)`` volumes of the same shape, real,
      ``C = 1`` (repeated to the network's 3 input channels) or the network's input channels.
      Values as the network expects them: with ``preprocess="lpips"``, RGB (or grey) in
      ``[-1, 1]``. Volumes give the 2.5D metric: the 2D distance of every slice along axis
      D (an ``(H, W)`` image), H (``(D, W)``) and W (``(D, H)``), averaged over the slices of
      each axis, then over the three axes.
    params: the network's ``variables["params"]``, or the whole ``variables`` (then its
      ``batch_stats`` are used). Plain nested mappings of arrays, as jaxmed's Flax modules
      (or ``jaxmed.interop`` converters) produce them.
    network: ``"vgg16"`` (:class:`jaxmed.models.VGG16`), ``"resnet"``
      (:class:`jaxmed.models.resnet.ResNet`, 2D) or ``"vit"`` (:class:`jaxmed.models.vit.ViT`,
      2D).
    taps: feature names to compare, in order; default :data:`VGG16_TAPS` (``relu1_2`` ..
      ``relu5_3``), :data:`RESNET_TAPS` (``stem``, ``layer1`` .. ``layer4``) or, for a ViT,
      ``block_3, block_5, block_7, block_9, block_11`` (every block if it has fewer than 12).
      VGG-16 also offers every ``relu{b}_{i}`` and ``pool{b}``; a ViT every ``block_{i}``.
    weights: None (``w_l = 1``: the sum over channels) or one non-negative ``(C_l,)`` array per
      tap, as a sequence in ``taps`` order or a mapping ``{tap: array}`` (e.g. the dict of
      ``jaxmed.interop.load_lpips_lin``). They multiply the squared difference, as LPIPS's 1x1
      "lin" conv; the paper's ``||w_l * (y1 - y2)||^2`` is ``weights = w_l ** 2``.
    reduce: ``"sum"`` over taps (the text and LPIPS) or ``"mean"`` (Fig. 2a: "average").
    preprocess: ``"lpips"``: LPIPS's ScalingLayer ``(x - shift) / scale``, shift
      :data:`LPIPS_SHIFT`, scale :data:`LPIPS_SCALE` (ImageNet's mean / std for ``[-1, 1]``
      input; needs a 3-channel network); ``"none"``: the values go in as given.
    batch_stats: ``variables["batch_stats"]`` of a BatchNorm network, unless ``params`` is the
      whole ``variables``.
    num_heads: ViT only, required: the attention heads (6 for ViT-S/16).
    layer_norm_eps: ViT only: LayerNorm eps, default 1e-6 (timm / DINO; MONAI uses 1e-5).
    pos_embed: ViT only: ``"learned"`` (default when the params hold ``pos_embedding``; the input
      must then give its patch grid), ``"sincos"`` (fixed 2D table, temperature 10000) or
      ``"none"``.
    stem_stride: ResNet only: the stem conv's stride (``conv1_t_stride``), default 2.
    max_pool: ResNet only: False for a ResNet built with ``no_max_pool``; default True.
    num_groups: ResNet only: GroupNorm groups of a ``norm="group"`` ResNet (then no
      ``batch_stats``).

  Returns:
    ``(N,)`` float32 distances, >= 0, exactly 0 for identical examples, symmetric in ``x`` and
    ``y`` (up to float rounding).

  Raises:
    ValueError: (before tracing) shapes that differ, a rank other than 4 or 5, a channel count
      other than 1 or the network's, complex input, NaN / Inf in a concrete input; an unknown
      ``network``, ``reduce``, ``preprocess`` or tap; params that are not the named network's
      (or lack a leaf, or are mis-shaped; named by path), BatchNorm params without
      ``batch_stats``, options of another network; ``weights`` of the wrong number, shape or
      sign, or non-finite; images (or volume slices) too small for the taps (VGG-16: ``2**p``
      for the ``p`` pools before the deepest tap) or not multiples of the ViT patch size.
  """
  fn = "coper_distance"
  if reduce not in REDUCE:
    raise ValueError(f"{fn}: reduce must be one of {REDUCE}; got {reduce!r}")
  net, x, y = _setup(fn, x, y, params, network, taps, preprocess, batch_stats,
                     dict(num_heads=num_heads, layer_norm_eps=layer_norm_eps,
                          pos_embed=pos_embed, stem_stride=stem_stride, max_pool=max_pool,
                          num_groups=num_groups), volumes=True)
  planes = _planes(x.shape)
  channels = _networks.tap_channels(net, planes[0])
  weights = _weights(fn, weights, net.spec.taps, channels)
  per_tap = _coper(x, y, net.params, net.stats, weights, spec=net.spec,
                   in_channels=net.in_channels, preprocess=preprocess)
  return jnp.sum(per_tap, axis=1) if reduce == "sum" else jnp.mean(per_tap, axis=1)


def squared_tap_differences(x, y, *, params, network="vgg16", taps=None, preprocess="lpips",
                            batch_stats=None, num_heads=None, layer_norm_eps=None,
                            pos_embed=None, stem_stride=None, max_pool=None, num_groups=None):
  """Unit-normalised squared feature differences per tap, before channel weights and averaging.

  ``(y_hat1^l - y_hat2^l) ** 2`` for every tap ``l`` (Sec. III-B of coper), the quantity the
  per-channel weights ``w_l`` act on: ``coper_distance`` is
  ``sum_l mean_{h, w} (D_l @ w_l)`` of these ``D_l``, so ``w_l`` can be fitted to 2AFC
  judgments from them (as LPIPS's lin layers are).

  Args:
    x, y: ``(N, H, W, C)`` images of the same shape (volumes: compare their slices).
    params, network, taps, preprocess, batch_stats, num_heads, layer_norm_eps, pos_embed,
      stem_stride, max_pool, num_groups: as :func:`coper_distance`.

  Returns:
    A tuple with one ``(N, h_l, w_l, C_l)`` float32 array per tap, in ``taps`` order (exactly 0
    for identical examples).

  Raises:
    ValueError: as :func:`coper_distance` (a 5-D input too).
  """
  fn = "squared_tap_differences"
  net, x, y = _setup(fn, x, y, params, network, taps, preprocess, batch_stats,
                     dict(num_heads=num_heads, layer_norm_eps=layer_norm_eps,
                          pos_embed=pos_embed, stem_stride=stem_stride, max_pool=max_pool,
                          num_groups=num_groups), volumes=False)
  return _squared_diffs(x, y, net.params, net.stats, spec=net.spec,
                        in_channels=net.in_channels, preprocess=preprocess)


# ---------------------------------------------------------------------------------------------
# Validation (host side, before tracing).


def _planes(shape: tuple[int, ...]) -> list[tuple[int, int]]:
  """The 2D planes the network sees: ``(H, W)``; for volumes ``(H, W), (D, W), (D, H)``."""
  if len(shape) == 4:
    return [tuple(shape[1:3])]
  d, h, w = shape[1:4]
  return [(h, w), (d, w), (d, h)]


def _setup(fn: str, x, y, params, network, taps, preprocess, batch_stats, options, *,
           volumes: bool):
  """Checks the inputs and the network; returns ``(network, x, y)``."""
  if preprocess not in PREPROCESS:
    raise ValueError(f"{fn}: preprocess must be one of {PREPROCESS}; got {preprocess!r}")
  x = _checks.as_array(fn, "x", x)
  y = _checks.as_array(fn, "y", y)
  _checks.same_shape(fn, "x", x, "y", y)
  if volumes:
    _checks.rank_in(fn, "x", x, (4, 5), "(N, H, W, C) images or (N, D, H, W, C) volumes")
  else:
    _checks.rank_in(fn, "x", x, (4,), "(N, H, W, C) images (for volumes compare their slices, "
                    "or use coper_distance, which takes (N, D, H, W, C))")
  if x.shape[0] < 1:
    raise ValueError(f"{fn}: x needs at least one example; got shape {x.shape}")
  for name, a in (("x", x), ("y", y)):
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
      raise ValueError(f"{fn}: {name} must be real; got dtype {a.dtype} (pass the magnitude)")
  _checks.finite(fn, "x", x)
  _checks.finite(fn, "y", y)
  net = _networks.resolve(fn, network, params, batch_stats, taps, **options)
  c = x.shape[-1]
  if c not in (1, net.in_channels):
    raise ValueError(f"{fn}: x shape {x.shape}: the last axis must hold 1 (grey, repeated) or "
                     f"{net.in_channels} channels (the {network}'s input); got {c}")
  if preprocess == "lpips" and net.in_channels != 3:
    raise ValueError(f"{fn}: preprocess='lpips' (LPIPS's RGB ScalingLayer) needs a network on "
                     f"3 input channels; this {network} takes {net.in_channels}: use "
                     "preprocess='none'")
  planes = _planes(x.shape)
  names = ("H and W",) if x.ndim == 4 else ("(H, W) of the D-slices", "(D, W) of the H-slices",
                                            "(D, H) of the W-slices")
  for plane, what in zip(planes, names):
    net.check_plane(fn, "x", tuple(x.shape), plane, what)
  return net, x, y


def _weights(fn: str, weights, taps: tuple[str, ...], channels: tuple[int, ...]):
  """``weights`` as a tuple of one ``(C_l,)`` array per tap (None: ones, the channel sum)."""
  if weights is None:  # x * 1.0 is exact: the plain sum over channels, and one compilation
    return tuple(np.ones(c, np.float32) for c in channels)
  expected = ", ".join(f"{t}: ({c},)" for t, c in zip(taps, channels))
  if isinstance(weights, Mapping):
    if set(weights) != set(taps):
      raise ValueError(f"{fn}: weights given as a mapping must have exactly the taps {taps} as "
                       f"keys; got {sorted(map(str, weights))}")
    seq = [weights[t] for t in taps]
  elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
    seq = list(weights)
  else:
    raise ValueError(f"{fn}: weights must be None, a sequence of one (C_l,) array per tap or a "
                     f"mapping {{tap: array}}; got {type(weights).__name__}")
  if len(seq) != len(taps):
    raise ValueError(f"{fn}: weights must hold one (C_l,) array per tap ({len(taps)}: "
                     f"{expected}); got {len(seq)}")
  out = []
  for tap, c, w in zip(taps, channels, seq):
    arg = f"weights[{tap!r}]"
    w = _checks.as_array(fn, arg, w)
    if jnp.issubdtype(w.dtype, jnp.complexfloating):
      raise ValueError(f"{fn}: {arg} must be real; got dtype {w.dtype}")
    if tuple(w.shape) != (c,):
      raise ValueError(f"{fn}: {arg} must have shape ({c},), one weight per channel of the tap "
                       f"(expected {expected}); got shape {tuple(w.shape)}")
    _checks.finite(fn, arg, w)
    _checks.nonnegative(fn, arg, w, "channel weights (LPIPS clamps its lin weights at 0)")
    out.append(w)
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# Kernels (pure JAX, traced once per static configuration).


def _network_input(x, in_channels: int, preprocess: str):
  """``(M, H, W, C)`` -> float32 ``(M, H, W, in_channels)``, grey repeated, scaled."""
  x = x.astype(jnp.float32)
  if x.shape[-1] != in_channels:
    x = jnp.broadcast_to(x, x.shape[:-1] + (in_channels,))
  if preprocess == "lpips":
    x = (x - jnp.asarray(LPIPS_SHIFT, jnp.float32)) / jnp.asarray(LPIPS_SCALE, jnp.float32)
  return x


def _unit_normalize(f):
  """``f / (sqrt(sum_c f^2) + 1e-10)`` over the last axis (``lpips.normalize_tensor``).

  The root is taken only where the sum is positive (elsewhere ``f`` is 0 and so is the result),
  so the gradient stays finite on all-zero feature vectors (after a ReLU its gradient mask
  already hides the NaN of ``sqrt'(0)``; a ViT block or a bias-free layer does not).
  """
  s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = s > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
  return f / (norm + _EPS)


def _tap_differences(x, y, params, stats, spec, in_channels: int, preprocess: str):
  n = x.shape[0]
  z = jnp.concatenate([_network_input(x, in_channels, preprocess),
                       _network_input(y, in_channels, preprocess)])
  feats = _networks.features(z, params, stats, spec)
  # Identical examples give exactly 0 (XLA's CPU code may round the two halves of the batch
  # differently in the last bit, which would leave ~1e-15 instead).
  same = jnp.all((x == y).reshape(n, -1), axis=1)[:, None, None, None]
  out = []
  for tap in spec.taps:
    f = _unit_normalize(feats[tap].astype(jnp.float32))
    out.append(jnp.where(same, 0.0, jnp.square(f[:n] - f[n:])))
  return tuple(out)


def _per_tap_2d(x, y, params, stats, weights, spec, in_channels: int, preprocess: str):
  """``(N, L)``: per tap, the spatial mean of the channel-weighted squared differences."""
  diffs = _tap_differences(x, y, params, stats, spec, in_channels, preprocess)
  # LPIPS's lin layer is a 1x1 conv C_l -> 1 without bias, then the spatial average.
  return jnp.stack([jnp.mean(jnp.sum(d * jnp.asarray(w, jnp.float32), axis=-1), axis=(1, 2))
                    for d, w in zip(diffs, weights)], axis=1)


def _slices(v, axis: int):
  """Volumes ``(N, D, H, W, C)`` -> the slices along spatial ``axis`` (1, 2, 3) as images
  ``(N * S, a, b, C)``, the two other spatial axes in their original order."""
  v = jnp.moveaxis(v, axis, 1)
  return v.reshape((-1,) + v.shape[2:])


@functools.partial(jax.jit, static_argnames=("spec", "in_channels", "preprocess"))
def _squared_diffs(x, y, params, stats, *, spec, in_channels, preprocess):
  return _tap_differences(x, y, params, stats, spec, in_channels, preprocess)


@functools.partial(jax.jit, static_argnames=("spec", "in_channels", "preprocess"))
def _coper(x, y, params, stats, weights, *, spec, in_channels, preprocess):
  """``(N, L)`` per-tap distances; volumes: averaged over the slices, then the three axes (the
  reduction over taps is linear, so it commutes with these averages)."""
  run = functools.partial(_per_tap_2d, params=params, stats=stats, weights=weights, spec=spec,
                          in_channels=in_channels, preprocess=preprocess)
  if x.ndim == 4:
    return run(x, y)
  n = x.shape[0]
  per_axis = [jnp.mean(run(_slices(x, axis), _slices(y, axis)).reshape(n, -1, len(spec.taps)),
                       axis=1) for axis in (1, 2, 3)]
  return (per_axis[0] + per_axis[1] + per_axis[2]) / 3.0
