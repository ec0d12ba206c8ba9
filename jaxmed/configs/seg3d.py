"""3D segmentation fine-tuning with k-fold cross-validation and a fold ensemble (the DAE protocol,
disruptive_autoencoders Sec. 4; MONAI's BTCV / Swin-UNETR recipe).

    jaxmed train --config seg3d --workdir runs/seg3d                        # tumour WT/TC/ET
    jaxmed train --config seg3d:target=tissues --workdir runs/tissues       # 8-class, 1 modality
    jaxmed train --config seg3d:model=swin_unetr --workdir runs/swin        # Swin-UNETR
    jaxmed train --config seg3d:size=small --workdir runs/seg3d \
        --config.init.path=runs/restoration3d                               # from pre-training
    jaxmed train --config seg3d:model=swin_unetr,part=encoder,size=small \
        --config.init.path=runs/swin_ssl --workdir runs/swin_ssl_ft         # the encoder only

A 3D UNet (or Swin-UNETR, feature size 48 as in DAE; 12, window 4 at ``size=small``) on ``crop_size``
crops (a third centred on labelled voxels), flips / rot90 and intensity scale-and-shift
augmentation (MONAI's recipe: factor / offset 0.1, p 0.1); DiceCE (softmax) for the tissue
classes, Dice + BCE (sigmoid) for the overlapping tumour regions. ``finetune.folds`` folds of the non-held-out
subjects, best validation weights per fold (evaluated every ``eval_every`` steps by sliding
windows over whole volumes, overlap 0.5, batch 4), the fold models ensembled on the
``data.num_test`` held-out subjects; Dice, HD95 and mean surface distance per class
(`jaxmed.evaluate.crossval`). ``finetune.label_fraction`` sets the labelled share of each
fold's training subjects (100 / 50 / 20% in the paper: `get_sweep`).
"""

from jaxmed.config import method_config, parse_arg, set_model
from jaxmed.methods.segmentation import transfer_layers


def get_config(arg: str = ""):
  """``arg``: ``target=tumour|tissues``; ``model=unet|swin_unetr``; ``input=new|tile``: a
  pre-trained input layer with another channel count is replaced by a new one, or its kernel
  tiled over the channels (scaled by old / new, `jaxmed.train.init.tile_input_channels`;
  `jaxmed.methods.segmentation.transfer_layers`); ``part=both|encoder|decoder`` (Swin-UNETR):
  what is transferred from the pre-trained network, the rest starts fresh; ``size=small`` for a
  CPU-sized run."""
  args = parse_arg(arg, {"target": "tumour", "model": "unet", "input": "new", "part": "both",
                         "size": ""}, config="seg3d")
  if args["target"] not in ("tumour", "tissues"):
    raise ValueError(f"seg3d: target must be 'tumour' or 'tissues'; got {args['target']!r}")
  if args["input"] not in ("new", "tile"):
    raise ValueError(f"seg3d: input must be 'new' or 'tile'; got {args['input']!r}")
  if args["model"] not in ("unet", "swin_unetr"):
    raise ValueError(f"seg3d: model must be 'unet' or 'swin_unetr'; got {args['model']!r}")
  c = method_config("segmentation")
  if args["model"] == "swin_unetr":  # DAE Sec. 4: feature size 48
    set_model(c, "swin_unetr", feature_size=48)
  c.data.view = "crop"
  c.data.crop_size = (64, 64, 64)
  c.data.fg_fraction = 0.33
  c.data.augment.enabled = True
  c.data.augment.rot90 = True
  c.data.augment.affine_p = 0.0
  c.data.augment.update(intensity_scale=0.1, intensity_scale_p=0.1, intensity_shift=0.1,
                        intensity_shift_p=0.1)
  c.init.update(transfer_layers(args["model"], args["input"], args["part"]))
  if args["target"] == "tissues":  # FeTA-like: the tissue map from a single modality
    c.data.pathology = "brain_tissues"
    c.data.modalities = ("t1",)
  c.optim.update(name="adamw", lr=1e-4, weight_decay=1e-5, schedule="cosine", warmup_steps=50)
  c.total_steps = 2000
  c.batch_size = 2
  c.eval_every = 200
  c.data.num_subjects = 30
  c.data.num_val = 3
  c.data.num_test = 6
  c.finetune.folds = 5
  c.finetune.test_best = True
  if args["size"] == "small":
    if args["model"] == "swin_unetr":
      # Window 4 tiles the 16^3 tokens of a 32^3 crop exactly (7 pads them to 21^3), and is
      # the window of the small DAE / SimMIM / Swin-SSL pre-training runs it fine-tunes.
      c.model.update(feature_size=12, window_size=4)
    else:
      c.model.features = (8, 16, 32, 64)
    c.data.shape = (32, 48, 48)
    c.data.crop_size = (32, 32, 32)
    c.data.num_subjects = 16
    c.data.num_val = 2
    c.data.num_test = 4
    c.finetune.folds = 3
    c.total_steps = 150
    c.batch_size = 4
    c.eval_every = 50
    c.log_every = 25
    c.optim.update(lr=2e-3, warmup_steps=10)
  return c


def get_sweep(arg: str = ""):
  """Label fractions of each fold's training subjects: 100 / 50 / 20%."""
  del arg
  return [{"finetune.label_fraction": f} for f in (1.0, 0.5, 0.2)]
