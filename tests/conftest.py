"""Test setup: four simulated CPU devices, so sharding is exercised in every run, and XLA:CPU
flags that cut compile time (`xla_test_flags`: compilation dominates the tiny programs' cost)."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xla_test_flags import xla_flags  # noqa: E402  pylint: disable=g-import-not-at-top

os.environ.setdefault("XLA_FLAGS", xla_flags(4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_folder(variable: str, prefix: str) -> bool:
  """Points ``variable`` at a new temporary folder removed at exit, unless it is set."""
  if variable in os.environ:
    return False
  os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
  return True


# One fresh persistent compilation cache per test session, shared with the subprocesses the
# tests start: identical train steps (same HLO) compile once instead of once per test. And the
# file-backed data caches (jaxmed.data.cache) of tests that set no data.cache_dir: never
# ~/.cache. The process that makes a folder (pytest-xdist's controller, whose workers inherit
# the variables) deletes it when it exits.
if _session_folder("JAX_COMPILATION_CACHE_DIR", "jaxmed-test-jit-"):
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
_session_folder("JAXMED_CACHE_DIR", "jaxmed-test-data-cache-")

import numpy as np
import pytest

from helpers import tiny_config as make_tiny_config  # pylint: disable=g-import-not-at-top


@pytest.fixture
def tiny_config():
  """A tiny in-painting config on 16^3 phantoms with a 2-level UNet."""
  return make_tiny_config("restoration")


@pytest.fixture
def tiny_arrays():
  """16 random 16x16 4-channel 'slices' with BraTS-like labels."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(16, 16, 16, 4)).astype(np.float32)
  label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(16, 16, 16), p=[0.7, 0.1, 0.1, 0.1])
  return {"image": image, "label": label}
