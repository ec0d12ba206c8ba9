"""jaxmed's XLA:CPU defaults (jaxmed._xla_flags): added at import, never over a user's choice."""

import os

import pytest

from jaxmed import _xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_added_once_and_keep_the_users_flags():
  assert _xla_flags.with_cpu_defaults("") == f"{YNN}=-individual_convolution"
  flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
  out = _xla_flags.with_cpu_defaults(flags)
  assert out == f"{flags} {YNN}=-individual_convolution"
  assert _xla_flags.with_cpu_defaults(out) == out
  # A value the user chose, including the empty one (no YNNPACK fusion), is kept.
  assert _xla_flags.with_cpu_defaults(f"{YNN}=") == f"{YNN}="
  assert _xla_flags.with_cpu_defaults(f"{YNN}=-dot --x=1") == f"{YNN}=-dot --x=1"


@pytest.mark.parametrize("environ, version, expected", [
    ({}, (0, 10), f"{YNN}=-individual_convolution"),
    ({"XLA_FLAGS": "--a=1"}, (1, 2), f"--a=1 {YNN}=-individual_convolution"),
    ({"XLA_FLAGS": "--a=1", "JAXMED_XLA_DEFAULTS": "off"}, (0, 10), "--a=1"),
    ({"XLA_FLAGS": "--a=1", "JAXMED_XLA_DEFAULTS": "OFF"}, (0, 10), "--a=1"),
    ({"XLA_FLAGS": "--a=1"}, (0, 9), "--a=1"),  # an older XLA aborts on unknown flags
])
def test_apply_cpu_defaults(environ, version, expected):
  _xla_flags.apply_cpu_defaults(environ, version=version)
  assert environ.get("XLA_FLAGS", "") == expected


def test_bad_setting_is_named():
  with pytest.raises(ValueError, match="JAXMED_XLA_DEFAULTS must be 'on' or 'off'; got 'no'"):
    _xla_flags.apply_cpu_defaults({"JAXMED_XLA_DEFAULTS": "no"}, version=(0, 10))


def test_the_test_process_runs_with_the_defaults():
  # conftest sets XLA_FLAGS before jaxmed is imported; the import appended the default, and the
  # CPU backend (already running programs in this process) accepted it.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  assert f"{YNN}=-individual_convolution" in os.environ["XLA_FLAGS"].split()
  assert float(jnp.ones(3).sum()) == 3.0
  assert _xla_flags.jaxlib_version() >= _xla_flags.MIN_JAXLIB
