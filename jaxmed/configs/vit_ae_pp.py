"""ViT-AE++ pre-training (vit_ae_plus_plus): a 3D masked autoencoder ViT on the 4 MR modalities
with L_rec + lambda1 L_per + lambda2 L_edge + L_CL (Eq. 4), or any row of Table 3.

    jaxmed train --config vit_ae_pp:size=small --workdir runs/vitaepp            # ViT-AE++
    jaxmed train --config vit_ae_pp:losses=rec,size=small --workdir runs/vitae   # ViT-AE
    jaxmed train --config vit_ae_pp:losses=cl,size=small ...                     # ViT + L_CL
    jaxmed train --config vit_ae_pp:dims=2,size=small ...                        # 2D slices
    jaxmed train --config vit_ae_pp:lambda2=constant,size=small ...              # Fig. 2 right
    jaxmed train --config vit_ae_pp:loss_net=vgg16.pth ...                       # VGG weights

``arg``: comma-separated ``key=value``:
  losses: the terms of Eq. 4 that are on, joined by "+": "all" (default: ViT-AE++, Table 3's
    last row), "rec" (ViT-AE), "rec+edge", "rec+per", "rec+edge+per", "cl" (ViT + L_CL), or any
    other non-empty combination of rec, per, edge, cl. Without "per" there is no loss network.
  dims: 3 (default: crops of volumes) or 2 (the same method on axial slices).
  mask_ratio: the masked fraction of tokens (default 0.75; Fig. 2 left sweeps 0.55-0.95).
  lambda2: "decay" (default: 0.01 linearly to 0 at total_steps, Sec. 5 and the code) or
    "constant" (0.01 throughout, Fig. 2 right's unstable run).
  cl: "pooled" (default: SimSiam on the mean of the visible tokens, weight 1 as Eq. 4) or
    "token" (the reference code: token k of view 1 against token k of view 2, cls included,
    weight 0.001).
  loss_net: "random" (default: a VGG-16 with seeded random weights, ``loss_net.seed``) or a
    path: a VGG-16 weights file (``.pth``/``.safetensors``, torchvision layout, converted) or a
    jaxmed run holding a VGG-16 (found by its shapes). Its fields (``width``, ``batch_norm``)
    must match: ``--config.loss_net.model.<field>``.
  size: "small" for a CPU-sized run.

Full size (the paper's): 96^3 crops centred on a tumour voxel (``data.fg_fraction=1``: the
paper centres the box on the tumour mask's centroid; here the centre is a random tumour voxel,
which also jitters the box), phantoms of 128^3, patch 8 (1728 tokens, 432 visible), encoder 12
x 768 (12 heads), decoder 8 x 512 (16 heads), a full-width VGG-16 (no batch norm) read at 16
random slices per volume and step (the reference reads every slice without gradient), batch 4,
AdamW lr 1e-3 x 4 / 256, betas (0.9, 0.95), wd 0.05; 1000 epochs of BraTS's 326 volumes at
batch 4 = 81500 steps, 40 of them warm-up = 3260 steps, then a cosine to 0. The 2D variant
(``dims=2``) at full size: MAE's ViT-B/16 (patch 16) on 224 x 224 slices, the same recipe.

``size=small``: 300 steps of batch 8 on 32^3 crops of 64^3 phantoms (patch 8: 64 tokens, 16
visible), encoder 192 x 4 (3 heads), decoder 128 x 2 (4 heads), a quarter-width VGG read at 4
slices per volume, lr 5e-4 with 15 warm-up steps (5%): the middle of the notes' small-scale grid
{1e-4, 5e-4, 1e-3} (the paper's 1e-3 x 8 / 256 = 3e-5 is meant for 1000 epochs; not tuned
here), 12 phantoms (2 for validation, 2 for test). 2D small: the 64 x 64 axial slices (64
tokens) with the same networks.
"""

from jaxmed.config import make_small_3d, method_config, parse_arg
from jaxmed.configs.coper_synthesis import _TORCH_SUFFIXES, LOSS_ARCHS
from jaxmed.methods.vit_ae_pp import REFERENCE_CL_WEIGHT, TERMS

_ARGS = {"losses": "all", "dims": "3", "mask_ratio": "", "lambda2": "decay", "cl": "pooled",
         "loss_net": "random", "size": ""}
