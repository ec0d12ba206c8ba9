"""Reconstruction of 4x-undersampled MRI by a 2D UNet (ssfd_feature_distance Sec. 2.1).

    jaxmed train --config reconstruction --workdir /tmp/recon
    jaxmed train --config reconstruction:size=small --workdir /tmp/recon
    jaxmed train --config reconstruction \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,200,200 --workdir ...
    jaxmed sweep --config reconstruction --workdir /tmp/recon_sweep

The sweep trains one model per acceleration (2, 4, 6, 8), giving reconstructions of graded
quality for the SSFD / SSIM / PSNR comparison of Sec. 2.3.
"""

from jaxmed.data.mri import fastmri_center_fraction as center_fraction
from jaxmed.config import make_small, method_config, parse_arg

ACCELERATIONS = (2, 4, 6, 8)


def get_config(arg: str = ""):
  """``arg``: comma-separated ``key=value``; ``size=small`` for a CPU-sized run."""
  args = parse_arg(arg, {"size": ""}, config="reconstruction")
  c = method_config("reconstruction")
  c.data.modalities = ("t2",)
  # Sec. 2.1: 4 levels, 32-256 filters, 2 convolutions per level. The paper does not say how
  # levels are down-sampled; we pool, as fastMRI's reconstruction UNet does (it average-pools;
  # jaxmed's UNet offers max-pooling).
  c.model.features = (32, 64, 128, 256)
  c.model.downsample = "maxpool"
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.0
  c.mri.mask = "random"
  c.mri.accelerations = (4,)
  c.mri.center_fractions = (center_fraction(4),)
  return make_small(c) if args["size"] == "small" else c


def get_sweep(arg: str = ""):
  """One run per acceleration, each with fastMRI's centre fraction for it."""
  del arg
  return [{"mri.accelerations": (a,), "mri.center_fractions": (center_fraction(a),)}
          for a in ACCELERATIONS]
