"""PyTorch checkpoints -> Flax variables, checked key by key and shape by shape.

``load_state_dict(path)`` reads ``.pth`` / ``.pt`` (with torch) or ``.safetensors`` (without);
each ``*_from_torch(state_dict, template)`` maps one architecture's keys onto the variables of
the matching :mod:`jaxmed.models` module and returns :class:`Converted` (variables, missing,
unused). A missing key, a left-over key or a wrong shape is an error that lists them all.
"""

from jaxmed.interop.lpips import load_lpips_lin, lpips_lin_from_torch
from jaxmed.interop.pix2pix import patchgan_from_torch, unet_generator_from_torch
from jaxmed.interop.resnet import resnet_from_torch
from jaxmed.interop.ssfd import load_ssfd_unet, ssfd_unet_from_torch
from jaxmed.interop.state_dict import Converted, convert, load_state_dict, strip_prefix
from jaxmed.interop.swin_unetr import load_swin_unetr, swin_unetr_from_torch
from jaxmed.interop.vgg import vgg16_from_torch
from jaxmed.interop.vit import mae_from_torch, vit_from_torch

__all__ = [
    "Converted",
    "convert",
    "load_lpips_lin",
    "load_ssfd_unet",
    "load_state_dict",
    "load_swin_unetr",
    "lpips_lin_from_torch",
    "mae_from_torch",
    "patchgan_from_torch",
    "resnet_from_torch",
    "ssfd_unet_from_torch",
    "strip_prefix",
    "swin_unetr_from_torch",
    "unet_generator_from_torch",
    "vgg16_from_torch",
    "vit_from_torch",
]
