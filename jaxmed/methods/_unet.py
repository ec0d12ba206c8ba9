"""The model section and helpers shared by the dense (UNet-like) methods: a UNet by default, or
any registered dense network with ``out_channels`` and ``spatial_dims`` (e.g. Swin-UNETR, via
`jaxmed.config.set_model`)."""

from __future__ import annotations

# ``config.model`` of the UNet methods (jaxmed.models.unet.UNet's fields; ``spatial_dims`` and
# ``out_channels`` come from the data).
UNET_MODEL = dict(name="unet", features=(32, 64, 128, 256), norm="instance", num_groups=8,
                  dropout=0.0, downsample="conv", dtype="float32")


# The ``return_features`` entry of each dense backbone that `UNetMethod.features` pools.
BOTTLENECK = {"unet": "bottleneck", "swin_unetr": "encoder10"}


def spatial_dims(config) -> int:
  """2 for slice data, 3 for volumes and crops (``config.data.view``)."""
  return 3 if config.data.get("view", "slice") in ("volume", "crop") else 2


class UNetMethod:
  """Mixin of the dense UNet methods (before `Method` in the bases): the model's arguments from
  the data (one output channel per modality, 2D or 3D with ``data.view``) and `features`."""

  derived_model_fields = ("out_channels", "spatial_dims")

  def model_arguments(self):
    return {"out_channels": len(self.config.data.modalities),
            "spatial_dims": spatial_dims(self.config)}

  def features(self, variables, image):
    """``(N, F)`` global features of ``image`` ``(N, *spatial, C)``: the spatial mean of the
    network's bottleneck activations (`BOTTLENECK`: the UNet's ``bottleneck``, Swin-UNETR's
    ``encoder10``), eval mode (the input built as in training, e.g. the image repeated over the
    mixtures for source identification)."""
    name = self.config.model.name
    if name not in BOTTLENECK:
      raise ValueError(f"features: no bottleneck known for model {name!r}; known: "
                       f"{sorted(BOTTLENECK)}")
    _, feats = self.model.apply(variables, self.model_inputs({"image": image}), train=False,
                                return_features=True)
    bottleneck = feats[BOTTLENECK[name]]
    return bottleneck.mean(axis=tuple(range(1, bottleneck.ndim - 1)))
