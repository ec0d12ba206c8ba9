"""torchvision / MONAI ResNet state dicts -> :class:`jaxmed.models.resnet.ResNet` variables.

torchvision's ``torchvision.models.resnet*`` and MONAI's ``monai.networks.nets.ResNet`` use the
same parameter names::

  conv1.weight  bn1.{weight,bias,running_mean,running_var}
  layer{i}.{j}.conv{1,2,3}.weight  layer{i}.{j}.bn{1,2,3}.*
  layer{i}.{j}.downsample.0.{weight,bias}  layer{i}.{j}.downsample.1.*   (shortcut "B")
  fc.{weight,bias}

which map to the Flax paths ``conv1/kernel``, ``bn1/scale`` (``batch_stats/bn1/mean``),
``layer{i}_{j}/conv1/kernel``, ``layer{i}_{j}/downsample_conv/kernel``,
``layer{i}_{j}/downsample_norm/scale``, ``fc/kernel``. BatchNorm ``num_batches_tracked``
counters are ignored. Build the Flax model with the configuration of the checkpoint: for
MONAI's defaults ``conv1_t_stride=1, bias_downsample=True`` (and ``shortcut_type="A"`` for its
resnet18/34 helpers, whose checkpoints then have no ``downsample`` keys); MedicalNet
checkpoints carry a ``module.`` prefix (remove it with
:func:`jaxmed.interop.state_dict.strip_prefix`).

Example::

  model = resnet50(num_classes=None)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  converted = resnet_from_torch(load_state_dict("resnet50.pth"), template, drop_fc=True)
  features = model.apply(converted.variables, x)
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from jaxmed.interop.state_dict import Converted, convert, module_rule

_BLOCK = re.compile(r"^layer([1-4])_(\d+)$")
IGNORE = ("num_batches_tracked", "*.num_batches_tracked")


def resnet_torch_prefix(modules: tuple[str, ...]) -> str | None:
  """torch module prefix of a Flax module path: ``("layer1_0", "downsample_norm")`` ->
  ``"layer1.0.downsample.1"``."""
  if not modules:
    return None
  if len(modules) == 1:
    return modules[0] if modules[0] in ("conv1", "bn1", "fc") else None
  match = _BLOCK.match(modules[0])
  if match is None or len(modules) != 2:
    return None
  block = f"layer{match.group(1)}.{match.group(2)}"
  inner = {"downsample_conv": "downsample.0", "downsample_norm": "downsample.1"}.get(
      modules[1], modules[1])
  return f"{block}.{inner}"


def resnet_from_torch(state_dict: Mapping[str, Any], template: Any, *, strict: bool = True,
                      drop_fc: bool = False, ignore: Iterable[str] = (),
                      name: str = "ResNet checkpoint") -> Converted:
  """Converts a torchvision / MONAI ResNet state dict to :class:`ResNet` variables.

  Args:
    state_dict: ``{torch key: array}`` (e.g. from
      :func:`jaxmed.interop.state_dict.load_state_dict`).
    template: the variables of the target model or their shapes
      (``jax.eval_shape(model.init, key, x)``), with ``params`` and, for BatchNorm,
      ``batch_stats``.
    strict: missing Flax variables and unused checkpoint keys are errors.
    drop_fc: allow the checkpoint's ``fc.weight`` / ``fc.bias`` to stay unused (a classifier
      checkpoint loaded into a model built with ``num_classes=None``); they are still reported
      in ``Converted.unused``.
    ignore: more ``fnmatch`` patterns of checkpoint keys that may stay unused.
    name: how errors refer to the checkpoint.

  Returns:
    :class:`~jaxmed.interop.state_dict.Converted` with ``variables`` for ``model.apply``.

  Raises:
    ValueError: listing every shape mismatch, and when strict every missing variable and
    unused key (an ``fc`` the model has no head for, unless ``drop_fc``).
  """
  patterns = IGNORE + (("fc.weight", "fc.bias") if drop_fc else ()) + tuple(ignore)
  return convert(state_dict, template, module_rule(resnet_torch_prefix), strict=strict,
                 ignore=patterns, name=name)
