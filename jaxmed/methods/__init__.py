"""Training methods; a config names one by ``config.method``."""

from jaxmed.methods.base import Method
from jaxmed.methods.context_prediction import ContextPredictionMethod
from jaxmed.methods.coper_synthesis import CoPerSynthesisMethod
from jaxmed.methods.dae import DAEMethod
from jaxmed.methods.reconstruction import ReconstructionMethod
from jaxmed.methods.restoration import RestorationMethod
from jaxmed.methods.segmentation import SegmentationMethod
from jaxmed.methods.si import SourceIdentificationMethod
from jaxmed.methods.simmim import SimMIMMethod
from jaxmed.methods.simsiam import SimSiamMethod
from jaxmed.methods.swav import SwAVMethod
from jaxmed.methods.swin_ssl import SwinSSLMethod
from jaxmed.methods.vit_ae_pp import ViTAEPlusPlusMethod

METHODS = {m.name: m for m in (ContextPredictionMethod, CoPerSynthesisMethod,
                               ReconstructionMethod, RestorationMethod,
                               SegmentationMethod, SourceIdentificationMethod,
                               SimSiamMethod, SwAVMethod, ViTAEPlusPlusMethod,
                               DAEMethod, SimMIMMethod, SwinSSLMethod)}


def get_method(config) -> Method:
  """The `Method` named by ``config.method``."""
  name = config.method
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
  return METHODS[name](config)


__all__ = ["METHODS", "Method", "CoPerSynthesisMethod", "ContextPredictionMethod",
           "ReconstructionMethod", "RestorationMethod", "SegmentationMethod", "SimSiamMethod",
           "SourceIdentificationMethod", "SwAVMethod", "ViTAEPlusPlusMethod", "DAEMethod",
           "SimMIMMethod", "SwinSSLMethod", "get_method"]
