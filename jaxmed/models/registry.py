"""Model registry: ``build_model(config.model.name, **kwargs)`` builds any jaxmed architecture.

``MODELS`` maps a name to a Flax module class or to a factory function; the keyword arguments
are the module's fields (Flax modules are dataclasses), plus a factory's own arguments::

  unet                 UNet                      jaxmed.models.unet
  ssfd_unet            SSFDUNet                  jaxmed.models.ssfd_unet
  ssfd_encoder         SSFDEncoder               jaxmed.models.ssfd_unet
  resnet               resnet(depth=18|34|50, **ResNet fields except block / layers)
  resnet_custom        ResNet (block and layers given)
  vgg16                VGG16                     jaxmed.models.vgg
  vit                  vit(variant=None | "B/16" | ..., **ViT fields)
  mae                  MaskedAutoencoderViT      jaxmed.models.vit
  mae_encoder          MAEEncoder                jaxmed.models.vit
  swin_unetr           SwinUNETR                 jaxmed.models.swin_unetr
  swin_transformer     SwinTransformer           jaxmed.models.swin_unetr
  pix2pix_generator    UNetGenerator             jaxmed.models.pix2pix
  patchgan             PatchGANDiscriminator     jaxmed.models.pix2pix

Arguments are checked before the module is built: an unknown name or a misspelt / missing
argument is a ``ValueError`` naming the model and listing the valid choices. Config values are
normalised: ``dtype`` / ``param_dtype`` strings ("float32", "bfloat16", "float16") become jnp
dtypes, lists become tuples (recursively), and mapping-like config values become dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxmed.models.pix2pix import PatchGANDiscriminator, UNetGenerator
from jaxmed.models.resnet import CONFIGS as RESNET_DEPTHS
from jaxmed.models.resnet import ResNet, resnet
from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet
from jaxmed.models.swin_unetr import SwinTransformer, SwinUNETR
from jaxmed.models.unet import UNet
from jaxmed.models.vgg import VGG16
from jaxmed.models.vit import VIT_VARIANTS, MAEEncoder, MaskedAutoencoderViT, ViT, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DTYPE_ARGS = ("dtype", "param_dtype")
_NOT_ARGS = ("parent", "name")  # Flax's own dataclass fields


def _factory(model_class: type[nn.Module], fixed: tuple[str, ...] = ()):
  """Marks a registry factory: it builds ``model_class``, setting the fields ``fixed`` itself."""

  def mark(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    fn.model_class = model_class
    fn.fixed_fields = fixed
    return fn

  return mark


@_factory(ResNet, fixed=("block", "layers"))
def resnet_by_depth(depth: int = 18, **kwargs: Any) -> ResNet:
  """ResNet-``depth`` (18, 34 or 50: :func:`jaxmed.models.resnet.resnet`); kwargs are fields."""
  return resnet(depth, **kwargs)


@_factory(ViT)
def vit_by_variant(variant: str | None = None, **kwargs: Any) -> ViT:
  """A :class:`ViT`; ``variant`` ("B/16", ... :data:`VIT_VARIANTS`) sets its size (kwargs win)."""
  return ViT(**kwargs) if variant is None else vit(variant, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "ssfd_unet": SSFDUNet,
    "ssfd_encoder": SSFDEncoder,
    "resnet": resnet_by_depth,
    "resnet_custom": ResNet,
    "vgg16": VGG16,
    "vit": vit_by_variant,
    "mae": MaskedAutoencoderViT,
    "mae_encoder": MAEEncoder,
    "swin_unetr": SwinUNETR,
    "swin_transformer": SwinTransformer,
    "pix2pix_generator": UNetGenerator,
    "patchgan": PatchGANDiscriminator,
}
"""Registered models: name -> Flax module class or factory (see the module docstring)."""


def _arguments(builder: Callable[..., nn.Module]) -> tuple[dict[str, bool], type[nn.Module]]:
  """``({argument: required}, module class)`` of a registry entry."""
  cls = getattr(builder, "model_class", builder)
  args = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_ARGS or f.name in getattr(builder, "fixed_fields", ()):
      continue
    args[f.name] = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
  if builder is not cls:
    for p in inspect.signature(builder).parameters.values():
      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
        args[p.name] = p.default is inspect.Parameter.empty
  return args, cls


def model_defaults(name: str) -> dict[str, Any]:
  """``{argument: default}`` of model ``name``'s optional arguments, as config values (dtypes as
  their names, e.g. ``"float32"``); required arguments are left out."""
  builder = _lookup(name)
  args, cls = _arguments(builder)
  defaults = {f.name: f.default for f in dataclasses.fields(cls)
              if f.name in args and not args[f.name] and f.default is not dataclasses.MISSING}
  if builder is not cls:
    for p in inspect.signature(builder).parameters.values():
      if p.name in args and not args[p.name]:
        defaults[p.name] = p.default
  names = {v: k for k, v in DTYPES.items()}
  for arg in _DTYPE_ARGS:
    if arg in defaults and defaults[arg] in names:
      defaults[arg] = names[defaults[arg]]
  return defaults


def model_arguments(name: str) -> tuple[str, ...]:
  """The keyword arguments :func:`build_model` accepts for model ``name``, sorted."""
  return tuple(sorted(_arguments(_lookup(name))[0]))


def _lookup(name: str) -> Callable[..., nn.Module]:
  if not isinstance(name, str) or name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
  return MODELS[name]


def _normalise(value: Any) -> Any:
  """Lists -> tuples and mapping-like config values -> dicts, recursively."""
  if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _normalise(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_normalise(v) for v in value)
  return value


def _dtype(value: Any, arg: str, model: str) -> Any:
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(f"model {model!r}: {arg} must be one of {sorted(DTYPES)} or a jnp dtype; "
                       f"got {arg}={value!r}")
    return DTYPES[value]
  return value


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """Builds the registered model ``name`` (a key of :data:`MODELS`) from keyword arguments.

  ``build_model("unet", out_channels=3, features=[16, 32], dtype="bfloat16")`` is
  ``UNet(out_channels=3, features=(16, 32), dtype=jnp.bfloat16)``; ``build_model(**config.model)``
  works for a config section holding ``name`` and the model's fields only.

  Raises:
    ValueError: an unknown ``name`` (the message lists the known ones), an argument the model
      does not have (the message names it, suggests the closest valid one and lists them all),
      a missing required argument, or an unknown dtype string.
  """
  builder = _lookup(name)
  args, cls = _arguments(builder)
  unknown = sorted(set(kwargs) - set(args))
  if unknown:
    hints = []
    for arg in unknown:
      close = difflib.get_close_matches(arg, list(args), n=1)
      hints.append(f"{arg!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(f"model {name!r} ({cls.__name__}) has no argument(s) {', '.join(hints)}; "
                     f"valid arguments: {sorted(args)}")
  missing = sorted(a for a, required in args.items() if required and a not in kwargs)
  if missing:
    raise ValueError(f"model {name!r} ({cls.__name__}) needs argument(s) {missing}; "
                     f"valid arguments: {sorted(args)}")
  values = {}
  for arg, value in kwargs.items():
    value = _normalise(value)
    values[arg] = _dtype(value, arg, name) if arg in _DTYPE_ARGS else value
  if name == "vit" and values.get("variant") is not None and values["variant"] not in VIT_VARIANTS:
    raise ValueError(f"model 'vit': unknown variant {values['variant']!r}; known: "
                     f"{sorted(VIT_VARIANTS)}")
  if name == "resnet" and values.get("depth", 18) not in RESNET_DEPTHS:
    raise ValueError(f"model 'resnet': depth must be one of {tuple(RESNET_DEPTHS)}; "
                     f"got depth={values['depth']!r}")
  return builder(**values)
