"""Training methods; a config names one by ``config.method``."""

from jaxmed.methods.base import Method
from jaxmed.methods.inpainting import InpaintingMethod
from jaxmed.methods.segmentation import SegmentationMethod

METHODS = {m.name: m for m in (InpaintingMethod, SegmentationMethod)}


def get_method(config) -> Method:
  """The method named by ``config.method``, built from ``config``."""
  name = config.method
  if name not in METHODS:
    raise ValueError(f"config.method must be one of {sorted(METHODS)}; got {name!r}")
  return METHODS[name](config)


__all__ = ["METHODS", "Method", "InpaintingMethod", "SegmentationMethod", "get_method"]
