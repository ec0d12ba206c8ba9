"""Pure, jit-compiled metric kernels. Importing this package pulls in nothing heavier than jax."""

from jaxmed.metrics.classification import accuracy, roc_auc, sensitivity_specificity
from jaxmed.metrics.coper import coper_distance, squared_tap_differences
from jaxmed.metrics.image import mae, mse, nmse, psnr, ssim
from jaxmed.metrics.perceptual import ssfd, vgg_perceptual_distance
from jaxmed.metrics.segmentation import dice
from jaxmed.metrics.statistics import (linear_cka, max_normalize, paired_t_test, pearson,
                                       spearman, two_afc_score)
from jaxmed.metrics.surface import (average_surface_distance, distance_transform_edt,
                                    hausdorff_distance, surface_dice)

__all__ = [
    "accuracy",
    "average_surface_distance",
    "coper_distance",
    "dice",
    "distance_transform_edt",
    "hausdorff_distance",
    "linear_cka",
    "mae",
    "max_normalize",
    "mse",
    "nmse",
    "paired_t_test",
    "pearson",
    "psnr",
    "roc_auc",
    "sensitivity_specificity",
    "spearman",
    "squared_tap_differences",
    "ssfd",
    "ssim",
    "surface_dice",
    "two_afc_score",
    "vgg_perceptual_distance",
]
