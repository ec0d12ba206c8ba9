"""Disruptive Autoencoders: a whole Swin-UNETR pre-trained to undo low-level disruptions of
single-modality volumes, with the cross-modal contrastive loss (disruptive_autoencoders Sec. 2,
Eqs. 1-5; research-contributions ``DAE/``).

    L = L1(f(disrupt(x)), x) + alpha L_CMCL                                        (Eq. 5)

Per training step, for a batch ``image`` ``(N, D, H, W, 1)`` of single-modality crops with
their ``modality`` ``(N,)`` (`jaxmed.methods._swin_pretrain`: ``data.per_modality=True``):

1. Disruption (``pretext.disruption``, Table 5's rows; `jaxmed.pretext.disruptions`), in the
   reference's order noise -> down-sampling -> up-sampling -> patch embedding -> local masking:

   * ``"noise"``: ``x + sqrt(sigma) N(0, 1)`` (Eq. 1; ``pretext.noise_variance`` sigma = 0.1 is
     a variance, Appendix G.1: std ~0.316), fresh per voxel, sample and step;
   * ``"downsample"``: down-sampling by epsilon = ``pretext.factor`` (4) and up-sampling back
     (Eq. 2, "pre-upsampling"), ``pretext.resample`` "linear" (the paper) or "nearest" (the
     reference code's ``F.interpolate`` default), no antialiasing;
   * ``"mask"``: local masking alone: ``int(r C)`` of the C = ``model.feature_size`` patch
     embedding channels zeroed in every token (r = ``pretext.mask_ratio`` 0.6), through
     `SwinUNETR`'s ``channel_mask`` (`local_channel_mask`): one subset per sample
     (``pretext.mask_shared=False``, the issue's choice) or one per step shared by the batch
     (``True``, the reference's ``random.sample`` per forward). No mask token. The input is the
     clean image; the masked embedding feeds the encoder and the encoder2 skip, while encoder1
     (the full-resolution conv skip) sees the unmasked input, as in the reference: alone, this
     is close to an identity task through encoder1 (watch ``l1``);
   * ``"all"`` (default): noise, then down- and up-sampling, then local masking.

   The target is always the clean ``x``.
2. L1: mean absolute error over all voxels between the 1-channel reconstruction and ``x``.
3. L_CMCL (Eqs. 3-4; `jaxmed.losses.cmcl_loss`, float32), ``loss.cmcl`` (Table 6's switch),
   weight alpha = ``loss.alpha`` 0.05 (the paper; the code's README 0.03, its argparse 0.02),
   temperature ``loss.temperature`` 0.07 (the paper; README 0.5). ``loss.cmcl_form``:

   * ``"normalized"`` (default): z = the L2-normalised global average of the bottleneck
     ``hidden_states_4`` ``(N, 16 F)``, logits ``z z^T / t``, targets 1 where two samples share a
     modality, soft-target cross-entropy over rows and columns;
   * ``"reference"``: the reference code's literal form on the flattened ``hidden_states_4``
     (raw dot products times ``exp(t)``, its permutation-dependent labels).

   The batch is the global batch (one jit over the sharded batch). Modalities must repeat in a
   batch for the positives to exist: the shuffled (subject, modality) rows give, with M
   modalities drawn about uniformly, at least one repeated modality in every batch of N > M
   (pigeonhole), and each sample a same-modality partner with probability about
   ``1 - (1 - 1/M)^(N-1)`` (0.87 for N = 8, M = 4; 0.99 for the paper's N = 16). Logged as
   ``cmcl_paired`` (the fraction of samples with a partner); a sample without one has only
   itself as positive. We keep the reference's random sampling rather than forcing balanced
   batches, which would tie the batch to whole subjects.

Metrics: ``l1``, and with CMCL ``cmcl`` (before alpha) and ``cmcl_paired``.

Hooks: `pretext_example` / `reconstruct` give ``(disrupted input, target / reconstruction)``
(the image-space input: for "mask" the clean image, the channels being masked inside the
network) with the disruptions of `loss` for the same key; `stage_features` the Swin stages of
clean volumes (Table 7's CKA); `swin_unetr_variables` the network for fine-tuning
(`jaxmed.methods._swin_pretrain`: encoder, decoder or both, input kernels tiled over the
fine-tuning modalities).

Config sections: ``model`` (Swin-UNETR fields), ``pretext`` (``disruption``,
``noise_variance``, ``factor``, ``resample``, ``mask_ratio``, ``mask_shared``), ``loss``
(``cmcl``, ``alpha``, ``temperature``, ``cmcl_form``), and the shared ``optim`` / ``data``
(`jaxmed.methods._swin_pretrain.swin_pretrain_config`: AdamW 4e-4, wd 1e-5, 500 warm-up steps,
cosine, clip 1.0; 96^3 crops, per-modality examples).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxmed.losses import cmcl_loss, global_average_pool, l1_loss
from jaxmed.losses.contrastive import CMCL_FORMS
from jaxmed.methods._swin_pretrain import SwinPretrainMethod, swin_pretrain_config
from jaxmed.pretext.disruptions import RESAMPLE_METHODS, disrupt, local_channel_mask

# pretext.disruption -> (image-space kind of `disrupt`, local masking of the embedding).
DISRUPTIONS = {"noise": ("noise", False), "downsample": ("downsample", False),
               "mask": ("none", True), "all": ("noise+downsample", True)}


class DAEMethod(SwinPretrainMethod):
  """DAE (see the module docstring for the objective and the config)."""

  name = "dae"

  def __init__(self, config):
    self._check_dae_config(config)
    super().__init__(config)

  def _check_dae_config(self, config) -> None:
    p, cfg = config.pretext, config.loss
    if p.disruption not in DISRUPTIONS:
      raise ValueError(f"dae: pretext.disruption must be one of {tuple(DISRUPTIONS)}; got "
                       f"{p.disruption!r}")
    self.image_kind, self.local_masking = DISRUPTIONS[p.disruption]
    variance = float(p.noise_variance)
    if not (math.isfinite(variance) and variance >= 0):
      raise ValueError(f"dae: pretext.noise_variance (sigma, a variance) must be a finite number "
                       f">= 0; got {p.noise_variance!r}")
    factor = p.factor
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
      raise ValueError(f"dae: pretext.factor (epsilon) must be an int >= 1; got {factor!r}")
    if "downsample" in self.image_kind and config.data.view == "crop" and any(
        int(s) % factor for s in config.data.crop_size):
      raise ValueError(f"dae: data.crop_size {tuple(config.data.crop_size)} must be divisible by "
                       f"pretext.factor={factor}")
    if p.resample not in RESAMPLE_METHODS:
      raise ValueError(f"dae: pretext.resample must be one of {RESAMPLE_METHODS}; got "
                       f"{p.resample!r}")
    if not 0.0 <= float(p.mask_ratio) <= 1.0:
      raise ValueError(f"dae: pretext.mask_ratio must be in [0, 1]; got {p.mask_ratio!r}")
    if not isinstance(p.mask_shared, bool):
      raise ValueError(f"dae: pretext.mask_shared must be True or False; got {p.mask_shared!r}")
    if not isinstance(cfg.cmcl, bool):
      raise ValueError(f"dae: loss.cmcl must be True or False; got {cfg.cmcl!r}")
    if cfg.cmcl and not config.data.per_modality:
      raise ValueError("dae: loss.cmcl=True contrasts modalities: it needs data.per_modality="
                       "True (examples tagged with their modality); got per_modality=False")
    alpha = float(cfg.alpha)
    if not (math.isfinite(alpha) and alpha >= 0):
      raise ValueError(f"dae: loss.alpha must be a finite number >= 0; got {cfg.alpha!r}")
    if cfg.cmcl_form not in CMCL_FORMS:
      raise ValueError(f"dae: loss.cmcl_form must be one of {CMCL_FORMS}; got "
                       f"{cfg.cmcl_form!r}")
    t = float(cfg.temperature)
    if not (math.isfinite(t) and (t > 0 or cfg.cmcl_form == "reference")):
      raise ValueError(f"dae: loss.temperature must be finite (and > 0 for cmcl_form="
                       f"'normalized'); got {cfg.temperature!r}")

  @classmethod
  def default_config(cls):
    return {
        **swin_pretrain_config(),
        # Sec. 3.2: r = 60%, sigma = 0.1 (a variance), epsilon = 4; linear interpolation.
        "pretext": dict(disruption="all", noise_variance=0.1, factor=4, resample="linear",
                        mask_ratio=0.6, mask_shared=False),
        # Eqs. 3-5: alpha 0.05, t 0.07.
        "loss": dict(cmcl=True, alpha=0.05, temperature=0.07, cmcl_form="normalized"),
    }

  # --- Disruptions ----------------------------------------------------------------------

  def disrupt(self, key, image):
    """``(image-space input (N, *S, 1), channel_mask (N, F) or None)`` for a clean ``image``:
    noise and / or resampling (`jaxmed.pretext.disruptions.disrupt`), and the local-masking
    channels the network zeroes after its patch embedding. One key: the same key gives the
    same disruption in `loss`, `pretext_example` and `reconstruct`."""
    self.check_image(image)
    p = self.config.pretext
    noise_key, mask_key = jax.random.split(key)
    x = disrupt(noise_key, image, kind=self.image_kind, noise_variance=float(p.noise_variance),
                factor=int(p.factor), resample=p.resample)
    channel_mask = None
    if self.local_masking:
      channel_mask = local_channel_mask(mask_key, image.shape[0],
                                        int(self.config.model.feature_size),
                                        ratio=float(p.mask_ratio), shared=p.mask_shared)
    return x, channel_mask

  # --- Objective ------------------------------------------------------------------------

  def cmcl_embedding(self, feats) -> jax.Array:
    """CMCL's ``z`` from the network's features: the global average of ``hidden_states_4``
    ``(N, 16 F)`` ("normalized"; `cmcl_loss` L2-normalises it) or the flattened
    ``hidden_states_4`` ("reference"), float32."""
    h = feats["hidden_states_4"]
    if self.config.loss.cmcl_form == "reference":
      return h.reshape(h.shape[0], -1).astype(jnp.float32)
    return global_average_pool(h)

  def loss(self, variables, batch, key, *, train, step=0):
    """Eq. 5 on ``batch["image"]`` ``(N, D, H, W, 1)`` (and ``batch["modality"]`` ``(N,)``
    with CMCL), disrupted from ``key``."""
    del step
    image = batch["image"]
    self.check_image(image)
    cmcl_on = self.config.loss.cmcl
    if cmcl_on and "modality" not in batch:
      raise ValueError("dae: loss.cmcl=True needs batch['modality'] (N,), the modality of "
                       "each example (data.per_modality=True tags it); got keys "
                       f"{sorted(batch)}")
    disrupt_key, dropout_key = jax.random.split(key)
    x, channel_mask = self.disrupt(disrupt_key, image)
    pred, feats, model_state = self.forward(variables, x, dropout_key, train=train,
                                            features=cmcl_on, channel_mask=channel_mask)
    l1 = l1_loss(pred, image)
    metrics = {"l1": l1}
    loss = l1
    if cmcl_on:
      modality = jnp.asarray(batch["modality"]).astype(jnp.int32)
      cfg = self.config.loss
      cmcl = cmcl_loss(self.cmcl_embedding(feats), modality,
                       temperature=float(cfg.temperature), form=cfg.cmcl_form)
      same = modality[:, None] == modality[None, :]
      metrics["cmcl"] = cmcl
      metrics["cmcl_paired"] = jnp.mean(
          (jnp.sum(same, axis=1) > 1).astype(jnp.float32))
      loss = loss + float(cfg.alpha) * cmcl
    return loss, metrics, model_state

  # --- Evaluation hooks -----------------------------------------------------------------

  def pretext_example(self, key, batch):
    """``(disrupted image-space input, clean target)`` of ``batch["image"]`` for ``key``
    (the local masking, if any, happens inside the network)."""
    x, _ = self.disrupt(jax.random.split(key)[0], batch["image"])
    return x, batch["image"]

  def reconstruct(self, variables, batch, key):
    """``(disrupted input, reconstruction)`` in eval mode, with the disruptions `loss` draws
    for ``key`` (local masking included)."""
    x, channel_mask = self.disrupt(jax.random.split(key)[0], batch["image"])
    pred, _, _ = self.forward(variables, x, None, train=False, channel_mask=channel_mask)
    return x, pred
