"""Disruptive Autoencoders pre-training (disruptive_autoencoders Sec. 2-3): a whole Swin-UNETR
reconstructs single-modality volumes from noise, down-sampling and local masking, with
L1 + alpha L_CMCL (Eq. 5); Table 5's single-disruption rows and Table 6's no-CMCL row.

    jaxmed train --config dae:size=small --workdir runs/dae                       # DAE (all)
    jaxmed train --config dae:disruption=mask,size=small --workdir runs/dae_mask  # Table 5 row
    jaxmed train --config dae:cmcl=off,size=small --workdir runs/dae_nocmcl       # Table 6
    jaxmed sweep --config dae:size=small --workdir runs/dae_sweep                 # Tables 8-10

``arg``: comma-separated ``key=value``:
  disruption: "all" (default: noise, then down- and up-sampling, then local masking), "noise",
    "downsample" or "mask" (local masking alone).
  cmcl: "on" (default; alpha 0.05, temperature 0.07, L2-normalised pooled bottleneck) or "off"
    (L1 only, Table 6).
  size: "small" for a CPU-sized run.

Other choices are fields: ``--config.pretext.resample=nearest`` (the reference code's
interpolation), ``--config.pretext.mask_shared=True`` (one channel subset per step, as the
reference), ``--config.loss.cmcl_form=reference`` (the reference's literal CMCL),
``--config.pretext.noise_variance`` / ``factor`` / ``mask_ratio`` (Tables 8-10: `get_sweep`).

Full size (the paper's, Sec. 3.2): Swin-UNETR feature 48, depths (2, 2, 2, 2), heads
(3, 6, 12, 24), window 7, on 96^3 crops (of 128^3 phantoms; real data: ``--config.data.root``)
of one modality each; AdamW lr 4e-4, wd 1e-5, 500 warm-up steps then a cosine, clip 1.0, 20k
steps at batch 16.

``size=small`` (the notes' recommendation; not tuned): feature 12, window 4 (the 32^3 crop gives
16^3 tokens: windows of 4^3 tile stages 1-3 exactly, where window 7 would pad 16 to 21), 32^3
crops of 64^3 phantoms (12 subjects, 2 validation, 2 test: 8 x 4 = 32 training rows), batch 8,
200 steps with 10 (5%) of warm-up, AdamW 4e-4, wd 1e-5, clip 1.0.
"""

from jaxmed.config import make_small_3d, method_config, parse_arg
from jaxmed.methods._swin_pretrain import FULL_BATCH, FULL_STEPS
from jaxmed.methods.dae import DISRUPTIONS

_ARGS = {"disruption": "all", "cmcl": "on", "size": ""}
# Appendix G: sigma (Table 8), epsilon (Table 9), each with that disruption alone; Table 10's
# masking ratios are lost from the table (the text: 0.4 best, worse as it grows).
SWEEPS = {"noise": ("pretext.noise_variance", (0.05, 0.1, 0.2)),
          "downsample": ("pretext.factor", (2, 4, 8)),
          "mask": ("pretext.mask_ratio", (0.2, 0.4, 0.6, 0.8))}


def swin_pretrain_size(c, small: bool):
  """The run size of a DAE / SimMIM pre-training config (changed in place and returned):
  the paper's (``small=False``) or the CPU-sized run (module docstring)."""
  if small:
    make_small_3d(c)  # 200 steps, 10 of warm-up
    c.model.update(feature_size=12, window_size=4)
  else:
    c.total_steps = FULL_STEPS
    c.batch_size = FULL_BATCH
    c.log_every = 100
    c.checkpoint.every = 2000
  return c


def _parse(arg: str) -> dict:
  args = parse_arg(arg, _ARGS, config="dae")
  if args["disruption"] not in DISRUPTIONS:
    raise ValueError(f"dae: disruption must be one of {tuple(DISRUPTIONS)}; got "
                     f"{args['disruption']!r}")
  if args["cmcl"] not in ("on", "off"):
    raise ValueError(f"dae: cmcl must be 'on' or 'off'; got {args['cmcl']!r}")
  return args


def get_config(arg: str = ""):
  """``arg``: ``disruption``, ``cmcl``, ``size``."""
  args = _parse(arg)
  c = method_config("dae")
  c.pretext.disruption = args["disruption"]
  c.loss.cmcl = args["cmcl"] == "on"
  return swin_pretrain_size(c, args["size"] == "small")


def get_sweep(arg: str = ""):
  """Appendix G's strength sweeps, each with its disruption alone: ``disruption=noise``: sigma
  (Table 8), ``downsample``: epsilon (Table 9), ``mask``: the masking ratio (Table 10);
  ``all`` (default): the three tables' runs together."""
  disruption = _parse(arg)["disruption"]
  tables = SWEEPS if disruption == "all" else {disruption: SWEEPS[disruption]}
  return [{"pretext.disruption": d, field: v}
          for d, (field, values) in tables.items() for v in values]
