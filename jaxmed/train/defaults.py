"""The fields every experiment config has, with their defaults.

Experiment files in ``configs/`` start from `base_config` and override; since ConfigDicts built
here are locked, a misspelt field in a config file or on the command line is an error.
"""

from __future__ import annotations

import ml_collections

from jaxmed.data.synthetic import MODALITIES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "restoration"
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

  # UNet fields, and the SSFD UNet's (chans, num_pool_layers; num_groups, dropout shared).
  c.model = ml_collections.ConfigDict(dict(
      name="unet", features=(32, 64, 128, 256), norm="instance", num_groups=8, dropout=0.0,
      downsample="conv", dtype="float32", chans=20, num_pool_layers=4))

  c.data = ml_collections.ConfigDict(dict(
      source="auto", root="", modalities=MODALITIES, seg="seg", pattern="",
      pathology="tumour", num_subjects=24, shape=(64, 64, 64), noise=0.03, crop=(), seed=0,
      num_val=2, num_test=6, min_foreground=0.2))
  c.data.augment = ml_collections.ConfigDict(dict(
      enabled=False, flip=True, rot90=False, rotation=15.0, scale=(0.85, 1.25), affine_p=0.2,
      elastic_alpha=0.0, elastic_sigma=3.0, elastic_p=0.2, gamma=(0.7, 1.5), gamma_p=0.3,
      noise_std=0.0, noise_p=0.15))

  # Pretext tasks (jaxmed.pretext):
  #   restoration (source_identification Sec. 4): corruption "inpaint" (Eq. 8: cells kept with
  #     keep_prob), "local_shuffle" (Eq. 9: cells shuffled with shuffle_prob),
  #     "super_resolution" (Eq. 10), "intensity" (Eq. 11: Bezier curve, inverted with
  #     invert_prob); grid = cell size; loss_region "all" or "masked" (in-painting only).
  #   source identification (Sec. 3.3, 5.2): strategy "cross" / "within" / "denoise", pool of
  #     num_sources (N) sources, num_components (N~) per mixture, num_mixtures (M~); samples
  #     whose mixed brain masks overlap less than min_overlap are excluded.
  #   context prediction (SSFD Sec. 2.2): patch x patch zero-filled squares over coverage.
  c.pretext = ml_collections.ConfigDict(dict(
      corruption="inpaint", grid=8, keep_prob=0.75, loss_region="all", shuffle_prob=0.5,
      invert_prob=0.0, strategy="cross", num_sources=5, num_components=3, num_mixtures=2,
      min_overlap=0.0, patch=16, coverage=0.25))

  # Undersampled MRI (jaxmed.data.mri): Cartesian mask "random" or "equispaced" along the
  # phase-encode (W) axis; each example draws one acceleration and its centre fraction.
  c.mri = ml_collections.ConfigDict(dict(
      mask="random", accelerations=(4,), center_fractions=(0.08,)))

  # Fine-tuning (jaxmed.evaluate.finetune): where the pre-trained weights come from and how
  # many labelled training subjects are used.
  c.finetune = ml_collections.ConfigDict(dict(
      init_from="", num_labeled=0, label_fraction=1.0, eval_batch_size=32,
      # Train on every slice of the labelled subjects (0.0) so that the model also sees
      # slices with little or no brain, as it will when evaluated on whole volumes.
      min_foreground=0.0,
      # Early stopping (Sec. 5.5.3): stop after `patience` evaluations (every `eval_every`
      # steps) without a better mean validation Dice (0: never), not before step `min_steps`,
      # and test the best weights.
      patience=0, min_steps=0,
      # Mixup (Zhang et al. 2018; source_identification Sec. 6.4): lambda ~ Beta(a, a), a > 0.
      mixup_alpha=0.0))
  c.lock()
  return c


def parse_arg(arg: str, defaults: dict[str, str], *, config: str) -> dict[str, str]:
  """The ``key=value,...`` argument of a config file (``--config file.py:arg``) over
  ``defaults``; an unknown key, a missing ``=`` or a ``size`` other than '' / 'small' is an
  error naming ``config``."""
  args = dict(defaults)
  for kv in filter(None, arg.split(",")):
    key, sep, value = kv.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"{config} config arg must be key=value with key in {sorted(defaults)}; "
                       f"got {kv!r}")
    args[key] = value
  if args.get("size", "") not in ("", "small"):
    raise ValueError(f"size must be 'small' or absent; got {args['size']!r}")
  return args


def make_small(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a 2D UNet config to a CPU-sized run (``size=small``): 200 steps, batch 16, a
  16-128 filter UNet, 12 phantoms of which 2 are held out."""
  c.total_steps = 200
  c.batch_size = 16
  c.model.features = (16, 32, 64, 128)
  c.log_every = 20
  c.data.num_subjects = 12
  c.data.num_test = 2
  return c
