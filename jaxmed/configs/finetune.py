"""Segmentation fine-tuning of a (pre-trained) UNet (source_identification Sec. 5.4-5.5).

    jaxmed train --config finetune \
        --config.init.path=/tmp/inpaint --config.finetune.num_labeled=4 --workdir ...
Without ``init.path`` the model trains from scratch (the CNN baseline). The protocol of Sec.
5.5.3: SGD momentum 0.99, poly schedule from 1e-2, weight decay 3e-5 (base config); the
pre-trained input and output layers are replaced (``init.replace``); rotation,
scaling, flip and elastic augmentation; early stopping on the validation Dice, evaluated every
``eval_every`` steps, after ``finetune.patience`` evaluations without improvement (the best
validation weights are tested); ``finetune.mixup_alpha > 0`` adds mixup (Sec. 6.4).
"""

from jaxmed.config import make_small, method_config, parse_arg


def get_config(arg: str = ""):
  """``arg``: comma-separated ``key=value``; ``size=small`` for a CPU-sized run."""
  args = parse_arg(arg, {"size": ""}, config="finetune")
  c = method_config("segmentation")
  c.optim.lr = 1e-2
  c.data.augment.enabled = True
  c.data.augment.elastic_alpha = 2.0
  c.eval_every = 100
  c.finetune.patience = 5
  if args["size"] == "small":
    make_small(c)
    c.eval_every = 50
    c.finetune.patience = 2
  return c


def get_sweep(arg: str = ""):
  """Few-label settings: 25%, 50% and all training subjects."""
  del arg
  return [{"finetune.label_fraction": f} for f in (0.25, 0.5, 1.0)]
