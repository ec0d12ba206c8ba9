"""XLA:CPU flags jaxmed sets when it is imported.

``--xla_cpu_experimental_ynn_fusion_type=individual_dot`` (YNNPACK for matrix products only):
jaxlib 0.10 also hands convolutions, reductions and element-wise fusions on CPU to YNNPACK by
default. On this project's 2-core CPU those made every convolutional step slower than XLA's
own emitters. Gradients, jaxlib defaults -> this flag (medians of 3, two alternating runs each;
``experiments/benchmarks/``): the demo UNet 95-101 -> 55-57 ms, Swin-UNETR (feature 24, 64^3)
5.8-6.7 -> 3.7-4.4 s, the 3D MAE 1.32-1.40 -> 1.20-1.23 s, ResNet-50 0.39-0.47 -> 0.36-0.37 s. No YNNPACK
fusion at all was slower for the MAE (1.37-1.47 s).

XLA reads ``XLA_FLAGS`` once, when the first JAX backend starts, so import jaxmed before any JAX
computation runs. A flag already in ``XLA_FLAGS`` is left as the user set it (e.g.
``--xla_cpu_experimental_ynn_fusion_type=`` turns YNNPACK off);
``JAXMED_XLA_DEFAULTS=off`` sets nothing. Only ``xla_cpu_*`` flags: GPU and TPU are unaffected.
Set only with jaxlib >= 0.10 (the release measured; an older XLA aborts on a flag it does not
know).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)
MIN_JAXLIB = (0, 10)


def jaxlib_version() -> tuple[int, int] | None:
  """(major, minor) of the installed jaxlib, or None when it is not installed or unreadable."""
  try:
    match = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("jaxlib"))
  except importlib.metadata.PackageNotFoundError:
    return None
  return (int(match.group(1)), int(match.group(2))) if match else None


def with_cpu_defaults(xla_flags: str) -> str:
  """``xla_flags`` plus each of :data:`CPU_FLAGS` whose name it does not already set."""
  out = xla_flags.split()
  names = {f.split("=", 1)[0] for f in out}
  out += [f for f in CPU_FLAGS if f.split("=", 1)[0] not in names]
  return " ".join(out)


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ,
                       version: tuple[int, int] | None = None) -> None:
  """Adds :data:`CPU_FLAGS` to ``environ["XLA_FLAGS"]`` unless ``JAXMED_XLA_DEFAULTS=off`` or
  jaxlib (``version``, default: the installed one) is older than :data:`MIN_JAXLIB`."""
  setting = environ.get("JAXMED_XLA_DEFAULTS", "on").lower()
  if setting not in ("on", "off"):
    raise ValueError(f"JAXMED_XLA_DEFAULTS must be 'on' or 'off'; got {setting!r}")
  version = jaxlib_version() if version is None else version
  if setting == "on" and version is not None and version >= MIN_JAXLIB:
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
