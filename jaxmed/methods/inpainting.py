"""Grid in-painting pre-training of a 2D UNet (source_identification Sec. 4.1).

Cells of a regular grid are zeroed with probability ``1 - keep_prob`` (Eq. 8) and the UNet
restores the whole image under the L1 + L2 loss of Eq. 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.losses import l1_l2_loss, l1_loss
from jaxmed.methods.base import Method, compute_dtype
from jaxmed.models.unet import UNet
from jaxmed.pretext import grid_inpaint


def build_unet(model_cfg, out_channels: int) -> UNet:
  """A UNet from ``config.model`` (features, norm, num_groups, dropout, downsample, dtype)."""
  return UNet(out_channels=out_channels, features=tuple(model_cfg.features),
              spatial_dims=2, norm=model_cfg.get("norm", "instance"),
              num_groups=int(model_cfg.get("num_groups", 8)),
              dropout=float(model_cfg.get("dropout", 0.0)),
              downsample=model_cfg.get("downsample", "conv"),
              dtype=compute_dtype(model_cfg.get("dtype", "float32")))


class InpaintingMethod(Method):
  """Config: ``model`` (UNet fields), ``pretext.grid``, ``pretext.keep_prob``,
  ``pretext.loss_region`` ("all": the whole image, "masked": masked cells only),
  ``data.modalities`` (number of channels reconstructed)."""

  name = "inpainting"

  def build_model(self):
    return build_unet(self.config.model, out_channels=len(self.config.data.modalities))

  def model_inputs(self, batch):
    return batch["image"]

  def corrupt(self, key, image):
    """``(corrupted image, keep mask)`` for an image batch ``(N, H, W, C)``."""
    cfg = self.config.pretext
    return grid_inpaint(key, image, grid=cfg.grid, keep_prob=float(cfg.keep_prob))

  def loss(self, variables, batch, key, *, train):
    mask_key, dropout_key = jax.random.split(key)
    image = batch["image"]
    corrupted, keep = self.corrupt(mask_key, image)
    pred, model_state = self.apply(variables, corrupted, dropout_key, train=train)
    region = self.config.pretext.get("loss_region", "all")
    if region not in ("all", "masked"):
      raise ValueError(f"pretext.loss_region must be 'all' or 'masked'; got {region!r}")
    weights = None if region == "all" else (~keep)[..., None]
    loss = l1_l2_loss(pred, image, weights)
    metrics = {"l1": l1_loss(pred, image, weights),
               "masked_fraction": 1.0 - jnp.mean(keep.astype(jnp.float32))}
    return loss, metrics, model_state

  def reconstruct(self, variables, image, key):
    """``(corrupted, reconstruction)`` for visualisation, eval mode."""
    corrupted, _ = self.corrupt(key, image)
    pred, _ = self.apply(variables, corrupted, None, train=False)
    return corrupted, pred
