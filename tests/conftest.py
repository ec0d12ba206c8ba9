"""Test setup: four simulated CPU devices, so sharding is exercised in every run."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One fresh persistent compilation cache per test session, shared with the subprocesses the
# tests start: identical train steps (same HLO) compile once instead of once per test.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxmed-test-jit-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np
import pytest

# Overrides that make any UNet config tiny (also usable as `--config.<k>=<v>` flags).
TINY_OVERRIDES = {
    "model.features": (4, 8),
    "data.num_subjects": 6,
    "data.shape": (16, 16, 16),
    "data.num_val": 1,
    "data.num_test": 1,
    "batch_size": 8,
    "log_every": 5,
}


def tiny_flags(**extra):
  """TINY_OVERRIDES (+ extra) as jaxmed CLI flags."""
  items = {**TINY_OVERRIDES, **extra}
  out = []
  for k, v in items.items():
    v = ",".join(map(str, v)) if isinstance(v, tuple) else v
    out.append(f"--config.{k}={v}")
  return out


@pytest.fixture
def tiny_config():
  """A tiny in-painting config on 16^3 phantoms with a 2-level UNet."""
  from jaxmed.cli import apply_overrides
  from jaxmed.train.defaults import base_config
  config = apply_overrides(base_config(), {**TINY_OVERRIDES, "total_steps": 12,
                                           "checkpoint.every": 4, "tensorboard": False})
  return config


@pytest.fixture
def tiny_arrays():
  """16 random 16x16 4-channel 'slices' with BraTS-like labels."""
  rng = np.random.default_rng(0)
  image = rng.normal(size=(16, 16, 16, 4)).astype(np.float32)
  label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(16, 16, 16), p=[0.7, 0.1, 0.1, 0.1])
  return {"image": image, "label": label}
