"""pix2pix (junyanz/pytorch-CycleGAN-and-pix2pix) checkpoints -> :mod:`jaxmed.models.pix2pix`.

The reference nests its U-Net as ``UnetSkipConnectionBlock`` s: level 0 (outermost) is
``model.model``, level 1 ``model.model.1.model``, and every deeper level appends ``.3.model``.
Inside a level the Sequential indices are

=============  ========================  =====================================
level          down (conv, norm)         up (transposed conv, norm)
=============  ========================  =====================================
outermost 0    ``0``                     ``3`` (with bias, then Tanh)
middle         ``1``, ``2``              ``5``, ``6``
innermost      ``1``                     ``3``, ``4``
=============  ========================  =====================================

and the ``NLayerDiscriminator`` is a flat ``model.{i}`` Sequential (conv ``0``, then conv / norm
at ``2 + 3 (n - 1)`` / ``3 + 3 (n - 1)``). Checkpoints are saved as ``latest_net_G.pth`` /
``latest_net_D.pth``: plain state dicts (``module.`` prefixed when saved from DataParallel).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from jaxmed.interop.state_dict import (Converted, convert, default_torch_name,
                                       flax_conv_transpose_kernel)

IGNORE = ("*num_batches_tracked",)


def _level_prefix(k: int) -> str:
  """The Sequential of U-Net level k."""
  return "model.model" + (".1.model" if k >= 1 else "") + ".3.model" * max(k - 1, 0)


def _num_downs(template: Any) -> int:
  params = template.get("params", {}) if isinstance(template, Mapping) else {}
  downs = [name for name in params if name.startswith("down_")]
  if not downs:
    raise ValueError("template has no down_{k} modules; is it a pix2pix UNetGenerator's?")
  return len(downs)


def generator_torch_key(path: tuple[str, ...], num_downs: int):
  """Torch key (and transform) of a :class:`UNetGenerator` variable path."""
  kind, k = path[1].split("_")
  k = int(k)
  part = path[2]
  if k == 0:
    index = {"down": 0, "up": 3}[kind]
  elif k == num_downs - 1:
    index = {("down", "conv"): 1, ("up", "conv"): 3, ("up", "norm"): 4}.get((kind, part))
  else:
    index = {"conv": 1, "norm": 2}[part] if kind == "down" else {"conv": 5, "norm": 6}[part]
  if index is None:
    return None
  key = f"{_level_prefix(k)}.{index}.{default_torch_name(path[-1])}"
  if kind == "up" and path[-1] == "kernel":
    return key, flax_conv_transpose_kernel
  return key


def discriminator_torch_key(path: tuple[str, ...]) -> str:
  """Torch key of a :class:`PatchGANDiscriminator` variable path."""
  kind, i = path[1].split("_")
  i = int(i)
  index = 0 if (kind == "conv" and i == 0) else 2 + 3 * (i - 1) + (kind == "norm")
  return f"model.{index}.{default_torch_name(path[-1])}"


def unet_generator_from_torch(state_dict: Mapping[str, Any], template: Any, *,
                              strict: bool = True, ignore: Iterable[str] = (),
                              name: str = "pix2pix generator checkpoint") -> Converted:
  """Converts a pix2pix ``UnetGenerator`` state dict to :class:`UNetGenerator` variables.

  Args:
    state_dict: ``{torch key: array}`` (strip a ``module.`` prefix first).
    template: the generator's variables or their shapes (``jax.eval_shape(model.init, ...)``);
      ``num_downs`` is read from it.
    strict, ignore, name: as :func:`jaxmed.interop.state_dict.convert`.
  """
  num_downs = _num_downs(template)
  return convert(state_dict, template, lambda p: generator_torch_key(p, num_downs),
                 strict=strict, ignore=IGNORE + tuple(ignore), name=name)


def patchgan_from_torch(state_dict: Mapping[str, Any], template: Any, *, strict: bool = True,
                        ignore: Iterable[str] = (),
                        name: str = "pix2pix discriminator checkpoint") -> Converted:
  """Converts a pix2pix ``NLayerDiscriminator`` state dict to :class:`PatchGANDiscriminator`."""
  return convert(state_dict, template, discriminator_torch_key, strict=strict,
                 ignore=IGNORE + tuple(ignore), name=name)
