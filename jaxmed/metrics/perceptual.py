"""Perceptual feature distances: SSFD and the VGG-16 perceptual distance (jit-compiled).

Both compare two images by the mean squared difference of the features a fixed network extracts
from each (Sec. 2.3 and appendix 5.2 of ssfd_feature_distance). The networks run as pure JAX
(``lax.conv_general_dilated``, ``lax.reduce_window``) over the plain nested-dict parameter trees
that :class:`jaxmed.models.SSFDEncoder` and :class:`jaxmed.models.VGG16` produce, so importing
this module pulls in nothing heavier than jax: load or convert the weights with
``jaxmed.interop`` (which needs flax), then pass ``variables["params"]`` here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmed.metrics import _checks

_GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm / SSFDEncoder
_SSFD_TAP = re.compile(r"^block([1-9][0-9]*)_relu([12])$")

# VGG-16 (torchvision cfg "D" = Keras VGG16): 2, 2, 3, 3, 3 convs (3x3, ReLU) per block, a 2x2
# max-pool after each block. Taps relu{b}_{i} and pool{b}, in network order, as in
# jaxmed.models.vgg.LAYER_NAMES (that module imports flax).
VGG_LAYERS = tuple(name for b, convs in enumerate((2, 2, 3, 3, 3), 1)
                   for name in [f"relu{b}_{i}" for i in range(1, convs + 1)] + [f"pool{b}"])
# Keras ``preprocess_input(mode="caffe")``: BGR means of ImageNet on the [0, 255] scale.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision ImageNet normalisation of RGB in [0, 1].
_TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
_TORCH_STD_RGB = (0.229, 0.224, 0.225)
_PREPROCESS = ("caffe", "torch")


def ssfd(pred, target, *, encoder_params, layers=("block4_relu2",), weights=None,
         num_groups=10):
  """Self-supervised feature distance (SSFD; Sec. 2.3 of ssfd_feature_distance), per image.

  Both images become magnitude images (if complex), are z-scored per image (mean and unbiased
  standard deviation over all pixels; a constant image becomes all zeros) and pass separately
  through the SSFD encoder (:class:`jaxmed.models.SSFDEncoder`, meddlr's ``SSFD_Encoder``). For
  every requested layer the score is the mean over positions and channels of the squared feature
  difference (meddlr: the mean over channels of the spatial MSE); the total is the weighted sum
  over layers, ``sum_l weights_l * score_l``. Only the blocks up to the deepest requested layer
  run.

  Layer names: ``block{k}_relu2`` (the second ReLU of block ``k``, meddlr's taps; the default
  ``block4_relu2`` is meddlr's default) and ``block{k}_relu1`` (the first ReLU). The paper counts
  convolutions: its "3rd, 5th, 7th, 9th" layers are ``block2_relu1`` .. ``block5_relu1``, the 9th
  (bottleneck) ``block5_relu1``.

  Args:
    pred, target: ``(N, H, W)`` or ``(N, H, W, 1)`` real or complex images of the same shape.
      ``H`` and ``W`` must be at least ``2**(K - 1)`` for the deepest requested block ``K``.
    encoder_params: the parameters of an :class:`jaxmed.models.SSFDEncoder` (``block{k}/conv1``,
      ``conv2`` ``{kernel, bias}``, ``norm/{scale, bias}``), as ``variables["params"]``, the
      whole ``variables`` (``{"params": ...}``), or the parameters of an
      :class:`jaxmed.models.SSFDUNet` (its ``encoder`` subtree is used). 2D encoders with one
      input channel.
    layers: the layer names to compare (a name or a sequence of distinct names).
    weights: one non-negative weight per layer, shape ``(len(layers),)``; default 1 each.
    num_groups: GroupNorm groups of the encoder (``SSFDEncoder.num_groups``, 10 in SSFD). The
      parameters do not record it: a wrong value that divides the channels runs and gives other
      features.

  Returns:
    ``(scores, per_layer)``: ``scores`` ``(N,)`` float32, the weighted sum; ``per_layer`` a dict
    ``{layer: (N,) float32}`` with the unweighted score of every requested layer.

  Raises:
    ValueError: shape mismatch or a rank / channel count other than above, NaN/Inf in a concrete
      input, an unknown layer name or one whose block ``encoder_params`` lacks (the message lists
      the available layers), duplicate layers, ``weights`` of the wrong length, complex,
      non-finite or (concrete) negative, parameters that are not an SSFD encoder's,
      ``num_groups`` not dividing a block's channels, or images smaller than ``2**(K - 1)``.
  """
  fn = "ssfd"
  pred, target = _grayscale_pair(fn, pred, target)
  params = _ssfd_params(fn, encoder_params)
  layers = _ssfd_layers(fn, layers, params)
  deepest = max(int(_SSFD_TAP.match(name).group(1)) for name in layers)
  factor = 2**(deepest - 1)
  if min(pred.shape[1:3]) < factor:
    raise ValueError(f"{fn}: pred shape {pred.shape}: H and W must be >= {factor} = "
                     f"2**{deepest - 1} to reach block{deepest}")
  _check_ssfd_params(fn, params, deepest, num_groups)
  if weights is None:
    weights = np.ones(len(layers), np.float32)
  else:
    weights = _checks.as_array(fn, "weights", weights)
    if weights.shape != (len(layers),):
      raise ValueError(f"{fn}: weights must have shape ({len(layers)},), one per layer of "
                       f"layers={layers}; got shape {weights.shape}")
    _checks.real(fn, "weights", weights)
    _checks.finite(fn, "weights", weights)
    _checks.nonnegative(fn, "weights", weights, "layer weights (a distance is a sum of squares)")
  needed = {f"block{k}": params[f"block{k}"] for k in range(1, deepest + 1)}
  return _ssfd(pred, target, needed, weights, layers=layers, num_groups=int(num_groups))


def vgg_perceptual_distance(pred, target, *, vgg_params, layer="relu3_3", preprocess="caffe"):
  """VGG-16 perceptual distance (VGG-PL, appendix 5.2 of ssfd_feature_distance), per image.

  Each image becomes a magnitude image (if complex), is replicated to 3 channels (pseudo-RGB),
  min-max scaled to ``[0, 255]`` per image (a constant image becomes 0) and normalised as the
  weights expect; then a plain VGG-16 runs up to ``layer`` and the distance is the mean over
  positions and channels of the squared feature difference. The paper truncates the Keras model
  after ``relu3_3`` (the default).

  Args:
    pred, target: ``(N, H, W)`` or ``(N, H, W, 1)`` real or complex images of the same shape.
      ``H`` and ``W`` must be at least ``2**p`` for the ``p`` max-pools before ``layer``.
    vgg_params: the parameters of a :class:`jaxmed.models.VGG16` with ``batch_norm=False`` and
      3 input channels (``conv{b}_{i}/{kernel, bias}``), as ``variables["params"]`` or the whole
      ``variables``.
    layer: the tap to compare: ``relu{b}_{i}`` or ``pool{b}`` (see :data:`VGG_LAYERS`).
    preprocess: ``"caffe"`` for Keras / Caffe weights (``keras.applications.vgg16``
      ``preprocess_input``: RGB -> BGR, subtract the ImageNet means ``[103.939, 116.779,
      123.68]``, stay on the 0-255 scale), or ``"torch"`` for torchvision weights (divide by
      255, subtract mean ``(0.485, 0.456, 0.406)``, divide by std ``(0.229, 0.224, 0.225)``,
      RGB).

  Returns:
    ``(N,)`` float32 distances.

  Raises:
    ValueError: shape mismatch or a rank / channel count other than above, NaN/Inf in a concrete
      input, an unknown ``layer`` or ``preprocess``, BatchNorm parameters (VGG16 with
      ``batch_norm=True``), missing or mis-shaped convolution parameters, or images too small
      for the pools before ``layer``.
  """
  fn = "vgg_perceptual_distance"
  pred, target = _grayscale_pair(fn, pred, target)
  if layer not in VGG_LAYERS:
    raise ValueError(f"{fn}: unknown layer {layer!r}; valid layers: {VGG_LAYERS}")
  if preprocess not in _PREPROCESS:
    raise ValueError(f"{fn}: preprocess must be one of {_PREPROCESS}; got {preprocess!r}")
  stop = VGG_LAYERS.index(layer) + 1
  pools = sum(name.startswith("pool") for name in VGG_LAYERS[:stop])
  if min(pred.shape[1:3]) < 2**pools:
    raise ValueError(f"{fn}: pred shape {pred.shape}: H and W must be >= {2**pools} for the "
                     f"{pools} max-pool(s) before layer {layer!r}")
  params = _vgg_params(fn, vgg_params, VGG_LAYERS[:stop])
  return _vgg_distance(pred, target, params, layer=layer, preprocess=preprocess)


# ---------------------------------------------------------------------------------------------
# Validation (host side, before tracing).


def _grayscale_pair(fn: str, pred, target):
  pred = _checks.as_array(fn, "pred", pred)
  target = _checks.as_array(fn, "target", target)
  _checks.same_shape(fn, "pred", pred, "target", target)
  _checks.rank_in(fn, "pred", pred, (3, 4), "(N, H, W) or (N, H, W, 1)")
  if pred.shape[0] < 1:
    raise ValueError(f"{fn}: pred needs at least one image; got shape {pred.shape}")
  if pred.ndim == 4 and pred.shape[-1] != 1:
    raise ValueError(f"{fn}: pred of shape (N, H, W, C) must have C = 1 (a grayscale or complex "
                     f"image); got shape {pred.shape}")
  _checks.finite(fn, "pred", pred)
  _checks.finite(fn, "target", target)
  return pred, target


def _unwrap(tree, key: str):
  """``tree[key]`` if ``tree`` is a mapping holding ``key``, else ``tree``."""
  return tree[key] if isinstance(tree, Mapping) and key in tree else tree


def _leaf_shape(params, path: tuple[str, ...]):
  """Shape of ``params[path[0]]...[path[-1]]``, or None if a level is missing."""
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return np.shape(node)


def _ssfd_params(fn: str, tree) -> Mapping:
  params = _unwrap(_unwrap(tree, "params"), "encoder")
  if not isinstance(params, Mapping) or "block1" not in params:
    keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    raise ValueError(f"{fn}: encoder_params must be the params of jaxmed.models.SSFDEncoder "
                     f"(keys block1, block2, ...), its variables {{'params': ...}}, or an "
                     f"SSFDUNet's params (with an 'encoder' subtree); got {keys}")
  return params


def _ssfd_available(params: Mapping) -> tuple[str, ...]:
  """Tap names of the consecutive blocks ``block1 .. blockK`` present in ``params``."""
  k = 0
  while f"block{k + 1}" in params:
    k += 1
  return tuple(f"block{b}_relu{r}" for b in range(1, k + 1) for r in (1, 2))


def _ssfd_layers(fn: str, layers, params: Mapping) -> tuple[str, ...]:
  layers = (layers,) if isinstance(layers, str) else tuple(layers)
  if not layers:
    raise ValueError(f"{fn}: layers must name at least one layer; got layers={layers}")
  if len(set(layers)) != len(layers):
    raise ValueError(f"{fn}: layers must be distinct; got layers={layers}")
  available = _ssfd_available(params)
  unknown = [name for name in layers if name not in available]
  if unknown:
    raise ValueError(f"{fn}: layers {unknown} are not available in encoder_params; available "
                     f"layers: {available} (block{{k}}_relu1 / block{{k}}_relu2 of the blocks "
                     f"the parameters hold)")
  return layers


def _check_ssfd_params(fn: str, params: Mapping, deepest: int, num_groups) -> None:
  """The blocks ``1 .. deepest`` hold convs (and, before ``deepest``, a GroupNorm) that chain."""
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
      or num_groups < 1:
    raise ValueError(f"{fn}: num_groups must be a positive integer; got {num_groups!r}")
  cin = 1
  for k in range(1, deepest + 1):
    parts = ("conv1", "conv2") + (("norm",) if k < deepest else ())
    for part in parts:
      for leaf in (("scale", "bias") if part == "norm" else ("kernel", "bias")):
        if _leaf_shape(params, (f"block{k}", part, leaf)) is None:
          raise ValueError(f"{fn}: encoder_params lack block{k}/{part}/{leaf}; expected the "
                           "params of jaxmed.models.SSFDEncoder")
    for part in ("conv1", "conv2"):
      shape = _leaf_shape(params, (f"block{k}", part, "kernel"))
      if len(shape) != 4 or shape[:2] != (3, 3) or shape[2] != cin:
        raise ValueError(f"{fn}: encoder_params block{k}/{part}/kernel must have shape "
                         f"(3, 3, {cin}, C) (a 2D encoder with 1 input channel); got {shape}")
      cin = shape[3]
      bias = _leaf_shape(params, (f"block{k}", part, "bias"))
      if bias != (cin,):
        raise ValueError(f"{fn}: encoder_params block{k}/{part}/bias must have shape ({cin},); "
                         f"got {bias}")
    if k < deepest:
      for leaf in ("scale", "bias"):
        shape = _leaf_shape(params, (f"block{k}", "norm", leaf))
        if shape != (cin,):
          raise ValueError(f"{fn}: encoder_params block{k}/norm/{leaf} must have shape "
                           f"({cin},); got {shape}")
      if cin % num_groups:
        raise ValueError(f"{fn}: num_groups={num_groups} must divide the {cin} channels of "
                         f"block{k}/norm (pass the SSFDEncoder's num_groups)")


def _vgg_params(fn: str, tree, names: Sequence[str], arg: str = "vgg_params") -> dict:
  """The ``conv{b}_{i}`` parameters the layers ``names`` need, checked; BatchNorm refused.

  ``arg`` is the caller's name for ``tree`` in the error messages.
  """
  if isinstance(tree, Mapping) and "batch_stats" in tree:
    raise ValueError(f"{fn}: {arg} hold batch_stats: only plain VGG16 (batch_norm=False, "
                     "as Keras and torchvision vgg16) is supported, not vgg16_bn")
  params = _unwrap(tree, "params")
  if not isinstance(params, Mapping):
    raise ValueError(f"{fn}: {arg} must be the params of jaxmed.models.VGG16 (a mapping "
                     f"with conv1_1, conv1_2, ...); got {type(params).__name__}")
  norms = sorted(k for k in params if str(k).startswith("bn"))
  if norms:
    raise ValueError(f"{fn}: {arg} hold BatchNorm layers {norms[:3]}...: only plain VGG16 "
                     "(batch_norm=False, as Keras and torchvision vgg16) is supported")
  needed, cin = {}, 3
  for name in names:
    if not name.startswith("relu"):
      continue
    conv = "conv" + name[len("relu"):]
    kernel = _leaf_shape(params, (conv, "kernel"))
    if kernel is None or _leaf_shape(params, (conv, "bias")) is None:
      raise ValueError(f"{fn}: {arg} lack {conv}/kernel or {conv}/bias; expected the params "
                       f"of jaxmed.models.VGG16 (got keys {sorted(params)[:6]}...)")
    if len(kernel) != 4 or kernel[:3] != (3, 3, cin):
      raise ValueError(f"{fn}: {arg} {conv}/kernel must have shape (3, 3, {cin}, C) "
                       f"(a VGG16 on 3-channel input); got {kernel}")
    cin = kernel[3]
    if _leaf_shape(params, (conv, "bias")) != (cin,):
      raise ValueError(f"{fn}: {arg} {conv}/bias must have shape ({cin},); got "
                       f"{_leaf_shape(params, (conv, 'bias'))}")
    needed[conv] = {"kernel": params[conv]["kernel"], "bias": params[conv]["bias"]}
  return needed


# ---------------------------------------------------------------------------------------------
# Kernels (pure JAX, traced once per static configuration).


def _magnitude(x):
  """``(N, H, W[, 1])`` real or complex -> ``(N, H, W, 1)`` float32 (magnitude if complex)."""
  if jnp.iscomplexobj(x):
    x = jnp.abs(x)
  x = x.astype(jnp.float32)
  return x if x.ndim == 4 else x[..., None]


def _conv3x3(x, p):
  """3x3 convolution, padding 1, plus bias (``flax.linen.Conv`` on ``(N, H, W, C)``)."""
  kernel = jnp.asarray(p["kernel"], jnp.float32)
  y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + jnp.asarray(p["bias"], jnp.float32)


def _max_pool2(x):
  """2x2 stride-2 max-pool, odd sizes floored (``torch.nn.MaxPool2d(2)``)."""
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _group_norm(x, p, num_groups: int):
  """GroupNorm over ``(H, W, C / num_groups)`` per group, eps 1e-5, affine, in float32."""
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, num_groups, c // num_groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
  g = (g - mean) * lax.rsqrt(var + _GROUP_NORM_EPS)
  return (g.reshape(n, h, w, c) * jnp.asarray(p["scale"], jnp.float32) +
          jnp.asarray(p["bias"], jnp.float32))


def _zscore(x):
  """Per-image ``(x - mean) / std`` with the unbiased std over all pixels; constant -> 0."""
  axes = tuple(range(1, x.ndim))
  centered = x - jnp.mean(x, axis=axes, keepdims=True)
  count = x.size // x.shape[0]
  var = jnp.sum(jnp.square(centered), axis=axes, keepdims=True) / max(count - 1, 1)
  std = jnp.sqrt(var)
  return centered / jnp.where(std > 0, std, 1.0)


def _mean_sq_diff(features, n: int):
  """``features`` of ``[pred; target]`` (2N, ...) -> (N,) mean squared difference per image."""
  diff = features[:n] - features[n:]
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _ssfd_features(x, params, layers: tuple[str, ...], num_groups: int) -> dict:
  """The SSFD encoder's taps ``layers`` of ``x`` ``(N, H, W, 1)``, stopping at the deepest."""
  wanted = {(int(m.group(1)), int(m.group(2))): name
            for name, m in ((name, _SSFD_TAP.match(name)) for name in layers)}
  last = max(wanted)
  feats = {}
  for k in range(1, last[0] + 1):
    block = params[f"block{k}"]
    if k > 1:
      x = _max_pool2(x)
    for r in (1, 2):
      x = jax.nn.relu(_conv3x3(x, block[f"conv{r}"]))
      if (k, r) in wanted:
        feats[wanted[(k, r)]] = x
      if (k, r) == last:
        return feats
    x = _group_norm(x, block["norm"], num_groups)
  return feats


@functools.partial(jax.jit, static_argnames=("layers", "num_groups"))
def _ssfd(pred, target, params, weights, *, layers, num_groups):
  n = pred.shape[0]
  x = jnp.concatenate([_zscore(_magnitude(pred)), _zscore(_magnitude(target))])
  feats = _ssfd_features(x, params, layers, num_groups)
  per_layer = {name: _mean_sq_diff(feats[name], n) for name in layers}
  weights = jnp.asarray(weights, jnp.float32)
  scores = sum(weights[i] * per_layer[name] for i, name in enumerate(layers))
  return scores, per_layer


def _vgg_input(x, preprocess: str):
  """``(N, H, W[, 1])`` -> pseudo-RGB ``(N, H, W, 3)`` min-max scaled to [0, 255], normalised."""
  x = _magnitude(x)
  lo = jnp.min(x, axis=(1, 2, 3), keepdims=True)
  hi = jnp.max(x, axis=(1, 2, 3), keepdims=True)
  x = jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0) * 255.0
  rgb = jnp.broadcast_to(x, x.shape[:3] + (3,))
  if preprocess == "caffe":
    return rgb[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)
  return (rgb / 255.0 - jnp.asarray(_TORCH_MEAN_RGB, jnp.float32)) / jnp.asarray(
      _TORCH_STD_RGB, jnp.float32)


@functools.partial(jax.jit, static_argnames=("layer", "preprocess"))
def _vgg_distance(pred, target, params, *, layer, preprocess):
  n = pred.shape[0]
  x = jnp.concatenate([_vgg_input(pred, preprocess), _vgg_input(target, preprocess)])
  for name in VGG_LAYERS[:VGG_LAYERS.index(layer) + 1]:
    if name.startswith("pool"):
      x = _max_pool2(x)
    else:
      x = jax.nn.relu(_conv3x3(x, params["conv" + name[len("relu"):]]))
  return _mean_sq_diff(x, n)
