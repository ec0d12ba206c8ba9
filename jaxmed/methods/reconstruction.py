"""Supervised reconstruction of undersampled MRI with a 2D UNet (ssfd_feature_distance Sec. 2.1).

Each training image is undersampled in k-space with a Cartesian column mask (`jaxmed.data.mri`:
fastMRI random or equispaced masks, one (acceleration, centre fraction) pair per example), and
the UNet maps the magnitude zero-filled reconstruction to the fully sampled image under an L1
loss. Trained at several accelerations, its outputs are reconstructions of graded quality for
SSFD, SSIM and PSNR to score (ssfd_feature_distance Sec. 2.3).

Channels are treated as separately acquired magnitude images that share the example's mask. The
target is the image as given; for non-negative (magnitude) images, as the synthetic phantoms,
the zero-filled input at acceleration 1 equals it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmed.data import mri
from jaxmed.losses import l1_loss
from jaxmed.methods._unet import UNET_MODEL, UNetMethod
from jaxmed.methods.base import Method
from jaxmed.metrics import psnr


def zero_filled_channels(image, masks):
  """The magnitude zero-filled reconstruction of every channel, one mask per example.

  Args:
    image: ``(N, H, W, C)`` real images (channels-last).
    masks: ``(N, W)`` bool column masks, shared by the channels of an example.

  Returns:
    ``(N, H, W, C)`` float32 ``|ifft2c(mask * fft2c(image[..., c]))|``.
  """
  n, h, w, c = image.shape
  planes = jnp.moveaxis(image, -1, 1).reshape(n * c, h, w)
  zf = mri.zero_filled(planes, jnp.repeat(masks, c, axis=0))
  return jnp.moveaxis(zf.reshape(n, c, h, w), 1, -1)


def _data_range(target):
  """Per-image ``max - min`` of the target ``(N,)``; 1 for a constant image."""
  flat = target.reshape(target.shape[0], -1).astype(jnp.float32)
  span = flat.max(axis=1) - flat.min(axis=1)
  return jnp.where(span > 0, span, 1.0)


class ReconstructionMethod(UNetMethod, Method):
  """Config: ``model`` (UNet fields), ``mri.mask`` ("random" / "equispaced"),
  ``mri.accelerations`` and ``mri.center_fractions`` (paired by index, one pair drawn per
  example), ``data.modalities`` (the channels reconstructed).

  Metrics: ``l1`` (the loss), ``psnr`` of the output and ``psnr_zero_filled`` of the input
  against the target (dB, batch mean; ``data_range`` = per-image target ``max - min``, a
  choice for signed or arbitrarily scaled images where fastMRI uses ``max``; ``inf`` for an
  exact match), ``acceleration`` (mean nominal acceleration) and ``sampled_fraction`` (mean
  fraction of sampled columns).
  """

  name = "reconstruction"

  def __init__(self, config):
    cfg = config.mri
    self.mask_kind, self.accelerations, self.center_fractions = mri.check_mask_args(
        cfg.mask, tuple(cfg.accelerations), tuple(cfg.center_fractions),
        fn="ReconstructionMethod (config.mri)")
    super().__init__(config)

  @classmethod
  def default_config(cls):
    # Undersampled MRI (jaxmed.data.mri): Cartesian mask "random" or "equispaced" along the
    # phase-encode (W) axis; each example draws one acceleration and its centre fraction.
    return {"model": UNET_MODEL,
            "mri": dict(mask="random", accelerations=(4,), center_fractions=(0.08,))}

  def model_inputs(self, batch):
    return batch["image"]

  def undersample(self, key, image):
    """Undersamples every channel of ``image`` with masks drawn from ``config.mri``.

    Args:
      key: PRNG key (the masks and their (acceleration, centre fraction) pairs).
      image: ``(N, H, W, C)`` real images.

    Returns:
      ``(zero-filled (N, H, W, C) float32, masks (N, W) bool, acceleration (N,) float32)``.

    Raises:
      ValueError: ``image`` not ``(N, H, W, C)`` real floating with ``C = len(data.modalities)``.
    """
    image = jnp.asarray(image)
    channels = len(self.config.data.modalities)
    if (image.ndim != 4 or image.shape[-1] != channels
        or not jnp.issubdtype(image.dtype, jnp.floating)):
      raise ValueError(f"{self.name}: image must be (N, H, W, C={channels}) real floating (C = "
                       f"len(data.modalities)); got shape {image.shape} dtype {image.dtype}")
    masks, acceleration = mri.sample_masks(
        key, image.shape[0], image.shape[2], kind=self.mask_kind,
        accelerations=self.accelerations, center_fractions=self.center_fractions)
    return zero_filled_channels(image, masks), masks, acceleration

  def loss(self, variables, batch, key, *, train, step=0):
    del step
    mask_key, dropout_key = jax.random.split(key)
    image = batch["image"]
    zf, masks, acceleration = self.undersample(mask_key, image)
    pred, model_state = self.apply(variables, zf.astype(image.dtype), dropout_key, train=train)
    loss = l1_loss(pred, image)
    data_range = _data_range(image)
    metrics = {"l1": loss,
               "psnr": jnp.mean(psnr(pred, image, data_range=data_range)),
               "psnr_zero_filled": jnp.mean(psnr(zf, image, data_range=data_range)),
               "acceleration": jnp.mean(acceleration),
               "sampled_fraction": jnp.mean(masks.astype(jnp.float32))}
    return loss, metrics, model_state

  def pretext_example(self, key, batch):
    """``(zero-filled input, fully sampled target)``, both ``(N, H, W, C)``."""
    image = jnp.asarray(batch["image"])
    zf, _, _ = self.undersample(key, image)
    return zf.astype(image.dtype), image
