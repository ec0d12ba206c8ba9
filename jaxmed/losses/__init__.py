"""Pure loss functions."""

from jaxmed.losses.contrastive import (cmcl_loss, global_average_pool, negative_cosine,
                                       nt_xent_loss, simsiam_loss, sinkhorn_knopp, swav_loss)
from jaxmed.losses.edge import edge_loss, sobel_magnitude
from jaxmed.losses.perceptual import coper_loss, network_features, volume_perceptual_loss
from jaxmed.losses.reconstruction import l1_l2_loss, l1_loss, l2_loss
from jaxmed.losses.segmentation import (sigmoid_dice_ce_loss, soft_dice_loss,
                                        softmax_dice_ce_loss)

__all__ = ["cmcl_loss", "coper_loss", "edge_loss", "global_average_pool", "l1_l2_loss",
           "l1_loss", "l2_loss", "negative_cosine", "network_features", "nt_xent_loss", "sigmoid_dice_ce_loss", "simsiam_loss", "sinkhorn_knopp",
           "sobel_magnitude", "soft_dice_loss", "softmax_dice_ce_loss", "swav_loss",
           "volume_perceptual_loss"]
