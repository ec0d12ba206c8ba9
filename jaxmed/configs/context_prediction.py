"""SSFD context-prediction pre-training (ssfd_feature_distance Sec. 2.2 and appendix 5.1).

    jaxmed train --config context_prediction --workdir /tmp/ssfd
    jaxmed train --config context_prediction:size=small --workdir /tmp/ssfd
    jaxmed train --config context_prediction \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,192,192 --workdir ...

An SSFD UNet (5 levels, 20-320 filters, GroupNorm with 10 groups, dropout 0.1) in-paints
zero-filled 16 x 16 patches covering 25% of each z-scored slice, placed by Poisson-disc
sampling, under an L2 loss with Adam. The paper does not give the learning rate; 1e-3 (Adam's
usual default) with a constant schedule is used. One modality, phantoms by default (in-plane
128 x 128 so that 25% is 16 patches); a NIfTI folder when ``--config.data.root`` is given. In-plane sizes
must be divisible by ``2**model.num_pool_layers`` (16).

``arg``: ``size=small`` for a CPU-sized run (64 x 64 slices, 10-160 filters, 100 steps).
"""

from jaxmed.config import method_config, parse_arg


def get_config(arg: str = ""):
  """``arg``: ``size=small`` for a CPU-sized run."""
  size = parse_arg(arg, {"size": ""}, config="context_prediction")["size"]
  # The method's defaults: SSFD UNet 20-320, GroupNorm 10, dropout 0.1; 16 x 16 patches over
  # 25%; Adam 1e-3 constant; T2 phantoms of 32 x 128 x 128.
  c = method_config("context_prediction")
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
