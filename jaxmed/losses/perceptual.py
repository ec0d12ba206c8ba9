"""Perceptual losses through a frozen loss network: the CoPer loss (Eqs. 3-4 of
coper_contrastive_perceptual_metric) and its slice-wise use on volumes, ViT-AE++'s perceptual
loss (Eq. 1 of vit_ae_plus_plus).

    features_fn = network_features(VGG16(batch_norm=True), variables)   # frozen, eval mode
    loss = coper_loss(pred, target, features_fn)     # gradient to pred, none to the network
    loss = volume_perceptual_loss(pred_volume, target_volume, features_fn, num_slices=8, key=k)

``coper_loss`` is pure: ``features_fn(x (N, H, W, 3)) -> {tap: (N, H_i, W_i, C_i)}`` is any
function of an image batch (a dict or a sequence of tap arrays). :func:`network_features` builds
one from a jaxmed VGG-16 / ResNet Flax module and its variables, in eval mode (batch norm with
its running statistics, nothing updated) and with ``stop_gradient`` on the variables, so no
gradient ever reaches the loss network. This module imports nothing of jaxmed (the tap names of
the networks are repeated here).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# ReLU taps read by default (LPIPS's: relu1_2 .. relu5_3 of VGG-16; for a ResNet the ReLU after
# conv1/bn1 before the max-pool, then the output of every stage, each ending in a ReLU), keyed
# by the Flax module's class name. As jaxmed.models.vgg.LPIPS_TAPS and the ResNet feature names.
DEFAULT_TAPS = {
    "VGG16": ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"),
    "ResNet": ("stem", "layer1", "layer2", "layer3", "layer4"),
}
# How an image in [-1, 1] is mapped to the loss network's input (`network_features`):
# "none": as it is (LPIPS's convention); "unit": to [0, 1]; "imagenet": to [0, 1], then
# standardised per channel with torchvision's ImageNet mean and std (torchvision weights);
# "swav": the same with the std as written in swav/src/multicropdataset.py (0.228 for red),
# which jaxmed's SwAV and SimSiam pre-training use.
PREPROCESS = ("none", "unit", "imagenet", "swav")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_STD = {"imagenet": (0.229, 0.224, 0.225), "swav": (0.228, 0.224, 0.225)}

FeaturesFn = Callable[[jax.Array], "Mapping[str, jax.Array] | Sequence[jax.Array]"]


def _taps(features) -> list[jax.Array]:
  if isinstance(features, Mapping):
    taps = list(features.values())
  elif isinstance(features, Sequence) and not isinstance(features, str):
    taps = list(features)
  else:
    raise TypeError(f"features_fn must return a dict or a sequence of tap arrays; got "
                    f"{type(features).__name__}")
  if not taps:
    raise ValueError("features_fn returned no tap")
  return taps


def _check_pair(fn: str, pred, target, features_fn, layout: str) -> tuple[jax.Array, jax.Array]:
  """``pred`` and ``target`` as real arrays of one shape laid out as ``layout``."""
  if not callable(features_fn):
    raise TypeError(f"{fn}: features_fn must be callable; got {type(features_fn).__name__}")
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  ndim = len(layout.split(","))
  if pred.ndim != ndim:
    raise ValueError(f"{fn}: pred must be {layout} (ndim {ndim}); got shape {pred.shape}")
  if target.shape != pred.shape:
    raise ValueError(f"{fn}: target shape {target.shape} must equal pred shape {pred.shape}")
  if 0 in pred.shape:
    raise ValueError(f"{fn}: pred must be non-empty (no axis of size 0: the loss would be a mean "
                     f"over nothing); got shape {pred.shape}")
  for name, x in (("pred", pred), ("target", target)):
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      raise ValueError(f"{fn}: {name} must be real; got complex dtype {x.dtype}")
  return pred, target


def coper_loss(pred: jax.Array, target: jax.Array, features_fn: FeaturesFn) -> jax.Array:
  """CoPer loss, Eqs. 3-4 of coper_contrastive_perceptual_metric.

  Every channel ``j`` of ``pred`` and ``target`` is compared alone: it is repeated to 3 channels
  and passed through ``features_fn``; for each tap ``i`` Eq. 3 is the feature MSE
  ``||phi_ij(y_j) - phi_ij(yhat_j)||^2 / (C_i H_i W_i)`` (no unit normalisation, no weights), and
  Eq. 4 averages it over the ``n`` target channels and the ``L`` taps (the paper's ``1/(mn)``
  read as ``1/(n L)``), and here also over the batch:

      L = 1 / (n L) sum_j sum_i mean_batch ||phi_ij(y_j) - phi_ij(yhat_j)||^2 / (C_i H_i W_i)

  The target's features carry no gradient (``stop_gradient``); the gradient flows to ``pred``
  through ``features_fn``, which should hold its network's variables constant (as
  :func:`network_features` does). The channels of a batch go through ``features_fn`` as one
  batch of ``N n`` images, the target's and the prediction's in two calls.

  Args:
    pred: ``(N, H, W, n)`` prediction (e.g. a generator's output in [-1, 1]).
    target: ``(N, H, W, n)`` ground truth, same shape.
    features_fn: ``(M, H, W, 3) -> {tap: (M, H_i, W_i, C_i)}`` (or a sequence of taps): the
      frozen loss network's ReLU activations, e.g. from :func:`network_features`.

  Returns:
    float32 scalar.

  Raises:
    ValueError: a rank other than 4, shapes that differ, an axis of size 0, complex input, or
      ``features_fn`` giving different taps for the two (TypeError: ``features_fn`` not
      callable). Values are whatever ``features_fn`` expects: no range is checked.
  """
  pred, target = _check_pair("coper_loss", pred, target, features_fn, "(N, H, W, C)")

  def per_channel(x):
    # (N, H, W, n) -> (n N, H, W, 3): channel j alone, grey repeated to 3 channels.
    n, h, w, c = x.shape
    x = jnp.moveaxis(x, -1, 0).reshape(c * n, h, w, 1)
    return jnp.repeat(x, 3, axis=-1)

  pred_taps = _taps(features_fn(per_channel(pred)))
  target_taps = _taps(features_fn(per_channel(jax.lax.stop_gradient(target))))
  if len(pred_taps) != len(target_taps):
    raise ValueError(f"features_fn gave {len(pred_taps)} taps for pred and {len(target_taps)} "
                     "for target")
  terms = []
  for i, (p, t) in enumerate(zip(pred_taps, target_taps)):
    if p.shape != t.shape:
      raise ValueError(f"tap {i}: pred features {p.shape} != target features {t.shape}")
    diff = p.astype(jnp.float32) - jax.lax.stop_gradient(t).astype(jnp.float32)
    # Every image's squared norm / (C H W), averaged over the n N images: the mean.
    terms.append(jnp.mean(jnp.square(diff)))
  return jnp.mean(jnp.stack(terms))


def slice_indices(key: jax.Array, depth: int, num_slices: int) -> jax.Array:
  """The ``num_slices`` slice indices in ``[0, depth)`` that `volume_perceptual_loss` draws
  from ``key``: without replacement, in drawn order, ``(num_slices,)`` int32."""
  return jax.random.choice(key, depth, (num_slices,), replace=False)


def volume_perceptual_loss(pred: jax.Array, target: jax.Array, features_fn: FeaturesFn, *,
                           num_slices: int = 0, key: jax.Array | None = None,
                           stop_gradient: bool = False) -> jax.Array:
  """Slice-wise perceptual loss of a volume, Eq. 1 of vit_ae_plus_plus.

      L_per = mean over slices i, modalities j, taps l of
              ||VGG_l(x_ij) - VGG_l(xhat_ij)||^2 / (C_l H_l W_l)

  The 2D slices are taken along the first spatial axis ``D`` (the reference code's), each
  example's ``d`` slices become ``N d`` images, and `coper_loss` compares them: every modality
  alone repeated to 3 channels, the feature MSE per tap averaged over the taps, the modalities
  and the images (the paper's sum over slices read as the reference code's mean). With
  ``num_slices > 0`` only that many slice indices are used, drawn without replacement from
  ``key`` (`slice_indices`; the same indices for ``pred`` and ``target`` and for every example),
  which bounds the cost of a VGG pass per slice; ``0`` uses all ``D`` slices.

  Gradient: by default (the paper, whose Eq. 4 trains on it) the loss flows back to ``pred``;
  ``stop_gradient=True`` is the reference code's behaviour (computed under ``torch.no_grad``,
  only logged): same value, zero gradient to ``pred``. The target never gets a gradient, and
  neither does the loss network when ``features_fn`` holds its variables constant (as
  :func:`network_features` does).

  Args:
    pred: ``(N, D, H, W, C)`` reconstruction, ``C`` modalities.
    target: ``(N, D, H, W, C)`` ground truth, same shape.
    features_fn: ``(M, H, W, 3) -> {tap: (M, H_l, W_l, C_l)}``, as for `coper_loss` (ViT-AE++:
      a VGG-16's relu1_2, relu2_2, relu3_3, relu4_3, no ImageNet normalisation).
    num_slices: number of slices per volume, in ``[0, D]`` (0: all); static.
    key: PRNG key of the slice draw; required when ``num_slices > 0``.
    stop_gradient: ``True`` for the reference code's logged-only loss.

  Returns:
    float32 scalar.

  Raises:
    ValueError: as :func:`coper_loss` (rank 5), ``num_slices`` not an int in ``[0, D]``, no
      ``key`` for ``num_slices > 0``.
  """
  fn = "volume_perceptual_loss"
  pred, target = _check_pair(fn, pred, target, features_fn, "(N, D, H, W, C)")
  depth = pred.shape[1]
  if isinstance(num_slices, bool) or not isinstance(num_slices, (int, np.integer)) or not (
      0 <= num_slices <= depth):
    raise ValueError(f"{fn}: num_slices must be an int in [0, D={depth}]; got {num_slices!r}")
  if num_slices > 0 and key is None:
    raise ValueError(f"{fn}: key is required when num_slices > 0 (got num_slices={num_slices})")
  if stop_gradient:
    pred = jax.lax.stop_gradient(pred)
  if num_slices > 0:
    idx = slice_indices(key, depth, int(num_slices))
    pred, target = jnp.take(pred, idx, axis=1), jnp.take(target, idx, axis=1)

  def slices(x):  # (N, d, H, W, C) -> (N d, H, W, C)
    return x.reshape(-1, *x.shape[2:])

  return coper_loss(slices(pred), slices(target), features_fn).astype(jnp.float32)


def preprocess_image(x: jax.Array, mode: str = "none") -> jax.Array:
  """Maps an image batch ``(N, H, W, 3)`` in [-1, 1] to a loss network's input (`PREPROCESS`)."""
  if mode not in PREPROCESS:
    raise ValueError(f"preprocess must be one of {PREPROCESS}; got {mode!r}")
  if mode == "none":
    return x
  x = (x + 1.0) * 0.5
  if mode == "unit":
    return x
  if x.shape[-1] != 3:
    raise ValueError(f"preprocess={mode!r} needs 3 channels; got shape {x.shape}")
  return (x - jnp.asarray(_IMAGENET_MEAN, x.dtype)) / jnp.asarray(_STD[mode], x.dtype)


def default_taps(module: Any) -> tuple[str, ...]:
  """The ReLU taps `network_features` reads from ``module`` by default (`DEFAULT_TAPS`)."""
  name = type(module).__name__
  if name not in DEFAULT_TAPS:
    raise ValueError(f"no default taps for a {name}; pass taps= (known defaults: "
                     f"{sorted(DEFAULT_TAPS)})")
  return DEFAULT_TAPS[name]


def network_features(module: Any, variables: Mapping[str, Any], *,
                     taps: Sequence[str] | None = None,
                     preprocess: str = "none") -> Callable[[jax.Array], dict[str, jax.Array]]:
  """``features_fn`` for `coper_loss` from a frozen Flax loss network.

  The network runs in eval mode (``train=False``: batch norm with its running statistics, no
  dropout, no collection updated) on ``preprocess_image(x, preprocess)``, with
  ``jax.lax.stop_gradient`` on ``variables``: the gradient of a loss built on it with respect to
  the variables is exactly zero, while it flows to the input.

  Args:
    module: a Flax module whose ``__call__(x, train=..., ...)`` either takes ``taps=`` and
      returns ``{tap: array}`` (:class:`jaxmed.models.VGG16`, run only up to the deepest tap),
      or takes ``return_features=True`` and returns ``(output, {name: array})``
      (:class:`jaxmed.models.ResNet`).
    variables: the module's Flax variables (``params``, ``batch_stats`` ...).
    taps: feature names to return, in order; default `default_taps` (LPIPS's ReLU taps).
    preprocess: one of `PREPROCESS`: how the [-1, 1] input is mapped to the network's range.

  Returns:
    ``features_fn(x (N, H, W, 3)) -> {tap: (N, H_i, W_i, C_i) float32}``.
  """
  if preprocess not in PREPROCESS:
    raise ValueError(f"preprocess must be one of {PREPROCESS}; got {preprocess!r}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError(f"variables must be Flax variables with 'params'; got "
                    f"{type(variables).__name__}" + (
                        f" with {sorted(variables)}" if isinstance(variables, Mapping) else ""))
  taps = tuple(default_taps(module) if taps is None or not len(taps) else taps)
  takes_taps = "taps" in inspect.signature(type(module).__call__).parameters

  def features_fn(x: jax.Array) -> dict[str, jax.Array]:
    frozen = jax.lax.stop_gradient(variables)
    x = preprocess_image(x, preprocess)
    if takes_taps:
      feats = module.apply(frozen, x, train=False, taps=taps)
    else:
      _, feats = module.apply(frozen, x, train=False, return_features=True)
      missing = [t for t in taps if t not in feats]
      if missing:
        raise ValueError(f"{type(module).__name__} has no feature(s) {missing}; it returns "
                         f"{sorted(feats)}")
    return {t: feats[t].astype(jnp.float32) for t in taps}

  return features_fn
