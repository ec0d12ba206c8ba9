"""SSFD checkpoints (meddlr ``SSFD_Encoder`` layout) -> :mod:`jaxmed.models.ssfd_unet` variables.

PyTorch key layout (meddlr ``meddlr/metrics/ssfd.py``, whose ``SSFD`` metric loads the published
checkpoint ``huggingface.co/philadamson93/SSFD`` ``model.ckpt`` with a strict
``SSFD_Encoder.load_state_dict(torch.load(...))``, so that file holds exactly these keys)::

  firstblock.{conv1,conv2}.{weight,bias}, firstblock.GN.{weight,bias}          <- block1
  encoder{j}.conv_block.{conv1,conv2,GN}.{weight,bias}, j = 1..L                <- block{j+1}

and, for a full in-painting UNet (:class:`jaxmed.models.ssfd_unet.SSFDUNet`, whose decoder is
not part of the public checkpoint; this is the layout its torch counterpart uses)::

  decoder{k}.up.{weight,bias}                     ConvTranspose2d(k=2, s=2) <- decoder{k}/up
  decoder{k}.conv_block.{conv1,conv2,GN}.*        DoubleConv                <- decoder{k}/conv_block
  outconv.{weight,bias}                           1x1 Conv2d                <- output_conv

The template may be an :class:`SSFDUNet` (encoder under ``encoder``) or an :class:`SSFDEncoder`
(blocks at the top level, possibly truncated by ``last_tap``). Filling an encoder template from a
full-UNet checkpoint leaves decoder keys unused: pass ``encoder_only=True`` to allow that (they
are still reported in :attr:`Converted.unused`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from jaxmed.interop.state_dict import (Converted, conv_transpose_kernel, convert,
                                       default_torch_name, load_state_dict, strip_prefix)

# Prefixes that training wrappers put in front of the keys (DataParallel, Lightning, meddlr's
# ``SSFD.net``); removed by :func:`load_ssfd_unet`.
DEFAULT_STRIP = ("module.", "model.", "net.")
_BLOCK = re.compile(r"^block([1-9][0-9]*)$")
_DECODER = re.compile(r"^decoder([1-9][0-9]*)$")


def _block_prefix(name: str) -> str | None:
  match = _BLOCK.match(name)
  if match is None:
    return None
  k = int(match.group(1))
  return "firstblock" if k == 1 else f"encoder{k - 1}.conv_block"


def _leaf_name(module: str, leaf: str) -> str:
  """Torch name of a DoubleConv leaf: ``norm`` is meddlr's ``GN``, convs keep their names."""
  return f"{'GN' if module == 'norm' else module}.{default_torch_name(leaf)}"


def _rule(path: tuple[str, ...]):
  """Flax path ``(collection, *modules, leaf)`` -> torch key (or ``(key, transform)``)."""
  modules, leaf = list(path[1:-1]), path[-1]
  if modules and modules[0] == "encoder":
    modules = modules[1:]
  if len(modules) == 2 and _block_prefix(modules[0]) is not None:
    return f"{_block_prefix(modules[0])}.{_leaf_name(modules[1], leaf)}"
  if modules and _DECODER.match(modules[0]):
    if modules[1:] == ["up"]:
      key = f"{modules[0]}.up.{default_torch_name(leaf)}"
      return (key, conv_transpose_kernel) if leaf == "kernel" else key
    if len(modules) == 3 and modules[1] == "conv_block":
      return f"{modules[0]}.conv_block.{_leaf_name(modules[2], leaf)}"
  if modules == ["output_conv"]:
    return f"outconv.{default_torch_name(leaf)}"
  return None


def _template_kind(template: Any) -> tuple[str, int]:
  """``("unet" | "encoder", number of encoder blocks)``; a ValueError for anything else."""
  params = template.get("params") if isinstance(template, Mapping) else None
  if not isinstance(params, Mapping):
    raise ValueError("template must be Flax variables {'params': ...} of an SSFDUNet or "
                     f"SSFDEncoder (e.g. jax.eval_shape(model.init, ...)); got {type(template)}")
  if "encoder" in params:
    kind, blocks = "unet", params["encoder"]
  else:
    kind, blocks = "encoder", params
  numbers = sorted(int(m.group(1)) for m in map(_BLOCK.match, blocks) if m)
  if not numbers or numbers != list(range(1, len(numbers) + 1)):
    raise ValueError("template is not an SSFDUNet or SSFDEncoder: expected param modules "
                     f"'encoder' or 'block1'..'blockK'; got {sorted(params)}")
  return kind, len(numbers)


