"""SSFD context-prediction pre-training (ssfd_feature_distance Sec. 2.2 and appendix 5.1).

Every image is z-scored per image and channel (mean and unbiased standard deviation, as the SSFD
metric normalises its inputs), zero-filled ``16 x 16`` patches are placed over 25% of it by
Poisson-disc sampling (`jaxmed.pretext.context_mask`), and an :class:`jaxmed.models.SSFDUNet`
(5 levels, 20-320 filters, GroupNorm, dropout 0.1) restores the whole normalised image under an
L2 loss. Its encoder then defines the SSFD metric: `encoder_params` gives the parameters that
:class:`jaxmed.models.SSFDEncoder` and ``jaxmed.metrics.ssfd(..., encoder_params=...)`` take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.losses import l2_loss
from jaxmed.methods.base import Method, compute_dtype
from jaxmed.models.ssfd_unet import SSFDUNet
from jaxmed.pretext.context_mask import context_inpaint


def standardize(images: jax.Array) -> jax.Array:
  """Per-image, per-channel z-score ``(x - mean) / std`` (unbiased std over H, W), float32.

  A constant channel (std 0) becomes all zeros.

  Args:
    images: ``(N, H, W, C)``.

  Returns:
    ``(N, H, W, C)`` float32.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C); got shape {images.shape}")
  if images.shape[1] * images.shape[2] < 2:
    raise ValueError(f"images need at least 2 pixels for an unbiased std; got shape "
                     f"{images.shape}")
  x = images.astype(jnp.float32)
  centered = x - jnp.mean(x, axis=(1, 2), keepdims=True)
  std = jnp.std(x, axis=(1, 2), ddof=1, keepdims=True)
  return centered / jnp.where(std > 0, std, 1.0)


def encoder_params(variables):
  """The SSFD encoder's parameters from :class:`SSFDUNet` variables: ``variables["params"]
  ["encoder"]``, what ``SSFDEncoder.apply({"params": ...}, x)`` and ``jaxmed.metrics.ssfd(...,
  encoder_params=...)`` take."""
  params = variables.get("params") if hasattr(variables, "get") else None
  if params is None or "encoder" not in params:
    keys = sorted(variables) if hasattr(variables, "keys") else type(variables).__name__
    raise ValueError(f"variables must be SSFDUNet variables {{'params': {{'encoder': ...}}}}; "
                     f"got keys {keys}")
  return params["encoder"]


class ContextPredictionMethod(Method):
  """Config: ``model.chans`` (20), ``model.num_pool_layers`` (4), ``model.num_groups`` (10),
  ``model.dropout`` (0.1), ``model.dtype``; ``pretext.patch`` (16), ``pretext.coverage``
  (0.25); ``data.modalities`` (the channels restored). Image sides must be divisible by
  ``2**num_pool_layers`` and at least ``patch``."""

  name = "context_prediction"

  def build_model(self):
    m = self.config.model
    return SSFDUNet(out_channels=len(self.config.data.modalities), chans=int(m.chans),
                    num_pool_layers=int(m.num_pool_layers), num_groups=int(m.num_groups),
                    dropout=float(m.dropout), dtype=compute_dtype(m.get("dtype", "float32")))

  def model_inputs(self, batch):
    return batch["image"]

  def _inpaint(self, key, normalized):
    cfg = self.config.pretext
    return context_inpaint(key, normalized, patch=int(cfg.patch), coverage=float(cfg.coverage))

  def corrupt(self, key, image):
    """``(corrupted, mask)``: the z-scored ``(N, H, W, C)`` images with Poisson-disc patches
    zero-filled, and the ``(N, H, W)`` bool mask, True in the patches."""
    return self._inpaint(key, standardize(image))

  def loss(self, variables, batch, key, *, train):
    mask_key, dropout_key = jax.random.split(key)
    target = standardize(batch["image"])
    corrupted, mask = self._inpaint(mask_key, target)
    pred, model_state = self.apply(variables, corrupted, dropout_key, train=train)
    loss = l2_loss(pred, target)
    metrics = {"l2": loss, "masked_l2": l2_loss(pred, target, mask[..., None]),
               "masked_fraction": jnp.mean(mask.astype(jnp.float32))}
    return loss, metrics, model_state

  def pretext_example(self, key, batch):
    """``(network input, target)`` for ``batch["image"]`` ``(N, H, W, C)``: the z-scored images
    with their patches zero-filled, and the z-scored images."""
    corrupted, _ = self.corrupt(key, batch["image"])
    return corrupted, standardize(batch["image"])

  def reconstruct(self, variables, image, key):
    """``(corrupted, prediction)`` in the z-scored intensity scale, eval mode."""
    corrupted, _ = self.corrupt(key, image)
    pred, _ = self.apply(variables, corrupted, None, train=False)
    return corrupted, pred
