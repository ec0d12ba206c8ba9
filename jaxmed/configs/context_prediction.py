"""SSFD context-prediction pre-training (ssfd_feature_distance Sec. 2.2 and appendix 5.1).

    jaxmed train --config configs/context_prediction.py --workdir /tmp/ssfd
    jaxmed train --config configs/context_prediction.py:size=small --workdir /tmp/ssfd
    jaxmed train --config configs/context_prediction.py \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,192,192 --workdir ...

An SSFD UNet (5 levels, 20-320 filters, GroupNorm with 10 groups, dropout 0.1) in-paints
zero-filled 16 x 16 patches covering 25% of each z-scored slice, placed by Poisson-disc
sampling, under an L2 loss with Adam. The paper does not give the learning rate; 1e-3 (Adam's
usual default) with a constant schedule is used. One modality, phantoms by default (in-plane
128 x 128 so that 25% is 16 patches); a NIfTI folder when ``--config.data.root`` is given. In-plane sizes
must be divisible by ``2**model.num_pool_layers`` (16).

``arg``: ``size=small`` for a CPU-sized run (64 x 64 slices, 10-160 filters, 100 steps).
"""

from jaxmed.train.defaults import base_config, parse_arg


def get_config(arg: str = ""):
  """``arg``: ``size=small`` for a CPU-sized run."""
  size = parse_arg(arg, {"size": ""}, config="context_prediction")["size"]
  c = base_config()
  c.method = "context_prediction"
  c.model.name = "ssfd_unet"
  c.model.chans = 20
  c.model.num_pool_layers = 4
  c.model.num_groups = 10
  c.model.dropout = 0.1
  c.optim.name = "adam"
  c.optim.schedule = "constant"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.0
  c.pretext.patch = 16
  c.pretext.coverage = 0.25
  c.data.modalities = ("t2",)
  c.data.shape = (32, 128, 128)
  if size == "small":
    c.total_steps = 100
    c.batch_size = 8
    c.log_every = 10
    c.model.chans = 10
    c.data.shape = (16, 64, 64)
    c.data.num_subjects = 8
    c.data.num_val = 1
    c.data.num_test = 1
  return c
