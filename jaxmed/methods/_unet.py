"""The 2D UNet every dense method builds from ``config.model``."""

from __future__ import annotations

from jaxmed.methods.base import compute_dtype
from jaxmed.models.unet import UNet


def build_unet(model_cfg, out_channels: int) -> UNet:
  """A UNet from ``config.model`` (features, norm, num_groups, dropout, downsample, dtype)."""
  return UNet(out_channels=out_channels, features=tuple(model_cfg.features),
              spatial_dims=2, norm=model_cfg.get("norm", "instance"),
              num_groups=int(model_cfg.get("num_groups", 8)),
              dropout=float(model_cfg.get("dropout", 0.0)),
              downsample=model_cfg.get("downsample", "conv"),
              dtype=compute_dtype(model_cfg.get("dtype", "float32")))
