"""SimSiam pre-training of a CoPer loss network on grey MR slices, the paper's comparison with
SwAV (CoPer Sec. IV-B, Table III; facebookresearch/simsiam).

    jaxmed train --config simsiam --workdir runs/simsiam_rn50                    # ResNet-50
    jaxmed train --config simsiam:backbone=vgg16_bn --workdir runs/simsiam_vgg   # VGG16-BN
    jaxmed train --config simsiam:backbone=vgg16_bn,size=small --workdir runs/simsiam_small

The paper gives no SimSiam settings; these are the reference's: two views, random resized crops
(area 0.2-1) of 224, flips, colour jitter 0.4 (p 0.8) and blur (p 0.5); projector 3 x
(Linear-BN-ReLU) of width 2048 (last BN affine-free, no ReLU), predictor 2048-512-2048; SGD
momentum 0.9, wd 1e-4, lr 0.05 x batch / 256 by a cosine, the predictor's lr fixed
(``--fix-pred-lr``). Batch 96 and SwAV's step count (CoPer App. B), slices with >= 20% brain of
one modality stacked to 3 channels, as for SwAV (`jaxmed.configs.swav`).

``arg``: as `jaxmed.configs.swav`: ``backbone`` (resnet18, resnet50 (default), vgg16_bn,
vgg16), ``width`` (backbone width multiplier; default 1, 0.25 at ``size=small``),
``modality`` (default t2) and ``size=small`` for a CPU-sized run: 300 steps of batch 16 on
64 x 64 phantom slices with >= 10% brain, views of 64, projector / predictor 256-64-256, the
blur sigma scaled with the slice size (64 / 224), and lr 0.05 (the reference's batch-256 lr;
scaled linearly to batch 16 the loss stayed at 0 over 120 steps in a CPU run, at 0.05 it fell
to about -0.7).
"""

from jaxmed.config import method_config
from jaxmed.configs.swav import parse_backbone_args, set_backbone, small_run


def get_config(arg: str = ""):
  """``arg``: ``backbone=...``, ``width=...``, ``modality=...`` and / or ``size=small``."""
  args = parse_backbone_args(arg, "simsiam")
  c = method_config("simsiam")
  set_backbone(c, args)
  c.total_steps = 122100
  c.batch_size = 96
  c.log_every = 50
  if args["size"] == "small":
    small_run(c)
    c.pretext.update(size=64, blur_sigma=(0.1, 0.6))
    c.head.update(proj_hidden_dim=256, proj_dim=256, pred_hidden_dim=64)
    c.optim.lr = 0.05  # the batch-256 lr: 0.05 x 16 / 256 barely moves in 300 steps
  return c
