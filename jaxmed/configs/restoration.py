"""Restoration pre-training of a 2D UNet, the Models Genesis baselines of source_identification
Sec. 4: in-painting (Eq. 8), local pixel shuffling (Eq. 9), super-resolution (Eq. 10) and
non-linear intensity shift (Eq. 11), under the L1 + L2 loss (Eq. 4).

    jaxmed train --config restoration --workdir /tmp/inpaint
    jaxmed train --config restoration:corruption=local_shuffle,size=small --workdir /tmp/shuffle
    jaxmed train --config restoration:corruption=intensity \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,200,200 --workdir ...
    jaxmed sweep --config restoration:corruption=super_resolution --workdir ...

``arg``: comma-separated ``key=value``: ``corruption`` (inpaint, local_shuffle,
super_resolution, intensity; default inpaint) and ``size=small`` for a CPU-sized run. The
optimiser (SGD, momentum 0.99, lr 1e-2, poly decay, weight decay 3e-5; Sec. 5.5.3) comes from
the base config. Phantoms by default; a NIfTI folder when ``--config.data.root`` is given.
"""

from jaxmed.methods.restoration import CORRUPTIONS
from jaxmed.config import make_small, method_config, parse_arg

_ARGS = {"corruption": "inpaint", "size": ""}
# Sec. 5.3: grid sizes tuned from [2, 2] to [64, 64] for in-painting, local pixel shuffling and
# super-resolution; in-painting's masked percentage too; nothing to tune for intensity shift.
SWEEP_GRIDS = (2, 4, 8, 16, 32, 64)
SWEEP_KEEP_PROBS = (0.25, 0.5, 0.75)


def _parse(arg: str) -> dict:
  args = parse_arg(arg, _ARGS, config="restoration")
  if args["corruption"] not in CORRUPTIONS:
    raise ValueError(f"pretext.corruption must be one of {sorted(CORRUPTIONS)}; "
                     f"got {args['corruption']!r}")
  return args


def get_config(arg: str = ""):
  """``arg``: ``corruption=<name>`` and/or ``size=small``."""
  args = _parse(arg)
  c = method_config("restoration")  # grid 8, keep_prob 0.75, shuffle_prob 0.5, invert_prob 0
  c.pretext.corruption = args["corruption"]
  return make_small(c) if args["size"] == "small" else c


def get_sweep(arg: str = ""):
  """The Sec. 5.3 tuning grid of the chosen corruption."""
  corruption = _parse(arg)["corruption"]
  if corruption == "inpaint":
    return [{"pretext.grid": g, "pretext.keep_prob": p}
            for g in SWEEP_GRIDS for p in SWEEP_KEEP_PROBS]
  if corruption in ("local_shuffle", "super_resolution"):
    return [{"pretext.grid": g} for g in SWEEP_GRIDS]
  return [{}]  # intensity: no hyper-parameter tuned in the paper; one run
