"""XLA:CPU flags jaxmed sets when it is imported.

``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` (jaxlib's YNNPACK fusions
less its convolutions): jaxlib 0.10 hands convolutions to YNNPACK by default, which was slower
than XLA's own convolutions for every convolutional network here. Measured on this project's
2-core CPU (``experiments/benchmarks/``), jaxlib defaults -> this flag: the demo UNet's gradient
95-101 -> 50 ms (with ``blocks.GroupStatsNorm``); a small Swin-UNETR gradient (feature 12,
8 x 32^3) 1.55 -> 1.15 s with the same compile time (13 s). Keeping YNNPACK for matrix products
only (``individual_dot``) was as fast on the UNet and faster on Swin-UNETR at 64^3 (4.7-5.1 s
against 5.5-6.3 s), but XLA then compiles every reduction and element-wise fusion with LLVM:
5-6x the compile time (70-82 s for the small Swin-UNETR), which the short CPU runs of this
project cannot afford.

XLA reads ``XLA_FLAGS`` once, when the first JAX backend starts, so import jaxmed before any JAX
computation runs. A flag already in ``XLA_FLAGS`` is left as the user set it (e.g.
``--xla_cpu_experimental_ynn_fusion_type=individual_dot``);
``JAXMED_XLA_DEFAULTS=off`` sets nothing. Only ``xla_cpu_*`` flags: GPU and TPU are unaffected.
Set only with jaxlib >= 0.10 (the release measured; an older XLA aborts on a flag it does not
know).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import MutableMapping

from jaxmed import _env

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
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
  on = _env.switched_on(environ, "JAXMED_XLA_DEFAULTS")
  version = jaxlib_version() if version is None else version
  if on and version is not None and version >= MIN_JAXLIB:
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
