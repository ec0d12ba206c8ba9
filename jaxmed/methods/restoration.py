"""Image restoration pre-training of a 2D UNet: the Models Genesis baselines of
source_identification Sec. 4.

Each image is corrupted by one pretext transform and the UNet restores the original under the
L1 + L2 loss of Eq. 4:

- ``inpaint``: grid cells zeroed with probability ``1 - keep_prob`` (Eq. 8);
- ``local_shuffle``: rows and columns of grid cells permuted with probability ``shuffle_prob``
  (Eq. 9);
- ``super_resolution``: every grid cell replaced by its centre pixel (Eq. 10);
- ``intensity``: a random monotone Bezier curve per image, decreasing with probability
  ``invert_prob`` (Eq. 11).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.losses import l1_l2_loss, l1_loss
from jaxmed.methods._unet import UNET_MODEL, UNetMethod
from jaxmed.methods.base import Method
from jaxmed.pretext.inpaint import grid_inpaint
from jaxmed.pretext.intensity import bezier_intensity
from jaxmed.pretext.local_shuffle import local_shuffle
from jaxmed.pretext.super_resolution import grid_super_resolution


def _inpaint(key, image, cfg):
  corrupted, keep = grid_inpaint(key, image, grid=cfg.grid, keep_prob=float(cfg.keep_prob))
  return corrupted, ~keep


def _local_shuffle(key, image, cfg):
  return local_shuffle(key, image, grid=cfg.grid, prob=float(cfg.shuffle_prob))


def _super_resolution(key, image, cfg):
  del key
  return grid_super_resolution(image, grid=cfg.grid), None


def _intensity(key, image, cfg):
  corrupted, _ = bezier_intensity(key, image, invert_prob=float(cfg.invert_prob))
  return corrupted, None


# name -> (corrupt(key, image, config.pretext) -> (corrupted, corrupted-cell mask or None),
#          name of the metric reporting the mask's mean, or None).
CORRUPTIONS = {
    "inpaint": (_inpaint, "masked_fraction"),
    "local_shuffle": (_local_shuffle, "shuffled_fraction"),
    "super_resolution": (_super_resolution, None),
    "intensity": (_intensity, None),
}
LOSS_REGIONS = ("all", "masked")


class RestorationMethod(UNetMethod, Method):
  """Config: ``model`` (UNet fields), ``pretext.corruption`` (one of `CORRUPTIONS`),
  ``pretext.grid`` (cell size), ``pretext.keep_prob`` (inpaint), ``pretext.shuffle_prob``
  (local_shuffle), ``pretext.invert_prob`` (intensity), ``pretext.loss_region`` ("all": the
  whole image; "masked": the corrupted cells only, for inpaint and local_shuffle),
  ``data.modalities`` (number of channels restored)."""

  name = "restoration"

  def __init__(self, config):
    cfg = config.pretext
    self.corruption = cfg.get("corruption", "inpaint")
    if self.corruption not in CORRUPTIONS:
      raise ValueError(f"pretext.corruption must be one of {sorted(CORRUPTIONS)}; "
                       f"got {self.corruption!r}")
    self.loss_region = cfg.get("loss_region", "all")
    if self.loss_region not in LOSS_REGIONS:
      raise ValueError(f"pretext.loss_region must be one of {LOSS_REGIONS}; "
                       f"got {self.loss_region!r}")
    if self.loss_region == "masked" and CORRUPTIONS[self.corruption][1] is None:
      raise ValueError(f"pretext.loss_region='masked' needs a corruption of cells "
                       f"(inpaint, local_shuffle); {self.corruption!r} changes every pixel")
    super().__init__(config)
    # Checks the pretext fields (grid, probabilities) now rather than at the first step.
    channels = len(config.data.modalities)
    jax.eval_shape(self.corrupt, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 8, 8, channels), jnp.float32))

  @classmethod
  def default_config(cls):
    return {"model": UNET_MODEL,
            "pretext": dict(corruption="inpaint", grid=8, keep_prob=0.75, loss_region="all",
                            shuffle_prob=0.5, invert_prob=0.0)}

  def corrupt(self, key, image):
    """``(corrupted, mask)`` for an image batch ``(N, H, W, C)``: the corrupted images and the
    bool ``(N, H, W)`` mask of corrupted cells (None when every pixel is corrupted)."""
    return CORRUPTIONS[self.corruption][0](key, image, self.config.pretext)

  def loss(self, variables, batch, key, *, train, step=0):
    del step
    corrupt_key, dropout_key = jax.random.split(key)
    image = batch["image"]
    corrupted, mask = self.corrupt(corrupt_key, image)
    pred, model_state = self.apply(variables, corrupted, dropout_key, train=train)
    weights = mask[..., None] if self.loss_region == "masked" else None
    loss = l1_l2_loss(pred, image, weights)
    metrics = {"l1": l1_loss(pred, image, weights)}
    fraction_name = CORRUPTIONS[self.corruption][1]
    if fraction_name is not None:
      metrics[fraction_name] = jnp.mean(mask.astype(jnp.float32))
    return loss, metrics, model_state

  def pretext_example(self, key, batch):
    """``(network input, target)`` of the pretext task for ``batch["image"]`` ``(N, H, W, C)``:
    the corrupted images and the originals."""
    corrupted, _ = self.corrupt(key, batch["image"])
    return corrupted, batch["image"]