def ssfd_unet_from_torch(state_dict: Mapping[str, Any], template: Any, *, strict: bool = True,
                         encoder_only: bool = False, ignore: Iterable[str] = (),
                         name: str = "checkpoint") -> Converted:
  """Converts a meddlr-layout SSFD state dict into SSFDUNet / SSFDEncoder variables.

  Args:
    state_dict: ``{torch key: array}`` in the layout of the module docstring (strip wrapper
      prefixes first, e.g. with :func:`jaxmed.interop.state_dict.strip_prefix`).
    template: variables (or their ``jax.eval_shape``) of an :class:`SSFDUNet` or an
      :class:`SSFDEncoder`; defines which keys are needed and their shapes.
    strict: missing variables and unused keys (outside ``ignore``) are errors.
    encoder_only: the template is an :class:`SSFDEncoder` and the checkpoint may hold more
      (a full UNet's ``decoder*`` / ``outconv.*`` keys, and encoder levels deeper than a
      ``last_tap``-truncated template): those keys may stay unused. Not allowed with an
      SSFDUNet template.
    ignore: further ``fnmatch`` patterns of keys that may stay unused.
    name: how errors refer to the checkpoint.

  Returns:
    :class:`jaxmed.interop.state_dict.Converted` (``unused`` lists every key left over).

  Raises:
    ValueError: a template that is no SSFD model, ``encoder_only`` with an SSFDUNet template,
    shape mismatches, and (when strict) missing variables or unexpected keys, each listed.
  """
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"state_dict must be a mapping of torch keys to arrays; got "
                     f"{type(state_dict).__name__}")
  kind, num_blocks = _template_kind(template)
  ignore = list(ignore)
  if encoder_only:
    if kind != "encoder":
      raise ValueError("encoder_only=True needs an SSFDEncoder template (blocks at the top "
                       "level); got an SSFDUNet template (it has an 'encoder' submodule)")
    ignore += ["decoder*", "outconv.*"]
    deepest = {int(m.group(1)) for m in (re.match(r"^encoder([0-9]+)\.", str(k))
                                         for k in state_dict) if m}
    ignore += [f"encoder{j}.*" for j in sorted(deepest) if j >= num_blocks]
  return convert(state_dict, template, _rule, strict=strict, ignore=ignore, name=name)


def _template_from_module(model: Any, in_channels: int) -> Any:
  from jaxmed.models.ssfd_unet import SSFDEncoder, SSFDUNet
  if not isinstance(model, (SSFDEncoder, SSFDUNet)):
    raise ValueError(f"model must be an SSFDEncoder or SSFDUNet; got {type(model).__name__}")
  if in_channels < 1:
    raise ValueError(f"in_channels must be >= 1; got in_channels={in_channels}")
  size = 2**model.num_pool_layers
  x = jax.ShapeDtypeStruct((1,) + (size,) * model.spatial_dims + (in_channels,), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def load_ssfd_unet(path: str | os.PathLike, template: Any = None, *, model: Any = None,
                   in_channels: int = 1, key: str | None = None, strict: bool = True,
                   encoder_only: bool = False, ignore: Iterable[str] = (),
                   strip: Iterable[str] = DEFAULT_STRIP) -> Converted:
  """Reads an SSFD checkpoint file and converts it (see :func:`ssfd_unet_from_torch`).

  Args:
    path: ``.pth`` / ``.pt`` / ``.ckpt`` (needs torch) or ``.safetensors``; e.g. meddlr's
      ``model.ckpt`` from ``huggingface.co/philadamson93/SSFD``.
    template: variables (or shapes) of an SSFDUNet / SSFDEncoder. When None, built with
      ``jax.eval_shape`` from ``model`` (default: ``SSFDEncoder()``, the published 20..320
      encoder) for ``in_channels`` input channels.
    model: the module to build the template from when ``template`` is None.
    in_channels: input channels of the template built from ``model`` (1 in SSFD).
    key: the entry of a checkpoint dict holding the weights (see
      :func:`jaxmed.interop.state_dict.load_state_dict`).
    strict, encoder_only, ignore: as in :func:`ssfd_unet_from_torch`.
    strip: key prefixes removed first (``module.``, ``model.``, ``net.``).

  Returns:
    :class:`jaxmed.interop.state_dict.Converted`.
  """
  if template is not None and model is not None:
    raise ValueError("pass either template or model, not both")
  if template is None:
    if model is None:
      from jaxmed.models.ssfd_unet import SSFDEncoder
      model = SSFDEncoder()
    template = _template_from_module(model, in_channels)
  if isinstance(strip, str):
    raise ValueError(f"strip must be a sequence of prefixes, not a string; got {strip!r}")
  state_dict = strip_prefix(load_state_dict(path, key=key), strip)
  return ssfd_unet_from_torch(state_dict, template, strict=strict, encoder_only=encoder_only,
                              ignore=ignore, name=repr(os.fspath(path)))
