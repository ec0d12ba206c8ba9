"""What DAE and its SimMIM baseline share: a whole Swin-UNETR (1 input, 1 output channel)
pre-trained to reconstruct single-modality crops, and what fine-tuning reads from it.

Disruptive Autoencoders (Valanarasu et al.) pre-train the whole network, decoder included, on
1-channel 3D crops (each BraTS modality a separate sample, tagged with its modality), with the
same recipe for the "MAE" (SimMIM) baseline. Here a training example is one channel of a
subject's crop (``data.per_modality=True``: `jaxmed.data.sources.ModalitySource` yields every
(subject, modality) pair as its own row, with ``modality`` its channel index; the pipeline
shuffles the rows), ``image`` ``(N, D, H, W, 1)``.

Config owned here (`swin_pretrain_config`): ``model`` (the registry's ``swin_unetr`` fields;
``out_channels`` = 1, ``spatial_dims`` = 3 and ``use_mask_token`` are set by the method),
``optim`` and ``data`` at the paper's full size (Sec. 3.2): feature size 48, depths
(2, 2, 2, 2), heads (3, 6, 12, 24), window 7, 96^3 crops of 128^3 phantoms; AdamW lr 4e-4,
betas (0.9, 0.999) (the paper's "momentum of 0.9"), weight decay 1e-5 (kernels only, not
biases, norms or the mask token), 500 warm-up steps then a cosine to 0, 20k steps, global batch
16 (2 per GPU x 8), gradient clipping at 1.0.

Network choices: MONAI's patch embedding (``model.patch_embedding="linear"``; the reference
checkpoints use the conv block, ``"conv"``), MONAI >= 1.5 patch merging (``"merging"``; the
published checkpoints need ``"merging_legacy"``), ``model.normalize=True`` (the hidden states
layer-normalised in pre-training as in fine-tuning; the reference normalises them only when
fine-tuning). Fine-tuning must build its Swin-UNETR with the same ``patch_embedding`` and
``downsample``.

Transfer: `SwinPretrainMethod.swin_unetr_variables` gives a plain `SwinUNETR`'s variables (the
mask token left out) for `jaxmed.evaluate.finetune` (``pretrained=``) or
`jaxmed.train.init.transfer`; `jaxmed.methods.segmentation.transfer_layers` (``part`` encoder /
decoder / both, ``input_layer`` new / tile) names what is transferred, what is new and which
1-channel input kernels are tiled over the fine-tuning modalities (x 1 / C). A run's workdir
loads the same way through ``config.init`` (the seg3d config's ``part=`` and ``input=``); a
SimMIM run's ``params/swinViT/mask_token`` has no place in the fine-tuned network: name it in
``init.drop`` when the encoder is transferred (``part`` both / encoder).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmed.methods.base import Method
from jaxmed.models.registry import model_defaults

# The fields the method sets itself (`SwinPretrainMethod.model_arguments`).
DERIVED_MODEL_FIELDS = ("out_channels", "spatial_dims", "use_mask_token")
SWIN_PRETRAIN_MODEL = {
    "name": "swin_unetr",
    **{k: v for k, v in model_defaults("swin_unetr").items() if k not in DERIVED_MODEL_FIELDS},
    "feature_size": 48,  # DAE Sec. 3.2 (MONAI's default is 24)
}
# Sec. 3.2: 20k iterations, 500 of warm-up, 2 per GPU on 8 GPUs.
FULL_STEPS = 20_000
FULL_WARMUP = 500
FULL_BATCH = 16
STAGES = tuple(f"hidden_states_{i}" for i in range(5))


def swin_pretrain_config() -> dict[str, Any]:
  """The ``model``, ``optim`` and ``data`` sections of DAE / SimMIM pre-training (full size)."""
  return {
      "model": dict(SWIN_PRETRAIN_MODEL),
      "optim": dict(name="adamw", lr=4e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-5,
                    schedule="cosine", end_lr=0.0, warmup_steps=FULL_WARMUP, grad_clip=1.0),
      "data": dict(view="crop", crop_size=(96, 96, 96), shape=(128, 128, 128), fg_fraction=0.0,
                   per_modality=True),
  }


class SwinPretrainMethod(Method):
  """Base of DAE and SimMIM: config checks, the 1-channel Swin-UNETR, and the fine-tuning and
  analysis hooks. Subclasses set ``name``, ``use_mask_token`` and implement `loss`."""

  derived_model_fields = DERIVED_MODEL_FIELDS
  use_mask_token = False

  def __init__(self, config):
    self._check_swin_config(config)
    super().__init__(config)

  def _check_swin_config(self, config) -> None:
    """ValueErrors for a config that cannot run, before anything is traced."""
    name = self.name
    if config.model.name != "swin_unetr":
      raise ValueError(f"{name}: model.name must be 'swin_unetr' (the whole Swin-UNETR is "
                       f"pre-trained); got {config.model.name!r}")
    data = config.data
    if data.view not in ("crop", "volume"):
      raise ValueError(f"{name}: data.view must be 'crop' or 'volume' (3D examples); got "
                       f"{data.view!r}")
    if not (data.per_modality or len(data.modalities) == 1):
      raise ValueError(f"{name}: examples are single-modality volumes: set data.per_modality="
                       f"True (every (subject, modality) pair a 1-channel example) or name one "
                       f"modality; got per_modality={data.per_modality} with modalities="
                       f"{tuple(data.modalities)}")
    if data.view == "crop":
      crop = tuple(data.crop_size)
      if len(crop) != 3 or any(int(s) % 32 for s in crop):
        raise ValueError(f"{name}: Swin-UNETR needs every spatial size divisible by 32 (patch 2 "
                         f"x 2**4); got data.crop_size={crop}")

  def model_arguments(self):
    return {"out_channels": 1, "spatial_dims": 3, "use_mask_token": self.use_mask_token}

  def check_image(self, image) -> None:
    """Raises unless ``image`` is a floating ``(N, D, H, W, 1)`` batch with sizes divisible
    by 32."""
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 5 or shape[-1] != 1:
      raise ValueError(f"{self.name}: image must be a 1-channel volume batch (N, D, H, W, 1) "
                       f"(one modality per example: data.per_modality=True); got shape {shape}")
    if not jnp.issubdtype(image.dtype, jnp.floating):
      raise TypeError(f"{self.name}: image must be floating; got dtype {image.dtype}")
    if any(s % 32 for s in shape[1:4]):
      raise ValueError(f"{self.name}: every spatial size must be divisible by 32 "
                       f"(Swin-UNETR); got image shape {shape}")

  def forward(self, variables, x, key, *, train: bool, features: bool = False, **masks):
    """``(reconstruction (N, *S, 1), features or None, updated model state)`` of the
    Swin-UNETR on ``x`` with ``masks`` (``channel_mask`` / ``token_mask``)."""
    out, model_state = self.apply(variables, x, key if train else None, train=train,
                                  return_features=features, **masks)
    pred, feats = out if features else (out, None)
    return pred, feats, model_state

  # --- Fine-tuning and analysis hooks -----------------------------------------------------

  def swin_unetr_variables(self, variables) -> dict:
    """The pre-trained network as a plain ``SwinUNETR(out_channels=1)``'s variables (SimMIM's
    ``swinViT/mask_token`` left out), numpy, for `jaxmed.train.init.transfer` /
    `jaxmed.evaluate.finetune` (``pretrained=``) with
    `jaxmed.methods.segmentation.transfer_layers`."""
    out = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    params = dict(out["params"])
    params["swinViT"] = {k: v for k, v in params["swinViT"].items() if k != "mask_token"}
    return {**out, "params": params}

  def stage_features(self, variables, image) -> dict[str, jax.Array]:
    """``{hidden_states_i: (N, *S / 2^(i+1), F 2^i)}``, i = 0..4, float32, of clean volumes
    ``image`` ``(N, D, H, W, 1)`` in eval mode (no disruption, no mask): the Swin stages whose
    CKA DAE's Table 7 compares."""
    self.check_image(image)
    _, feats = self.model.apply(variables, image, train=False, return_features=True)
    return {k: feats[k] for k in STAGES}


def check_positive_int(name: str, value, method: str) -> int:
  """``value`` as an int >= 1, or a ValueError naming ``method`` and ``name``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{method}: {name} must be an int >= 1; got {value!r}")
  return int(value)
