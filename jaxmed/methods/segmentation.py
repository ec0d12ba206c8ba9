"""Supervised segmentation of overlapping regions (BraTS WT/TC/ET, WMH) with a UNet.

Used for fine-tuning pre-trained encoders (source_identification Sec. 5.4) and for training from
scratch. One sigmoid output per region; loss soft Dice + binary cross-entropy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmed.data.subject import label_regions, region_names
from jaxmed.losses import sigmoid_dice_ce_loss
from jaxmed.methods.base import Method
from jaxmed.methods.inpainting import build_unet
from jaxmed.metrics import dice


class SegmentationMethod(Method):
  """Config: ``model`` (UNet fields), ``data.pathology`` ("tumour" or "wmh")."""

  name = "segmentation"

  @property
  def regions(self) -> tuple[str, ...]:
    return region_names(self.config.data.pathology)

  def build_model(self):
    return build_unet(self.config.model, out_channels=len(self.regions))

  def model_inputs(self, batch):
    return batch["image"]

  def targets(self, batch):
    """``(N, H, W, R)`` bool region masks from the label map."""
    return label_regions(batch["label"], self.config.data.pathology)

  def loss(self, variables, batch, key, *, train):
    logits, model_state = self.apply(variables, batch["image"], key, train=train)
    target = self.targets(batch)
    loss = sigmoid_dice_ce_loss(logits, target)
    per_region = jnp.nanmean(dice(logits > 0, target), axis=0)
    metrics = {f"dice_{name}": per_region[i] for i, name in enumerate(self.regions)}
    return loss, metrics, model_state

  @functools.cached_property
  def jitted_predict(self):
    """`predict` compiled once per method instance."""
    return jax.jit(self.predict)

  def predict(self, variables, image):
    """``(N, H, W, R)`` bool region predictions, eval mode."""
    logits, _ = self.apply(variables, image, None, train=False)
    return logits > 0
