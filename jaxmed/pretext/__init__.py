"""Pretext transforms: pure functions of a key and a batch, usable inside `jit`."""

from jaxmed.pretext.disruptions import (add_noise, apply_channel_mask, disrupt,
                                        downsample_upsample, local_channel_mask)
from jaxmed.pretext.inpaint import grid_cell_mask, grid_inpaint
from jaxmed.pretext.masking import channel_masking, mae_forward, random_masking, restore_ids
from jaxmed.pretext.views import multi_crop, random_resized_crop, two_views

__all__ = ["add_noise", "apply_channel_mask", "channel_masking", "disrupt", "downsample_upsample",
           "grid_cell_mask", "grid_inpaint", "local_channel_mask", "mae_forward", "multi_crop",
           "random_masking", "random_resized_crop", "restore_ids", "two_views"]
