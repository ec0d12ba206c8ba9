"""Grid in-painting pre-training of a 2D UNet (source_identification Sec. 4.1).

    jaxmed train --config configs/inpainting.py --workdir /tmp/inpaint
    jaxmed train --config configs/inpainting.py:size=small --workdir /tmp/inpaint
    jaxmed train --config configs/inpainting.py --config.data.source=nifti \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,200,200 --workdir ...
"""

from jaxmed.train.defaults import base_config


def get_config(arg: str = ""):
  """``arg``: comma-separated ``key=value``; ``size=small`` for a CPU-sized run."""
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  c = base_config()
  c.method = "inpainting"
  c.optim.lr = 1e-2
  c.pretext.grid = 8
  c.pretext.keep_prob = 0.75
  if args.get("size", "") == "small":
    c.total_steps = 200
    c.batch_size = 16
    c.model.features = (16, 32, 64, 128)
    c.log_every = 20
    c.data.num_subjects = 12
    c.data.num_test = 2
  return c


def get_sweep(arg: str = ""):
  """Grid size x keep probability, as tuned in source_identification Sec. 5.3."""
  del arg
  return [{"pretext.grid": g, "pretext.keep_prob": p} for g in (4, 8, 16) for p in (0.5, 0.75)]
