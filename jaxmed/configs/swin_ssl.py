"""Swin-UNETR self-supervised pre-training (Tang et al. 2022; research-contributions
``SwinUNETR/Pretrain``): rotation prediction + contrastive coding + in-painting on the
Swin-UNETR encoder, or one task alone (disruptive_autoencoders Table 4's "Rotation Prediction"
and "Contrastive Coding" rows).

    jaxmed train --config swin_ssl:size=small --workdir runs/swin_ssl                   # all
    jaxmed train --config swin_ssl:tasks=rotation,size=small --workdir runs/rotation    # Table 4
    jaxmed train --config swin_ssl:tasks=contrastive,size=small --workdir runs/contrast # Table 4
    jaxmed train --config seg3d:model=swin_unetr,part=encoder,size=small \\
        --config.init.path=runs/swin_ssl --workdir runs/swin_ssl_ft                      # fine-tune

``arg``: comma-separated ``key=value``:
  tasks: the pretext tasks that are on, joined by "+": "all" (default: rotation + contrastive +
    inpaint, weights 1 / 1 / 1), "rotation", "contrastive", "inpaint" or any other non-empty
    combination ("rotation+contrastive", ...). Every task keeps the same two views (rotations
    and block drops); a task that is off has no head and no loss term.
  token: the bottleneck tokens the rotation and contrastive heads read: "reference" (tokens
    (0, 0, 0) and (1, 0, 0), needs crops with D >= 64) or "mean" (both read the mean token);
    default "reference" at full size, "mean" at ``size=small`` (32^3 crops leave one token).
  size: "small" for a CPU-sized run.

Full size (the reference's ``main.py`` defaults): encoder feature 48, depths (2, 2, 2, 2), heads
(3, 6, 12, 24), window 7, on 96^3 crops (of 128^3 phantoms) of one modality each; batch 4 (2
volumes x 2 crops), AdamW lr 4e-4, wd 0.1, 500 warm-up steps then a cosine to 0, no clipping,
100k steps.

``size=small``: the DAE / SimMIM small run's size (`jaxmed.config.make_small_3d`), so that
Table 4's rows compare at one budget: feature 12, window 4 (16^3 tokens tile into 4^3 windows),
32^3 crops of 64^3 phantoms (12 subjects, 2 validation, 2 test), batch 8, 200 steps with 10 of
warm-up, AdamW 4e-4, wd 0.1, ``heads.token="mean"``. The fine-tuning Swin-UNETR must have the same
encoder fields (`jaxmed.methods.swin_ssl.swin_unetr_fields`): feature 12 and window 4 here.
"""

from jaxmed.config import make_small_3d, method_config, parse_arg
from jaxmed.methods.swin_ssl import TASKS, TOKENS

_ARGS = {"tasks": "all", "token": "", "size": ""}
# main.py: --num_steps 100000; 2 volumes x 2 crops (sw_batch_size) per step.
FULL_STEPS = 100_000
FULL_BATCH = 4


def parse_tasks(value: str) -> tuple[str, ...]:
  """The tasks named by a ``tasks=`` value ("all", "rotation+contrastive", ...), in `TASKS`
  order."""
  names = TASKS if value == "all" else tuple(value.split("+"))
  if not value or any(t not in TASKS for t in names) or len(set(names)) != len(names):
    raise ValueError(f"swin_ssl: tasks must be 'all' or distinct tasks of {TASKS} joined by "
                     f"'+' (e.g. 'rotation+contrastive'); got {value!r}")
  return tuple(t for t in TASKS if t in names)


def get_config(arg: str = ""):
  """``arg``: ``tasks``, ``token``, ``size``."""
  args = parse_arg(arg, _ARGS, config="swin_ssl")
  tasks = parse_tasks(args["tasks"])
  small = args["size"] == "small"
  token = args["token"] or ("mean" if small else "reference")
  if token not in TOKENS:
    raise ValueError(f"swin_ssl: token must be one of {TOKENS}; got {token!r}")
  c = method_config("swin_ssl")
  for task in TASKS:
    c.loss[task] = task in tasks
  c.heads.token = token
  if small:
    make_small_3d(c)
    c.model.update(embed_dim=12, window_size=4)
  else:  # main.py's defaults
    c.update(total_steps=FULL_STEPS, batch_size=FULL_BATCH, log_every=100)
    c.checkpoint.every = 5000
    c.data.shape = (128, 128, 128)
  return c
