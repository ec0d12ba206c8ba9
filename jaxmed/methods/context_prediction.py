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
from jaxmed.methods.base import Method
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

  @classmethod
  def default_config(cls):
    # The paper does not give the learning rate; 1e-3 (Adam's usual default), constant.
    return {"model": dict(name="ssfd_unet", chans=20, num_pool_layers=4, num_groups=10,
                          dropout=0.1, dtype="float32"),
            "pretext": dict(patch=16, coverage=0.25),
            "optim": dict(name="adam", schedule="constant", lr=1e-3, weight_decay=0.0),
            "data": dict(modalities=("t2",), shape=(32, 128, 128))}

  derived_model_fields = ("out_channels",)

  def model_arguments(self):
    return {"out_channels": len(self.config.data.modalities)}

  def _inpaint(self, key, normalized):
    cfg = self.config.pretext
    return context_inpaint(key, normalized, patch=int(cfg.patch), coverage=float(cfg.coverage))

  def corrupt(self, key, image):
    """``(corrupted, mask)``: the z-scored ``(N, H, W, C)`` images with Poisson-disc patches
    zero-filled, and the ``(N, H, W)`` bool mask, True in the patches."""
    return self._inpaint(key, standardize(image))

  def loss(self, variables, batch, key, *, train, step=0):
    del step
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
