"""The on/off environment switches of jaxmed's import-time defaults (``JAXMED_*_DEFAULTS``)."""

from __future__ import annotations

from collections.abc import Mapping


def switched_on(environ: Mapping[str, str], name: str) -> bool:
  """True unless ``environ[name]`` is ``off`` (any case); a value other than on/off is an
  error that names the variable."""
  setting = environ.get(name, "on").lower()
  if setting not in ("on", "off"):
    raise ValueError(f"{name} must be 'on' or 'off'; got {setting!r}")
  return setting == "on"
