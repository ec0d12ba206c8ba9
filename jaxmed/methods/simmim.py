"""SimMIM on the whole Swin-UNETR: the "MAE" baseline of Disruptive Autoencoders (Xie et al.,
"SimMIM", CVPR 2022; as the DAE reference runs it, research-contributions ``DAE/``
``SimMIMSkip``), with the target leak of the reference fixed.

Per training step, for a batch ``image`` ``(N, D, H, W, 1)`` of single-modality crops
(`jaxmed.methods._swin_pretrain`):

1. Mask: the volume is cut into cubes of ``pretext.mask_patch`` voxels (16^3 in the reference;
   8^3 at ``size=small`` on 32^3 crops) and a random ``ceil(ratio T)`` of the T cubes are masked
   per sample (``pretext.mask_ratio`` 0.6; `jaxmed.pretext.masking.random_masking`, SimMIM's
   ``MaskGenerator`` count). A cube covers ``(mask_patch / 2)^3`` tokens of Swin-UNETR's patch
   2: the token mask ``(N, *S/2)`` replaces those tokens by the learnable ``mask_token`` right
   after the patch embedding (`SwinUNETR` ``use_mask_token=True``, ``token_mask``).
2. No leak: the network's input is ``x (1 - mask)``, so encoder1 (the full-resolution conv skip,
   which bypasses the token mask) sees the masked image; the reference feeds encoder1
   ``x * mask`` (mask 1 on the masked voxels), i.e. exactly the targets, which then leak
   through the skip. The transformer sees no difference: every masked token is the mask token
   whatever its voxels (the cubes align with the patch grid).
3. Loss: L1 on the masked voxels only, ``sum(|f(x (1 - m)) - x| m) / sum(m)`` (SimMIM's
   ``(loss * mask).sum() / (mask.sum() + 1e-5) / in_chans``, here with ``max(sum(m), 1)``).

Metrics: ``l1_masked`` (= the loss) and ``masked_fraction``.

Hooks: `pretext_example` ``(masked input x (1 - m), x)``; `reconstruct` ``(masked input, full
reconstruction)`` for the mask of the same key; `stage_features`, `swin_unetr_variables` (the
mask token left out) as for DAE. Fine-tuning from a run's workdir through ``config.init``:
``--config.init.drop=params/swinViT/mask_token`` (unless only the decoder is transferred).

Config sections: ``model`` (Swin-UNETR fields; ``use_mask_token`` set by the method),
``pretext`` (``mask_patch``, ``mask_ratio``), and the shared ``optim`` / ``data``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmed.losses import l1_loss
from jaxmed.methods._swin_pretrain import (SwinPretrainMethod, check_positive_int,
                                           swin_pretrain_config)
from jaxmed.pretext.masking import random_masking


def upsample_mask(mask: jax.Array, factor: int) -> jax.Array:
  """``mask`` ``(N, *grid)`` repeated ``factor`` times along every spatial axis:
  ``(N, *grid * factor)``, same dtype."""
  for axis in range(1, mask.ndim):
    mask = jnp.repeat(mask, factor, axis=axis)
  return mask


class SimMIMMethod(SwinPretrainMethod):
  """SimMIM (see the module docstring for the objective and the config)."""

  name = "simmim"
  use_mask_token = True

  def __init__(self, config):
    p = config.pretext
    self.mask_patch = check_positive_int("pretext.mask_patch", p.mask_patch, "simmim")
    patch = int(config.model.patch_size)
    if self.mask_patch % patch:
      raise ValueError(f"simmim: pretext.mask_patch={self.mask_patch} must be a multiple of "
                       f"model.patch_size={patch} (a mask cube covers whole tokens)")
    self.mask_ratio = float(p.mask_ratio)
    if not (math.isfinite(self.mask_ratio) and 0.0 < self.mask_ratio < 1.0):
      raise ValueError(f"simmim: pretext.mask_ratio must be in (0, 1); got {p.mask_ratio!r}")
    if config.data.view == "crop" and any(int(s) % self.mask_patch
                                          for s in config.data.crop_size):
      raise ValueError(f"simmim: data.crop_size {tuple(config.data.crop_size)} must be divisible "
                       f"by pretext.mask_patch={self.mask_patch}")
    super().__init__(config)

  @classmethod
  def default_config(cls):
    return {**swin_pretrain_config(),
            # The DAE reference's SimMIM: 16^3-voxel mask patches at ratio 0.6.
            "pretext": dict(mask_patch=16, mask_ratio=0.6)}

  # --- Masking --------------------------------------------------------------------------

  def masks(self, key, shape) -> tuple[jax.Array, jax.Array]:
    """``(voxel mask (N, D, H, W) float32, token mask (N, D/p, H/p, W/p) bool)`` for a batch of
    ``shape`` ``(N, D, H, W, 1)``: 1 / True on the masked cubes; ``ceil(ratio T)`` of the T cubes
    of each sample."""
    n, *spatial, _ = shape
    if any(s % self.mask_patch for s in spatial):
      raise ValueError(f"simmim: every spatial size must be divisible by pretext.mask_patch="
                       f"{self.mask_patch}; got image shape {tuple(shape)}")
    grid = tuple(s // self.mask_patch for s in spatial)
    _, _, cubes = random_masking(key, n, math.prod(grid), self.mask_ratio)
    cubes = cubes.reshape(n, *grid)
    tokens = upsample_mask(cubes, self.mask_patch // int(self.config.model.patch_size))
    return upsample_mask(cubes, self.mask_patch), tokens > 0

  def masked_input(self, key, image):
    """``(x (1 - m) (N, *S, 1), voxel mask, token mask)`` of ``image`` for ``key``."""
    self.check_image(image)
    voxels, tokens = self.masks(key, image.shape)
    return image * (1.0 - voxels[..., None]).astype(image.dtype), voxels, tokens

  # --- Objective ------------------------------------------------------------------------

  def loss(self, variables, batch, key, *, train, step=0):
    """L1 on the masked voxels of ``batch["image"]`` ``(N, D, H, W, 1)`` for the mask of
    ``key``."""
    del step
    image = batch["image"]
    mask_key, dropout_key = jax.random.split(key)
    x, voxels, tokens = self.masked_input(mask_key, image)
    pred, _, model_state = self.forward(variables, x, dropout_key, train=train,
                                        token_mask=tokens)
    loss = l1_loss(pred, image, voxels[..., None])
    return loss, {"l1_masked": loss, "masked_fraction": jnp.mean(voxels)}, model_state

  # --- Evaluation hooks -----------------------------------------------------------------

  def pretext_example(self, key, batch):
    """``(masked input x (1 - m), clean target x)`` for the mask `loss` draws from ``key``."""
    x, _, _ = self.masked_input(jax.random.split(key)[0], batch["image"])
    return x, batch["image"]

  def reconstruct(self, variables, batch, key):
    """``(masked input, full reconstruction)`` in eval mode for the mask of ``key``."""
    x, _, tokens = self.masked_input(jax.random.split(key)[0], batch["image"])
    pred, _, _ = self.forward(variables, x, None, train=False, token_mask=tokens)
    return x, pred
