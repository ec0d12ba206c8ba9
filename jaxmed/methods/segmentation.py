"""Supervised segmentation with a UNet (2D slices or 3D crops): overlapping regions or classes.

Used for fine-tuning pre-trained encoders (source_identification Sec. 5.4; DAE Sec. 4) and for
training from scratch. The label's ``data.pathology`` decides the head:

  * overlapping regions (BraTS WT/TC/ET, WMH): one sigmoid output per region, soft Dice +
    binary cross-entropy (nnU-Net's region-based training);
  * mutually exclusive classes (``"organs"``, ``"tissues"``, ``"brain_tissues"``): K + 1 softmax
    outputs (background first), soft Dice + cross-entropy (MONAI ``DiceCELoss``).

`probabilities` gives what sliding windows, flips and fold ensembles average; `decide` turns
averaged probabilities into bool region masks (a class k as the region ``label == k``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmed.data.subject import CLASS_NAMES, label_regions, region_names
from jaxmed.losses import sigmoid_dice_ce_loss, softmax_dice_ce_loss
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
    # Test the best validation weights also without early stopping (patience 0).
    test_best=False,
    # k-fold cross-validation (jaxmed.evaluate.crossval): folds > 1 trains one model per fold
    # (test = the fold, num_val validation subjects from the rest) and ensembles them on the
    # data.num_test held-out subjects.
    folds=0,
    # Mixup (Zhang et al. 2018; source_identification Sec. 6.4): lambda ~ Beta(a, a), a > 0.
    mixup_alpha=0.0,
    # Evaluation of 3D models on whole volumes (jaxmed.evaluate.sliding_window): windows of
    # roi_size (() = data.crop_size), overlap, "constant" / "gaussian" blending, window_batch
    # windows per call; tta averages the probabilities over every flip of the spatial axes.
    roi_size=(), overlap=0.5, window_mode="constant", window_batch=4, tta=False)


# ``config.init`` patterns of each dense backbone's layers that read the image channels and of its
# output layer (variable paths such as ``params/input_conv/conv/kernel``).
INPUT_LAYERS = {"unet": r"[^/]+/input_conv/.*",
                "swin_unetr": r"[^/]+/(swinViT/patch_embed/proj|encoder1/layer/conv[13])/.*"}
OUTPUT_LAYERS = {"unet": r"[^/]+/output_conv/.*", "swin_unetr": r"[^/]+/out/.*"}


# What a Swin-UNETR fine-tuned from part of a pre-trained one keeps fresh (``part``), and its
# image-reading layers inside the transferred part. The fresh patterns name the collection
# first, so that the short form of a params path (``swinViT/...``, `jaxmed.train.init`) never
# matches them; pre-trained leaves they match (heads, another decoder) are dropped.
PARTS = ("both", "encoder", "decoder")
SWIN_UNETR_FRESH = {"encoder": r"(params|batch_stats)/(?!swinViT/).*",
                    "decoder": r"(params|batch_stats)/swinViT/.*"}
SWIN_UNETR_PART_INPUTS = {"encoder": r"[^/]+/(swinViT/patch_embed/proj)/.*",
                          "decoder": r"[^/]+/(encoder1/layer/conv[13])/.*"}


def transfer_layers(model: str, input_layer: str = "new",
                    part: str = "both") -> dict[str, tuple[str, ...]]:
  """``{"replace": ..., "tile": ...}`` for ``config.init`` when fine-tuning a pre-trained
  ``model`` ("unet" | "swin_unetr") for segmentation: the output layer is always new; the
  layers reading the image are new (``input_layer="new"``; source_identification Sec. 5.4) or
  their kernels are tiled over the channels when the count differs (``"tile"``,
  `jaxmed.train.init.tile_input_channels`; other layers of the same blocks are transferred).
  ``part`` (Swin-UNETR only): "both" transfers the whole network; "encoder" only ``swinViT``
  (e.g. from a ``swin_ssl`` run, whose heads and in-painting decoder are dropped), "decoder"
  everything but ``swinViT``; the other part starts fresh."""
  if model not in INPUT_LAYERS:
    raise ValueError(f"transfer_layers: model must be one of {sorted(INPUT_LAYERS)}; got "
                     f"{model!r}")
  if part not in PARTS or (part != "both" and model != "swin_unetr"):
    raise ValueError(f"transfer_layers: part must be one of {PARTS} for 'swin_unetr' ('both' for "
                     f"other models); got part={part!r} for model={model!r}")
  inputs = INPUT_LAYERS[model] if part == "both" else SWIN_UNETR_PART_INPUTS[part]
  fresh = () if part == "both" else (SWIN_UNETR_FRESH[part],)
  if input_layer == "new":
    return {"replace": (inputs, OUTPUT_LAYERS[model]) + fresh, "tile": ()}
  if input_layer == "tile":
    return {"replace": (OUTPUT_LAYERS[model],) + fresh, "tile": (inputs[:-2] + "(.*/)?kernel",)}
  raise ValueError(f"transfer_layers: input_layer must be 'new' or 'tile'; got {input_layer!r}")


class SegmentationMethod(UNetMethod, Method):
  """Config: ``model`` (UNet fields by default; Swin-UNETR's after
  ``jaxmed.config.set_model(config, "swin_unetr")``), ``data.pathology`` (regions or classes, see the module
  docstring), ``data.view`` ("slice": 2D, "crop" / "volume": 3D), ``finetune`` (mixup, the
  evaluation windows)."""

  name = "segmentation"

  @property
  def regions(self) -> tuple[str, ...]:
    return region_names(self.config.data.pathology)

  @property
  def exclusive(self) -> bool:
    """Mutually exclusive classes (softmax over background + classes), not regions."""
    return self.config.data.pathology in CLASS_NAMES

  @classmethod
  def default_config(cls):
    # Sec. 5.4: the pre-trained input and output layers are replaced (in every collection).
    return {"model": UNET_MODEL, "finetune": FINETUNE,
            "init": dict(replace=transfer_layers("unet")["replace"]),
            # Train on every slice of the labelled subjects (0.0) so that the model also sees
            # slices with little or no brain, as it will when evaluated on whole volumes.
            "data": dict(min_foreground=0.0)}

  def model_arguments(self):
    return {"out_channels": len(self.regions) + int(self.exclusive),
            "spatial_dims": spatial_dims(self.config)}

  def targets(self, batch):
    """``(N, *spatial, R)`` bool region masks from the label map."""
    return label_regions(batch["label"], self.config.data.pathology)

  def loss(self, variables, batch, key, *, train, step=0):
    del step
    image = batch["image"]
    alpha = float(self.config.finetune.get("mixup_alpha", 0.0))
    mix_key, key = jax.random.split(key)
    if self.exclusive:
      if alpha > 0.0:
        raise ValueError(f"finetune.mixup_alpha={alpha}: mixup blends region targets; data."
                         f"pathology={self.config.data.pathology!r} has exclusive classes")
      logits, model_state = self.apply(variables, image, key, train=train)
      loss = softmax_dice_ce_loss(logits, batch["label"].astype(jnp.int32))
      truth = self.targets(batch)
    else:
      truth = self.targets(batch)
      if train and alpha > 0.0:
        image, soft_target = mixup(mix_key, image, truth.astype(jnp.float32), alpha=alpha)
      else:
        soft_target = truth
      logits, model_state = self.apply(variables, image, key, train=train)
      loss = sigmoid_dice_ce_loss(logits, soft_target)
      truth = soft_target > 0.5
    pred = self.decide(self._activate(logits))
    per_region = jnp.nanmean(dice(pred, truth), axis=0)
    metrics = {f"dice_{name}": per_region[i] for i, name in enumerate(self.regions)}
    return loss, metrics, model_state

  def _activate(self, logits):
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if self.exclusive else jax.nn.sigmoid(logits)

  def probabilities(self, variables, image):
    """``(N, *spatial, K)`` float32 probabilities, eval mode: sigmoid per region, or softmax
    over background + classes."""
    logits, _ = self.apply(variables, image, None, train=False)
    return self._activate(logits)

  def decide(self, probs):
    """Probabilities (possibly averaged) -> ``(N, *spatial, R)`` bool regions: ``p > 0.5``
    per region, or the regions ``argmax == k`` of the classes."""
    if self.exclusive:
      return label_regions(jnp.argmax(probs, axis=-1), self.config.data.pathology)
    return probs > 0.5

  @functools.cached_property
  def jitted_predict(self):
    """`predict` compiled once per method instance."""
    return jax.jit(self.predict)

  def predict(self, variables, image):
    """``(N, *spatial, R)`` bool region predictions, eval mode."""
    return self.decide(self.probabilities(variables, image))
