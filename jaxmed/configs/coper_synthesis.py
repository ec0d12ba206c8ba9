"""Multi-modal MRI synthesis with the CoPer loss (coper_contrastive_perceptual_metric Sec. III-C,
Eq. 5, App. C): pix2pix (U-Net G, conditional PatchGAN D) trained with
``lambda1 L1 + (1 - lambda1) L_CoPer + lambda2 L_adv`` through a frozen loss network.

    jaxmed train --config coper_synthesis:size=small --workdir /tmp/syn          # random VGG
    jaxmed train --config coper_synthesis:task=ms,loss_net=none,size=small ...   # L1 baseline
    jaxmed train --config coper_synthesis:loss_net=runs/swav_t2,size=small ...   # SwAV VGG
    jaxmed train --config coper_synthesis:loss_net=vgg16_bn.pth,loss_arch=vgg16_bn ...
    jaxmed train --config coper_synthesis:lambda2=paper ...                     # lambda2 = 10

``arg``: comma-separated ``key=value``:
  task: "tumour" (FLAIR + T1 -> T2, the default) or "ms" (T1 + T2 -> FLAIR, on the WMH
    phantoms); sets the modalities and the default lambda1 (Fig. 8: 0.70 and 0.55).
  loss_net: "random" (default: the loss network from ``loss_net.seed``, the paper's "rand.
    VGG" row), "none" (no loss network, L1 + adversarial: the paper's L1 row; lambda1 = 1),
    or a path: a jaxmed run (a SwAV / SimSiam pre-training; ``loss_net.prefix`` names the
    module, by default found from the shapes) or a PyTorch ``.pth`` file (converted with the
    converter of ``loss_arch``).
  loss_arch: the loss network: "vgg16_bn" (default; VGG-16 with batch norm, the variant that
    trains from scratch), "vgg16", "resnet18", "resnet50". Its fields (e.g. VGG's ``width``,
    ResNet's ``widen_factor``) must match the checkpoint: ``--config.loss_net.model.<field>``.
  lambda1: overrides the task's value. lambda2: a number, or "paper" for the paper's printed
    10; the default 0.01 keeps pix2pix's adversarial : reconstruction ratio 1 : 100 (see
    `jaxmed.methods.coper_synthesis.PIX2PIX_LAMBDA2`).
  size: "small" for a CPU-sized run on 40x64x64 phantoms.

Full size (pix2pix's defaults where the paper is silent): 256 x 256 slices (phantoms generated
at 64 x 256 x 256; NIfTI slices are resized to 256), U-Net-256, 70x70 PatchGAN, batch 1, Adam
lr 2e-4 beta1 0.5. ``size=small``: 64 x 64 slices, a 6-level U-Net with 16 base filters, a
2-layer PatchGAN (34 px receptive field; 3 layers would see all of a 64 px slice), a
quarter-width VGG, batch 16, 300 steps.
"""

import ml_collections

from jaxmed.config import method_config, parse_arg
from jaxmed.methods.coper_synthesis import PAPER_LAMBDA2, TASKS, model_defaults

_ARGS = {"task": "tumour", "loss_net": "random", "loss_arch": "vgg16_bn", "lambda1": "",
         "lambda2": "", "size": ""}
# loss_arch -> (registry model, fields over its defaults, PyTorch converter, its kwargs).
LOSS_ARCHS = {
    "vgg16_bn": ("vgg16", {"batch_norm": True}, "vgg16", {"drop_classifier": True}),
    "vgg16": ("vgg16", {"batch_norm": False}, "vgg16", {"drop_classifier": True}),
    "resnet18": ("resnet", {"depth": 18}, "resnet", {"drop_fc": True}),
    "resnet50": ("resnet", {"depth": 50}, "resnet", {"drop_fc": True}),
}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _number(value: str, name: str) -> float:
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"coper_synthesis config arg {name} must be a number; got {value!r}") from None


def get_config(arg: str = ""):
  """``arg``: ``task``, ``loss_net``, ``loss_arch``, ``lambda1``, ``lambda2``, ``size``."""
  args = parse_arg(arg, _ARGS, config="coper_synthesis")
  if args["task"] not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}; got {args['task']!r}")
  if args["loss_arch"] not in LOSS_ARCHS:
    raise ValueError(f"loss_arch must be one of {sorted(LOSS_ARCHS)}; got {args['loss_arch']!r}")
  task = TASKS[args["task"]]
  small = args["size"] == "small"
  c = method_config("coper_synthesis")

  c.synthesis.inputs, c.synthesis.targets = task["inputs"], task["targets"]
  c.data.modalities = task["inputs"] + task["targets"]
  c.data.pathology = task["pathology"]
  c.loss.lambda1 = task["lambda1"]
  if args["lambda1"]:
    c.loss.lambda1 = _number(args["lambda1"], "lambda1")
  if args["lambda2"]:
    c.loss.lambda2 = (PAPER_LAMBDA2 if args["lambda2"] == "paper"
                      else _number(args["lambda2"], "lambda2"))

  name, fields, converter, converter_kwargs = LOSS_ARCHS[args["loss_arch"]]
  model = {"name": name, **model_defaults(name), **fields}
  if small:  # a quarter-width network (VGG16.width, ResNet.widen_factor)
    model.update({"width": 0.25} if "width" in model else {"widen_factor": 0.25})
  with c.unlocked():
    c.loss_net.model = ml_collections.ConfigDict(model)
  source = args["loss_net"]
  if source == "none":
    c.loss_net.source = "none"
    c.loss.lambda1 = 1.0
    with c.unlocked():
      del c.param_groups["loss_net"]
  elif source == "random":
    c.loss_net.source = "random"
  else:
    c.loss_net.source = "pretrained"
    c.loss_net.path = source
    if source.endswith(_TORCH_SUFFIXES):  # torchvision weights: torchvision's normalisation
      c.loss_net.converter = converter
      c.loss_net.converter_kwargs = converter_kwargs
      c.loss_net.preprocess = "imagenet"

  if small:
    c.total_steps = 300
    c.batch_size = 16
    c.log_every = 20
    c.checkpoint.every = 100
    c.data.shape = (40, 64, 64)
    c.synthesis.image_size = 0  # the slices' own 64 x 64 (jitter: resized to 72, cropped)
    c.generator.num_downs = 6
    c.generator.ngf = 16
    c.discriminator.n_layers = 2
    c.discriminator.ndf = 16
  else:
    # pix2pix: batch 1, 256 x 256. The paper gives no step count; 200k steps at batch 1 are
    # ~17 passes over its 11969 tumour slices (pix2pix's default is 200 epochs).
    c.total_steps = 200_000
    c.batch_size = 1
    c.log_every = 100
    c.checkpoint.every = 5000
    c.data.shape = (64, 256, 256)
    c.synthesis.image_size = 256
  return c


def get_sweep(arg: str = ""):
  """Fig. 8: lambda1 from 0 to 1 (L1 only) in steps of 0.1; the task from ``arg``."""
  if get_config(arg).loss_net.source == "none":
    raise ValueError("the lambda1 sweep needs a loss network (loss_net=none is L1 only)")
  return [{"loss.lambda1": round(0.1 * i, 2)} for i in range(11)]
