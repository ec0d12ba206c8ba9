"""Source identification pre-training of a 2D UNet (source_identification Sec. 3.3, 5.2).

    jaxmed train --config si --workdir /tmp/si                      # CSI
    jaxmed train --config si:strategy=within,size=small --workdir /tmp/wsi
    jaxmed train --config si:strategy=denoise --workdir /tmp/dsi
    jaxmed train --config si \
        --config.data.root=/data/BraTS2018 --config.data.crop=155,200,200 --workdir ...
    jaxmed sweep --config si --workdir /tmp/si_sweep                # Fig. 5
"""

from jaxmed.methods.si import STRATEGIES
from jaxmed.config import make_small, method_config, parse_arg


def _args(arg: str) -> dict:
  """``strategy=...,size=...`` -> dict, unknown keys and values rejected."""
  args = parse_arg(arg, {"strategy": "cross", "size": ""}, config="si")
  if args["strategy"] not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {args['strategy']!r}")
  return args


def get_config(arg: str = ""):
  """``arg``: comma-separated ``key=value``: ``strategy=cross|within|denoise`` (CSI, the default;
  WSI; DSI) and ``size=small`` for a CPU-sized run."""
  args = _args(arg)
  strategy = args["strategy"]
  # Sec. 5.5.3: SGD, momentum 0.99, lr 1e-2, poly schedule, weight decay 3e-5 (the base
  # config); Sec. 5.2: N = 5, N~ = 3, M~ = 2 (the method's defaults).
  c = method_config("si")
  c.pretext.strategy = strategy
  return make_small(c) if args["size"] == "small" else c


def get_sweep(arg: str = ""):
  """Pool size N x sources per mixture N~ with M~ = 2 mixtures (Fig. 5, Sec. 6.3)."""
  del arg
  return [{"pretext.num_sources": n, "pretext.num_components": k}
          for n, k in ((3, 2), (5, 3), (7, 4))]
