"""torchvision VGG-16 state dicts -> :class:`jaxmed.models.vgg.VGG16` variables.

torchvision's ``vgg16`` / ``vgg16_bn`` are ``features`` (an ``nn.Sequential``) and
``classifier``. In ``features`` every conv, ReLU and max-pool takes one index (and with
BatchNorm every BatchNorm too), so the indices of the 13 convs differ between the two:

=========  ==========================================  ==========================================
Flax       ``vgg16``                                   ``vgg16_bn`` (conv ``k``, BatchNorm ``k+1``)
=========  ==========================================  ==========================================
conv1_*    ``features.0``, ``features.2``              ``features.0``, ``features.3``
conv2_*    ``features.5``, ``7``                       ``features.7``, ``10``
conv3_*    ``features.10``, ``12``, ``14``             ``features.14``, ``17``, ``20``
conv4_*    ``features.17``, ``19``, ``21``             ``features.24``, ``27``, ``30``
conv5_*    ``features.24``, ``26``, ``28``             ``features.34``, ``37``, ``40``
fc1..fc3   ``classifier.0``, ``classifier.3``, ``classifier.6`` (both)
=========  ==========================================  ==========================================

The first classifier layer reads the 7x7x512 map flattened in torch's ``(C, H, W)`` order,
which :class:`VGG16` reproduces, so its weight needs only the usual transpose.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from jaxmed.interop.state_dict import Converted, convert, module_rule
from jaxmed.models.vgg import CFG

IGNORE = ("*.num_batches_tracked",)
CLASSIFIER = {"fc1": "classifier.0", "fc2": "classifier.3", "fc3": "classifier.6"}


def vgg16_torch_prefixes(batch_norm: bool) -> dict[str, str]:
  """Flax module name -> torchvision module prefix (``conv3_1`` -> ``features.10``, ...)."""
  out = dict(CLASSIFIER)
  index, block, conv = 0, 1, 1
  for v in CFG:
    if v == "M":
      index += 1
      block, conv = block + 1, 1
      continue
    out[f"conv{block}_{conv}"] = f"features.{index}"
    if batch_norm:
      out[f"bn{block}_{conv}"] = f"features.{index + 1}"
    index += 3 if batch_norm else 2  # conv (+ BatchNorm) + ReLU
    conv += 1
  return out


def vgg16_from_torch(state_dict: Mapping[str, Any], template: Any, *, strict: bool = True,
                     batch_norm: bool | None = None, drop_classifier: bool = False,
                     ignore: Iterable[str] = (),
                     name: str = "VGG16 checkpoint") -> Converted:
  """Converts a torchvision ``vgg16`` / ``vgg16_bn`` state dict to :class:`VGG16` variables.

  Args:
    state_dict: ``{torch key: array}``.
    template: variables of the target model or their shapes (``jax.eval_shape`` of
      ``model.init``).
    strict: missing Flax variables and unused checkpoint keys are errors.
    batch_norm: whether the model (and the checkpoint) has BatchNorm; by default read from the
      template (a ``bn1_1`` module).
    drop_classifier: allow the checkpoint's ``classifier.*`` to stay unused (a full torchvision
      checkpoint loaded into ``VGG16(include_top=False)``); still reported in ``unused``.
    ignore: more ``fnmatch`` patterns of checkpoint keys that may stay unused.
    name: how errors refer to the checkpoint.

  Returns:
    :class:`~jaxmed.interop.state_dict.Converted`.

  Raises:
    ValueError: listing shape mismatches, and when strict missing variables and unused keys
    (a ``vgg16_bn`` checkpoint given to a model without BatchNorm fails so: its conv indices
    differ).
  """
  if batch_norm is None:
    params = template.get("params", {}) if isinstance(template, Mapping) else {}
    batch_norm = "bn1_1" in params
  prefixes = vgg16_torch_prefixes(batch_norm)

  def prefix_of(modules: tuple[str, ...]) -> str | None:
    return prefixes.get(modules[0]) if len(modules) == 1 else None

  patterns = IGNORE + (("classifier.*",) if drop_classifier else ()) + tuple(ignore)
  return convert(state_dict, template, module_rule(prefix_of), strict=strict, ignore=patterns,
                 name=name)