# The paper's schedule in steps: 1000 epochs (40 of warm-up) of 326 BraTS volumes at batch 4.
STEPS_PER_EPOCH = 326 / 4
FULL_STEPS = int(1000 * STEPS_PER_EPOCH)
FULL_WARMUP = int(40 * STEPS_PER_EPOCH)


def parse_losses(value: str) -> tuple[str, ...]:
  """The terms named by a ``losses=`` value ("all", "rec+cl", ...), in `TERMS` order."""
  names = TERMS if value == "all" else tuple(value.split("+"))
  unknown = [t for t in names if t not in TERMS]
  if not value or unknown or len(set(names)) != len(names):
    raise ValueError(f"vit_ae_pp: losses must be 'all' or distinct terms of {TERMS} joined by "
                     f"'+' (e.g. 'rec+edge+per'); got {value!r}")
  return tuple(t for t in TERMS if t in names)


def _choice(args: dict, key: str, choices: tuple[str, ...]) -> str:
  if args[key] not in choices:
    raise ValueError(f"vit_ae_pp: {key} must be one of {choices}; got {args[key]!r}")
  return args[key]


def get_config(arg: str = ""):
  """``arg``: ``losses``, ``dims``, ``mask_ratio``, ``lambda2``, ``cl``, ``loss_net``, ``size``."""
  args = parse_arg(arg, _ARGS, config="vit_ae_pp")
  terms = parse_losses(args["losses"])
  dims = int(_choice(args, "dims", ("3", "2")))
  schedule = {"decay": "linear", "constant": "constant"}[
      _choice(args, "lambda2", ("decay", "constant"))]
  cl_mode = _choice(args, "cl", ("pooled", "token"))
  small = args["size"] == "small"
  c = method_config("vit_ae_pp")

  for term in TERMS:
    c.loss[term] = term in terms
  c.loss.lambda2_schedule = schedule
  c.loss.cl_mode = cl_mode
  if cl_mode == "token":
    c.loss.cl_weight = REFERENCE_CL_WEIGHT
  if args["mask_ratio"]:
    try:
      c.model.mask_ratio = float(args["mask_ratio"])
    except ValueError:
      raise ValueError(f"vit_ae_pp: mask_ratio must be a number in [0, 1); got "
                       f"{args['mask_ratio']!r}") from None
    if not 0.0 <= c.model.mask_ratio < 1.0:
      raise ValueError(f"vit_ae_pp: mask_ratio must be in [0, 1); got {c.model.mask_ratio}")

  source = args["loss_net"]
  if "per" not in terms and source != "random":
    raise ValueError(f"vit_ae_pp: loss_net={source!r} needs the perceptual term (per in losses); "
                     f"got losses={args['losses']!r}")
  if "per" not in terms:
    c.loss_net.source = "none"
    with c.unlocked():
      del c.param_groups["loss_net"]
  elif source != "random":
    c.loss_net.source = "pretrained"
    c.loss_net.path = source
    if source.endswith(_TORCH_SUFFIXES):  # torchvision's VGG-16 layout
      _, _, converter, converter_kwargs = LOSS_ARCHS["vgg16"]
      c.loss_net.converter = converter
      c.loss_net.converter_kwargs = converter_kwargs

  c.model.spatial_dims = dims
  if dims == 2:
    c.data.view = "slice"  # axial slices with >= data.min_foreground brain
  if small:
    make_small_3d(c, total_steps=300)  # 15 warm-up steps
    c.model.update(embed_dim=192, depth=4, num_heads=3, decoder_embed_dim=128,
                   decoder_depth=2, decoder_num_heads=4)
    c.loss.num_slices = 4
    c.optim.lr = 5e-4
    c.loss_net.model.width = 0.25
  else:
    c.total_steps = FULL_STEPS
    c.batch_size = 4
    c.log_every = 100
    c.checkpoint.every = 5000
    c.optim.update(lr=1e-3 * c.batch_size / 256, warmup_steps=FULL_WARMUP)
    if dims == 3:
      c.data.shape = (128, 128, 128)
      c.data.crop_size = (96, 96, 96)
    else:  # MAE's ViT-B/16 on 224 x 224 slices
      c.data.shape = (64, 224, 224)
      c.model.patch_size = 16
  return c

