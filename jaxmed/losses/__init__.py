"""Pure loss functions."""

from jaxmed.losses.reconstruction import l1_l2_loss, l1_loss, l2_loss
from jaxmed.losses.segmentation import (sigmoid_dice_ce_loss, soft_dice_loss,
                                        softmax_dice_ce_loss)

__all__ = ["l1_l2_loss", "l1_loss", "l2_loss", "sigmoid_dice_ce_loss", "soft_dice_loss",
           "softmax_dice_ce_loss"]
