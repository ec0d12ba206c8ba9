"""Backbones as Flax Linen modules, channels-last, with named intermediate features.

Each module's ``__call__(x, *, train=False, return_features=False)`` returns its output, or
``(output, {name: feature})`` with the stable tap names its docstring lists. Shared layers live
in :mod:`jaxmed.models.blocks`; :func:`build_model` builds any registered model by name (see
:mod:`jaxmed.models.registry`). PyTorch weights load through :mod:`jaxmed.interop`.
"""

from jaxmed.models.pix2pix import PatchGANDiscriminator, UNetGenerator
from jaxmed.models.registry import MODELS, build_model, model_arguments
from jaxmed.models.resnet import ResNet, resnet, resnet18, resnet34, resnet50
from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet
from jaxmed.models.swin_unetr import SwinTransformer, SwinUNETR
from jaxmed.models.unet import UNet
from jaxmed.models.vgg import VGG16
from jaxmed.models.vit import (VIT_VARIANTS, MAEDecoder, MAEEncoder, MaskedAutoencoderViT, ViT,
                               grid_to_tokens, patchify, tokens_to_grid, unpatchify, vit)

__all__ = [
    "MAEDecoder",
    "MAEEncoder",
    "MODELS",
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
    "build_model",
    "grid_to_tokens",
    "model_arguments",
    "patchify",
    "resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "tokens_to_grid",
    "unpatchify",
    "vit",
]
