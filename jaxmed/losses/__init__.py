"""Pure loss functions."""

from jaxmed.losses.contrastive import negative_cosine, simsiam_loss, sinkhorn_knopp, swav_loss
from jaxmed.losses.perceptual import coper_loss, network_features
from jaxmed.losses.reconstruction import l1_l2_loss, l1_loss, l2_loss
from jaxmed.losses.segmentation import (sigmoid_dice_ce_loss, soft_dice_loss,
                                        softmax_dice_ce_loss)

__all__ = ["coper_loss", "l1_l2_loss", "l1_loss", "l2_loss", "negative_cosine", "network_features",
           "sigmoid_dice_ce_loss", "simsiam_loss", "sinkhorn_knopp", "soft_dice_loss",
           "softmax_dice_ce_loss", "swav_loss"]
