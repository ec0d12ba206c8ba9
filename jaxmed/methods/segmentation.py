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
from jaxmed.methods._unet import UNET_MODEL, UNetMethod, spatial_dims
from jaxmed.methods.base import Method
from jaxmed.metrics import dice


def mixup(key, image, target, *, alpha: float):
  """Mixup (Zhang et al. 2018) for segmentation: each example is blended with another of the
  batch (a random permutation), image and soft target alike, with ``lambda ~ Beta(alpha, alpha)``
  per example (source_identification Sec. 2.4, 6.4).

  Args:
    key: PRNG key.
    image: ``(N, H, W, C)`` float.
    target: ``(N, H, W, R)`` float region targets in [0, 1].
    alpha: Beta parameter, > 0.

  Returns:
    ``(mixed image, mixed target)`` of the input shapes.
  """
  if alpha <= 0.0:
    raise ValueError(f"mixup alpha must be > 0; got {alpha}")
  if image.shape[0] != target.shape[0]:
    raise ValueError(f"image {image.shape} and target {target.shape} need the same batch size")
  lam_key, perm_key = jax.random.split(key)
  n = image.shape[0]
  lam = jax.random.beta(lam_key, alpha, alpha, (n,)).astype(jnp.float32)
  partner = jax.random.permutation(perm_key, n)
  blend = lambda x: (lam.reshape((n,) + (1,) * (x.ndim - 1)) * x
                     + (1.0 - lam.reshape((n,) + (1,) * (x.ndim - 1))) * x[partner])
  return blend(image.astype(jnp.float32)).astype(image.dtype), blend(target)


# ``config.finetune``: which labelled subjects, early stopping, mixup (jaxmed.evaluate.finetune).
FINETUNE = dict(
    num_labeled=0, label_fraction=1.0, eval_batch_size=32,
    # Early stopping (source_identification Sec. 5.5.3): stop after `patience` evaluations
    # (every `eval_every` steps) without a better mean validation Dice (0: never), not before
    # step `min_steps`, and test the best weights.
    patience=0, min_steps=0,
    # Mixup (Zhang et al. 2018; source_identification Sec. 6.4): lambda ~ Beta(a, a), a > 0.
    mixup_alpha=0.0)


class SegmentationMethod(UNetMethod, Method):
  """Config: ``model`` (UNet fields), ``data.pathology`` ("tumour" or "wmh"),
  ``finetune.mixup_alpha`` (> 0 enables mixup in training)."""

  name = "segmentation"

  @property
  def regions(self) -> tuple[str, ...]:
    return region_names(self.config.data.pathology)

  @classmethod
  def default_config(cls):
    # Sec. 5.4: the pre-trained input and output layers are replaced (in every collection).
    return {"model": UNET_MODEL, "finetune": FINETUNE,
            "init": dict(replace=(r"[^/]+/input_conv/.*", r"[^/]+/output_conv/.*")),
            # Train on every slice of the labelled subjects (0.0) so that the model also sees
            # slices with little or no brain, as it will when evaluated on whole volumes.
            "data": dict(min_foreground=0.0)}

  def model_arguments(self):
    return {"out_channels": len(self.regions), "spatial_dims": spatial_dims(self.config)}

  def targets(self, batch):
    """``(N, H, W, R)`` bool region masks from the label map."""
    return label_regions(batch["label"], self.config.data.pathology)

  def loss(self, variables, batch, key, *, train, step=0):
    del step
    image, target = batch["image"], self.targets(batch)
    alpha = float(self.config.finetune.get("mixup_alpha", 0.0))
    mix_key, key = jax.random.split(key)
    if train and alpha > 0.0:
      image, soft_target = mixup(mix_key, image, target.astype(jnp.float32), alpha=alpha)
    else:
      soft_target = target
    logits, model_state = self.apply(variables, image, key, train=train)
    loss = sigmoid_dice_ce_loss(logits, soft_target)
    per_region = jnp.nanmean(dice(logits > 0, soft_target > 0.5), axis=0)
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
