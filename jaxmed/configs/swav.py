"""SwAV pre-training of the CoPer loss network on grey MR slices (CoPer Sec. III-A, IV-B,
App. B; facebookresearch/swav).

    jaxmed train --config swav --workdir runs/swav_rn50                    # ResNet-50
    jaxmed train --config swav:backbone=vgg16_bn --workdir runs/swav_vgg   # VGG16-BN
    jaxmed train --config swav:backbone=vgg16_bn,size=small --workdir runs/swav_small
    jaxmed train --config swav:backbone=vgg16_bn,modality=t2 \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,224,224 --workdir ...

The paper's recipe (App. B): slices with >= 20% brain of the synthesis target's modality,
stacked to 3 channels; 2 crops of 192 (area 0.14-1) and 6 of 96 (0.05-0.14; SwAV's
``nmb_crops 2 6``), flips, colour jitter (p 0.8) and blur; projection head 2048-128, 3000
prototypes frozen for the first 313 steps (SwAV's default; the paper's "331 iterations"),
Sinkhorn eps 0.05 with 3 iterations, temperature 0.1; batch 96, LARS (SwAV's LARC over SGD,
momentum 0.9, wd 1e-6) with lr 0.6 -> 0.0006 by a cosine after 5 warm-up epochs. Scheduled by
steps: 122100 (the paper's Fig. 6 count for 400 epochs), 1526 of warm-up (5 of its 400
epochs). The paper trains on 224 x 224 slices: give real data a 224 in-plane crop; the default
phantoms are 64 x 64 (the crops then upsample).

``arg``: comma-separated ``key=value``: ``backbone`` (resnet18, resnet50 (default), vgg16_bn,
vgg16), ``width`` (width multiplier of the backbone: ResNet ``widen_factor``, VGG ``width``;
default 1, 0.25 at ``size=small``), ``modality`` (t2 (default: the tumour task's target),
flair, t1, t1ce) and ``size=small`` for a CPU-sized run: 300 steps of batch 16 on 64 x 64
phantom slices with >= 10% brain, crops 64 and 2 x 32, head 256-64, 100 prototypes (frozen for
30 steps) and a queue of 128 embeddings from step 100 (CoPer notes: a phantom set has fewer
slices than 3000 prototypes), blur sigma scaled with the slice size (64 / 224), lr 0.6 scaled
linearly from batch 96 to 16, and Sinkhorn eps 0.02: in short CPU runs of this size (VGG16-BN at
quarter width) eps 0.05, or lr 0.6, let the codes turn uniform and the loss settle at ln K (the
collapse SwAV's README warns of), eps 0.02 with lr 0.1 did not within 200 steps.
"""

from jaxmed.config import method_config, parse_arg, set_model
from jaxmed.data.synthetic import MODALITIES
from jaxmed.methods.swav import BACKBONES, WIDTH_FIELD

_ARGS = {"backbone": "resnet50", "width": "", "modality": "t2", "size": ""}


def parse_backbone_args(arg: str, config: str) -> dict:
  """The ``backbone``, ``width`` (float or None), ``modality`` and ``size`` of ``arg``,
  checked (shared with the SimSiam config)."""
  args = parse_arg(arg, _ARGS, config=config)
  if args["backbone"] not in BACKBONES:
    raise ValueError(f"{config}: backbone must be one of {sorted(BACKBONES)}; got "
                     f"{args['backbone']!r}")
  if args["modality"] not in MODALITIES:
    raise ValueError(f"{config}: modality must be one of {MODALITIES}; got "
                     f"{args['modality']!r}")
  if args["width"]:
    try:
      args["width"] = float(args["width"])
    except ValueError:
      raise ValueError(f"{config}: width must be a number > 0; got {args['width']!r}") from None
    if not args["width"] > 0:
      raise ValueError(f"{config}: width must be a number > 0; got {args['width']!r}")
  else:
    args["width"] = 0.25 if args["size"] == "small" else 1.0
  return args


def set_backbone(c, args: dict) -> None:
  """``config.model`` for ``args["backbone"]`` at ``args["width"]``; one modality."""
  fields = dict(BACKBONES[args["backbone"]])
  name = fields.pop("name")
  set_model(c, name, **fields, **{WIDTH_FIELD[name]: args["width"]})
  c.data.modalities = (args["modality"],)


def small_run(c) -> None:
  """The CPU-sized run of SwAV and SimSiam (``size=small``): 300 steps of batch 16 on 12
  phantoms (2 held out), slices with >= 10% brain."""
  c.total_steps = 300
  c.batch_size = 16
  c.log_every = 20
  c.checkpoint.every = 100
  c.data.num_subjects = 12
  c.data.num_test = 2
  c.data.min_foreground = 0.1


def get_config(arg: str = ""):
  """``arg``: ``backbone=...``, ``width=...``, ``modality=...`` and / or ``size=small``."""
  args = parse_backbone_args(arg, "swav")
  c = method_config("swav")
  set_backbone(c, args)
  c.total_steps = 122100       # CoPer Fig. 6: 400 epochs
  c.optim.warmup_steps = 1526  # 5 of the 400 epochs
  c.batch_size = 96
  c.log_every = 50
  if args["size"] == "small":
    small_run(c)
    c.pretext.update(global_size=64, local_size=32, num_local=2, blur_sigma=(0.1, 0.6))
    c.head.update(hidden_dim=256, out_dim=64, num_prototypes=100)
    c.swav.update(queue_length=128, queue_start_step=100, epsilon=0.02)
    c.param_groups.prototypes.freeze_steps = 30
    c.optim.update(lr=0.6 * 16 / 96, end_lr=0.0001, warmup_steps=15)
  return c
