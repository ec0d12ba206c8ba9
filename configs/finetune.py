"""Segmentation fine-tuning of a (pre-trained) UNet (source_identification Sec. 5.4-5.5).

    jaxmed finetune --config configs/finetune.py \
        --config.finetune.init_from=/tmp/inpaint --config.finetune.num_labeled=4 --workdir ...
Without ``init_from`` the model trains from scratch (the CNN baseline).
"""

from jaxmed.train.defaults import base_config


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = base_config()
  c.method = "segmentation"
  c.optim.lr = 1e-2
  c.data.augment.enabled = True
  if args.get("size", "") == "small":
    c.total_steps = 200
    c.batch_size = 16
    c.model.features = (16, 32, 64, 128)
    c.log_every = 20
    c.data.num_subjects = 12
    c.data.num_test = 2
  return c


def get_sweep(arg: str = ""):
  """Few-label settings: 25%, 50% and all training subjects."""
  del arg
  return [{"finetune.label_fraction": f} for f in (0.25, 0.5, 1.0)]
