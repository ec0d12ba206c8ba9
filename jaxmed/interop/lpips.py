"""LPIPS "lin" weights (richzhang/PerceptualSimilarity) -> per-tap channel weights for VGG-16.

LPIPS weighs the squared difference of unit-normalised VGG-16 features channel by channel with a
1x1 conv without bias per tap (``NetLinLayer``). The ``lpips`` wheel ships them as
``lpips/weights/v0.1/vgg.pth``: five tensors ``lin{k}.model.1.weight`` of shape ``(1, C, 1, 1)``
(index 1 because ``model`` is ``Sequential(Dropout, Conv2d)``; a layer built without dropout
names it ``lin{k}.model.0.weight``, also accepted), for the taps relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3 with C = 64, 128, 256, 512, 512.

The same package publishes lin weights for AlexNet (``alex.pth``, C = 64, 192, 384, 256, 256)
and SqueezeNet (``squeeze.pth``, 7 taps); jaxmed has only the VGG-16 trunk, so only ``vgg.pth``
is supported and the others are rejected with a message saying so.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from jaxmed.interop.state_dict import to_numpy, load_state_dict
from jaxmed.models.vgg import LPIPS_TAPS

LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_ALEX_CHANNELS = (64, 192, 384, 256, 256)
_LIN_KEY = re.compile(r"^lin(\d+)\.model\.([01])\.weight$")


def lpips_lin_from_torch(state_dict: Mapping[str, Any], *, strict: bool = True,
                         name: str = "LPIPS lin weights") -> dict[str, np.ndarray]:
  """The VGG-16 LPIPS lin weights as ``{tap: (C,) float32}``.

  Args:
    state_dict: ``{key: array}`` holding ``lin0.model.1.weight`` .. ``lin4.model.1.weight``
      (``(1, C, 1, 1)``; ``lin{k}.model.0.weight`` is accepted too).
    strict: other keys are an error; when False they are ignored (e.g. the ``net.*`` and
      ``scaling_layer.*`` entries of a whole saved ``lpips.LPIPS`` module).
    name: how errors refer to the weights (e.g. the file path).

  Returns:
    ``{"relu1_2": (64,), "relu2_2": (128,), "relu3_3": (256,), "relu4_3": (512,),
    "relu5_3": (512,)}`` as float32 NumPy arrays, in that order.

  Raises:
    ValueError: naming every missing, duplicated, mis-shaped or (when strict) unexpected key;
    AlexNet / SqueezeNet lin weights are recognised and rejected.
  """
  state = {str(k): v for k, v in state_dict.items()}
  found: dict[int, list[str]] = {}
  extra = []
  for key in state:
    match = _LIN_KEY.match(key)
    if match is None:
      extra.append(key)
    else:
      found.setdefault(int(match.group(1)), []).append(key)

  shapes = {k: tuple(np.shape(to_numpy(state[keys[0]]))) for k, keys in found.items()}
  channels = tuple(shapes.get(k, (0, 0))[1] if len(shapes.get(k, ())) == 4 else None
                   for k in range(5))
  if sorted(found) == list(range(7)) or channels == _ALEX_CHANNELS:
    net = "squeeze" if len(found) == 7 else "alex"
    raise ValueError(f"cannot load {name}: these are the LPIPS lin weights of {net!r}; only "
                     "the VGG-16 ones (lpips/weights/v0.1/vgg.pth) are supported")

  problems = []
  out = {}
  for k, (tap, c) in enumerate(zip(LPIPS_TAPS, LPIPS_CHANNELS)):
    keys = found.get(k, [])
    if not keys:
      problems.append(f"missing lin{k}.model.1.weight ({tap}, shape (1, {c}, 1, 1))")
      continue
    if len(keys) > 1:
      problems.append(f"both {' and '.join(sorted(keys))} given for {tap}")
      continue
    value = to_numpy(state[keys[0]])
    if value.shape != (1, c, 1, 1):
      problems.append(f"{keys[0]} has shape {tuple(value.shape)}, expected (1, {c}, 1, 1) "
                      f"for {tap}")
      continue
    out[tap] = np.asarray(value, np.float32).reshape(c)
  unexpected = [key for k, keys in found.items() if k >= 5 for key in keys]
  if strict:
    unexpected += extra
  if unexpected:
    problems.append(f"unexpected key(s) {sorted(unexpected)[:30]}")
  if problems:
    raise ValueError(f"cannot load {name}: " + "; ".join(problems))
  return out


def load_lpips_lin(path: str | os.PathLike, *, strict: bool = True) -> dict[str, np.ndarray]:
  """Reads the VGG-16 LPIPS lin weights from ``vgg.pth`` (or a ``.safetensors`` copy).

  Returns ``{tap: (C,) float32}`` as :func:`lpips_lin_from_torch`; errors name ``path``.
  """
  path = os.fspath(path)
  return lpips_lin_from_torch(load_state_dict(path), strict=strict, name=repr(path))
