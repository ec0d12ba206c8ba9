"""The fields every experiment config has, with their defaults.

Experiment files in ``configs/`` start from `base_config` and override; since ConfigDicts built
here are locked, a misspelt field in a config file or on the command line is an error.
"""

from __future__ import annotations

import ml_collections

from jaxmed.data.synthetic import MODALITIES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "inpainting"
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 16            # global batch, split over all devices
  c.log_every = 50
  c.eval_every = 0             # 0: evaluate only at the end (when the method has hooks)
  c.max_nonfinite = 10         # abort after this many skipped non-finite steps in a row
  c.tensorboard = True

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, num_devices=0))
  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True))

  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=1e-2, schedule="poly", poly_power=0.9, warmup_steps=0, end_lr=0.0,
      momentum=0.99, nesterov=True, b1=0.9, b2=0.999, eps=1e-8, weight_decay=3e-5,
      grad_clip=12.0, accum_steps=1))

  c.model = ml_collections.ConfigDict(dict(
      name="unet", features=(32, 64, 128, 256), norm="instance", num_groups=8, dropout=0.0,
      downsample="conv", dtype="float32"))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", root="", modalities=MODALITIES, seg="seg", pattern="",
      pathology="tumour", num_subjects=24, shape=(64, 64, 64), noise=0.03, crop=(), seed=0,
      num_val=2, num_test=6, min_foreground=0.2))
  c.data.augment = ml_collections.ConfigDict(dict(
      enabled=False, flip=True, rot90=False, rotation=15.0, scale=(0.85, 1.25), affine_p=0.2,
      elastic_alpha=0.0, elastic_sigma=3.0, elastic_p=0.2, gamma=(0.7, 1.5), gamma_p=0.3,
      noise_std=0.0, noise_p=0.15))

  c.pretext = ml_collections.ConfigDict(dict(grid=8, keep_prob=0.75, loss_region="all"))

  # Fine-tuning (jaxmed.evaluate.finetune): where the pre-trained weights come from and how
  # many labelled training subjects are used.
  c.finetune = ml_collections.ConfigDict(dict(
      init_from="", num_labeled=0, label_fraction=1.0, eval_batch_size=32,
      # Train on every slice of the labelled subjects (0.0) so that the model also sees
      # slices with little or no brain, as it will when evaluated on whole volumes.
      min_foreground=0.0))
  c.lock()
  return c
