"""Backbones as Flax Linen modules, channels-last, with named intermediate features.

Each module's ``__call__(x, *, train=False, return_features=False)`` returns its output, or
``(output, {name: feature})`` with the stable tap names its docstring lists. PyTorch weights
load through :mod:`jaxmed.interop`.
"""

from jaxmed.models.pix2pix import PatchGANDiscriminator, UNetGenerator
from jaxmed.models.resnet import ResNet, resnet, resnet18, resnet34, resnet50
from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet
from jaxmed.models.swin_unetr import SwinTransformer, SwinUNETR
from jaxmed.models.unet import UNet
from jaxmed.models.vgg import VGG16
from jaxmed.models.vit import (VIT_VARIANTS, MAEDecoder, MAEEncoder, MaskedAutoencoderViT, ViT,
                               grid_to_tokens, patchify, random_masking, tokens_to_grid,
                               unpatchify, vit)

__all__ = [
    "MAEDecoder",
    "MAEEncoder",
    "MaskedAutoencoderViT",
    "PatchGANDiscriminator",
    "ResNet",
    "SSFDEncoder",
    "SSFDUNet",
    "SwinTransformer",
    "SwinUNETR",
    "UNet",
    "UNetGenerator",
    "VGG16",
    "VIT_VARIANTS",
    "ViT",
    "grid_to_tokens",
    "patchify",
    "random_masking",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "tokens_to_grid",
    "unpatchify",
    "vit",
]
