"""SimMIM pre-training of a whole Swin-UNETR: the "MAE" baseline of Disruptive Autoencoders
(Sec. 3.3, Fig. 2, Tables 3-5), with the target leak of the reference's skip path fixed.

    jaxmed train --config simmim:size=small --workdir runs/simmim

``arg``: ``size=small`` for a CPU-sized run. Full size: the DAE recipe (`jaxmed.configs.dae`:
Swin-UNETR feature 48 on 96^3 single-modality crops, AdamW 4e-4, wd 1e-5, 500 warm-up steps,
cosine, clip 1.0, 20k steps at batch 16) with 16^3-voxel mask patches at ratio 0.6.
``size=small``: the DAE small run (feature 12, window 4, 32^3 crops, batch 8, 200 steps) with
8^3-voxel mask patches (64 per crop, 39 masked).
"""

from jaxmed.config import method_config, parse_arg
from jaxmed.configs.dae import swin_pretrain_size


def get_config(arg: str = ""):
  """``arg``: ``size``."""
  small = parse_arg(arg, {"size": ""}, config="simmim")["size"] == "small"
  c = swin_pretrain_size(method_config("simmim"), small)
  if small:
    c.pretext.mask_patch = 8
  return c
