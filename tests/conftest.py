"""Test setup: four simulated CPU devices, so sharding is exercised in every run, and XLA:CPU
code generation at -O0 (compilation dominates the tiny programs' cost)."""

import atexit
import os
import shutil
import tempfile

# The suite's tiny programs spend far longer compiling than running. LLVM's -O0 for XLA:CPU cut
# the CPU time of the Swin-UNETR and SimSiam method tests by 22-28%; XLA's older element-wise
# emitters instead of its fusion emitters halved the compile time of a tiny Swin-UNETR train
# step (10.4 -> 5.8 s; the step ran 1.27 -> 1.58 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
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

import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_config as make_tiny_config  # noqa: E402  pylint: disable=g-import-not-at-top


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
