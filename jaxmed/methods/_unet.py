"""The UNet model section shared by the dense 2D methods."""

from __future__ import annotations

# ``config.model`` of the UNet methods (jaxmed.models.unet.UNet's fields; ``spatial_dims`` and
# ``out_channels`` come from the data).
UNET_MODEL = dict(name="unet", features=(32, 64, 128, 256), norm="instance", num_groups=8,
                  dropout=0.0, downsample="conv", dtype="float32")


def spatial_dims(config) -> int:
  """2 for slice data, 3 for volumes and crops (``config.data.view``)."""
  return 3 if config.data.get("view", "slice") in ("volume", "crop") else 2


class UNetMethod:
  """Mixin of the dense UNet methods (before `Method` in the bases): the model's arguments from
  the data (one output channel per modality, 2D or 3D with ``data.view``) and `features`."""

  def model_arguments(self):
    return {"out_channels": len(self.config.data.modalities),
            "spatial_dims": spatial_dims(self.config)}

  def features(self, variables, image):
    """``(N, F)`` global features of ``image`` ``(N, *spatial, C)``: the spatial mean of the
    UNet's ``bottleneck`` activations, eval mode (the input built as in training, e.g. the
    image repeated over the mixtures for source identification)."""
    _, feats = self.model.apply(variables, self.model_inputs({"image": image}), train=False,
                                return_features=True)
    bottleneck = feats["bottleneck"]
    return bottleneck.mean(axis=tuple(range(1, bottleneck.ndim - 1)))
